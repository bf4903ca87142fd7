"""A checkpoint moved to another image grid: a higher (or lower) output resolution from a trained
model, to fine-tune briefly on data at the new grid (TLD's recipe; ViT's position interpolation).

The image codes of every template read the rows [max_text_tokens + 3, + grid^2) of the learned
position table (fixed image positions: `[ROI1] text [size] [BOI1] codes ...`, the codes' ids do
not depend on the caption's length). Those rows, read as a grid x grid picture of h channels,
are resampled bicubically to side x side, each new cell reading the old grid where its centre
lies in the picture (a table constant over the grid stays so; at 3x the side every third cell
is an old one exactly); rows before them are kept, rows after them move by the change in
length. A denoiser's fixed sin-cos cell positions are read at the old grid's scale
(ModelConfig.grid_base), so each cell keeps its place in the picture. Everything else (the
trunk's layers, a denoiser's patch projection and head, the vocabulary) is independent of the
grid and is copied, as are the tokenizers stored beside it: the convolutional image tokenizer
reads and writes the new grid's images (ImageTokenizer.at_grid).

    python tools/convert_checkpoint.py regrid SRC OUT --image-grid 12
    IMAGE_SIZE=48 DATA_DIR=data/48px ./scripts/preprocess.sh ...   # its data (see the README)
    pretrain.py --load OUT --finetune --data-path data/48px/tokens.lmdb ...
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from megatron_t2i.training.convert import (POSITION_EMBEDDINGS, CheckpointError, copy_tokenizers,
                                           load_full_state_dict, save_model_checkpoint)


def image_rows(layout) -> int:
    """The first position-table row of the image codes ([ROI1], the caption, [size], [BOI1])."""
    return layout.max_text_tokens + 3


def regrid_positions(table: torch.Tensor, layout, side: int) -> torch.Tensor:
    """A position table [P, h] whose rows image_rows(layout) + [0, grid^2) hold a
    layout.image_grid-side grid -> [P + side^2 - grid^2, h] holding a side x side grid there."""
    grid, start = layout.image_grid, image_rows(layout)
    end = start + grid * grid
    if table.shape[0] < end:
        raise CheckpointError(f"a position table of {table.shape[0]} rows holds no image grid of "
                              f"{grid}x{grid} from row {start}")
    cells = table[start:end].float().t().reshape(1, -1, grid, grid)             # [1, h, g, g]
    moved = F.interpolate(cells, size=(side, side), mode="bicubic", align_corners=False)
    moved = moved.reshape(-1, side * side).t().to(table.dtype)                  # [side^2, h]
    return torch.cat([table[:start], moved, table[end:]])


def regrid(src_dir: str, out_dir: str, side: int, tag: str | None = None) -> str:
    """A weights-only checkpoint of src_dir's model (its EMA where it keeps one) at an image grid
    of `side` codes per side, at src_dir's tensor-parallel size. Returns the folder written."""
    full, config, layout, meta = load_full_state_dict(src_dir, tag)
    where = f"regrid {src_dir}"
    if side < 2:
        raise CheckpointError(f"{where}: --image-grid {side}: expected at least 2")
    if layout.image_positions != "fixed" or layout.image_order != "raster":
        raise CheckpointError(
            f"{where}: its token layout puts image codes at {layout.image_positions} positions "
            f"in {layout.image_order} order; moving to another grid needs fixed positions in "
            f"raster order (the layout preprocess writes by default)")
    new_layout = replace(layout, image_grid=side)
    grown = side * side - layout.image_grid ** 2
    full = dict(full, **{POSITION_EMBEDDINGS: regrid_positions(full[POSITION_EMBEDDINGS],
                                                               layout, side)})
    new_config = replace(config, max_position_embeddings=config.max_position_embeddings + grown,
                         grid_base=config.grid_base or layout.image_grid)
    dtype = getattr(torch, meta["weights_dtype"])
    written = save_model_checkpoint(out_dir, full, new_config, new_layout,
                                    meta["tensor_model_parallel_size"], meta["iteration"], dtype)
    copy_tokenizers(src_dir, out_dir, tag)  # used at the new grid (ImageTokenizer.at_grid)
    return written
