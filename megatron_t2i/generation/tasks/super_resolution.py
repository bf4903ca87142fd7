"""super-resolution: the g x g codes of an image (S px) become 2g x 2g codes (2S px), sampled by a
model fine-tuned with `pretrain.py --tasks super-resolution` (strategies/fill.py).

Template (TokenLayout.super_resolution): `[ROI1] text [size] [BOI1] low [EOI1] [ROI2] [POS0] [size]
[BOI2] high` with `low` a (g/2)^2 window of the input's codes and `high` the g^2 codes of the same
area at twice the resolution; position ids restart at 0 at [ROI2].

Windows: the 2g x 2g output is covered by 3 x 3 windows of g x g codes with stride g/2, so each
overlaps its neighbours by half. Window (i, j) covers output rows [i*g/2, i*g/2 + g) and columns
[j*g/2, j*g/2 + g), and pairs with the input codes of the same area, rows [i*g/4, i*g/4 + g/2)
and columns [j*g/4, j*g/4 + g/2) (stride g/4, also half a window). They are generated one after
the other in raster order (CogView: 9 windows for 32 -> 64).

Overlaps: codes an earlier window already generated are kept as given -- fed to the model in
their places as if it had sampled them (teacher forcing) -- and only the new ones are sampled, in
raster order within the window. So every output code is sampled exactly once and sees every code
above it and to its left within its window, as in training:

    window (0, 0): all g^2 codes;  (0, 1), (0, 2): the right half;  (1, 0), (2, 0): the bottom
    half;  the other four: the bottom-right quarter.  g^2 + 4 * g^2/2 + 4 * g^2/4 = (2g)^2.

Training (data/loader.py, task "super-resolution") uses the whole image as one window: its codes at half the
side (preprocess --sr-low-res) as `low`, its own codes as `high`: the same 2x pixel-scale ratio
the inference windows have.

Input lines: `text<TAB>image_path` (`id<TAB>text<TAB>image_path` with --with-id). `samples` per
image (each with its own seed, as text2image), rounds of `max_inference_batch_size`;
PNGs of twice the side in {out}/{id or text}/; with --debug one grid whose first image is the
input as the VQ-VAE reconstructs it, upscaled. Temperature default 1.02 (CogView's).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from PIL import Image

from megatron_t2i.generation import io
from megatron_t2i.generation.batching import in_rounds, query_seeds
from megatron_t2i.generation.state import Decoding, Prompt
from megatron_t2i.generation.strategies.fill import fill
from megatron_t2i.generation.vocab import image_vocab_mask
from megatron_t2i.progress import progress_bar


@dataclass(frozen=True)
class Window:
    low: tuple[slice, slice]   # rows, columns in the g x g input grid: (g/2)^2 codes
    high: tuple[slice, slice]  # rows, columns in the 2g x 2g output grid: g^2 codes


def windows(grid: int) -> list[Window]:
    """The 9 windows of a g x g input in generation order (see the module docstring)."""
    if grid % 4:
        raise ValueError(f"super-resolution needs a code grid divisible by 4, got {grid}")
    q = grid // 4
    return [Window((slice(i * q, i * q + 2 * q), slice(j * q, j * q + 2 * q)),
                   (slice(2 * i * q, 2 * i * q + grid), slice(2 * j * q, 2 * j * q + grid)))
            for i in range(3) for j in range(3)]


@torch.no_grad()
def super_resolve(model, layout, text_ids, low_codes, decoding: Decoding = Decoding(),
                  generators: list[torch.Generator] | None = None, batch: int | None = None,
                  progress: bool | str = False) -> torch.Tensor:
    """low_codes [g^2] of one image and its text ids -> codes [B, (2g)^2] (CPU), row-major over
    the 2g x 2g grid; B = len(generators), else `batch`."""
    g = layout.image_grid
    if model.config.max_position_embeddings < layout.max_positions("super_resolution"):
        raise ValueError(f"the model has {model.config.max_position_embeddings} positions, "
                         f"super-resolution needs {layout.max_positions('super_resolution')}: use "
                         f"a model fine-tuned with pretrain.py --tasks super-resolution")
    b = len(generators) if generators is not None else (batch or 1)
    decoding = replace(decoding, vocab_size=layout.vocab_size)
    device = model.word_embeddings.weight.device
    low = layout.image_codes(low_codes, g * g).view(g, g)
    high = torch.full((b, 4 * g * g), -1, dtype=torch.long, device=device)
    index = torch.arange(4 * g * g, device=device).view(2 * g, 2 * g)
    allowed = image_vocab_mask(layout, model.config.vocab_size).to(device)
    for window in progress_bar(windows(g), desc=progress if isinstance(progress, str) else None,
                               unit="window", disable=not progress, leave=False):
        prompt = Prompt.of(layout.super_resolution(text_ids, low[window.low]), b, device)
        cells = index[window.high].reshape(-1)                                # [g^2]
        high[:, cells] = fill(model, prompt, high[:, cells], decoding, allowed, generators)
    return high.cpu()


def decode_grid(image_tokenizer, codes: torch.Tensor) -> list[Image.Image]:
    """Codes [B, side^2] of any square grid -> RGB images of side * downsampling pixels (the
    VQ-VAE is convolutional, so it decodes a grid larger than the one it was trained on)."""
    side = math.isqrt(codes.shape[1])
    x = image_tokenizer.model.decode(codes.view(-1, side, side).to(image_tokenizer.device))
    pixels = (image_tokenizer.denormalize(x) * 255).round().byte().cpu()   # [B, 3, H, W]
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def main_super_resolution(ctx, config) -> None:
    layout = ctx.layout
    decoding = config.decoding(layout.vocab_size)

    def parse(line):  # on the writer: "text<TAB>image_path" -> (text, the image's codes)
        text, tab, path = line.partition("\t")
        if not tab or not path.strip():
            raise ValueError("expected text<TAB>image_path (--task super-resolution)")
        return text, ctx.encode_image_file(path.strip())

    for query in io.queries(config.input_source, config.with_id, ctx.is_writer, parse):
        started = time.perf_counter()
        text, codes = query.item
        ids = ctx.text_tokenizer.encode(text, layout.max_text_tokens)  # warns once if cut
        seeds = query_seeds(config.seed, query.index, config.samples)
        high = in_rounds(seeds, config.max_inference_batch_size, ctx.device,
                         lambda generators, label: super_resolve(
                             ctx.model, layout, ids, codes, decoding, generators,
                             progress=label if io.token_progress(ctx.is_writer) else False),
                         label=f"[{query.index}]")
        if not ctx.is_writer:
            continue
        images = decode_grid(ctx.image_tokenizer, high)
        if config.debug:  # the input first, as the VQ-VAE reconstructs it, at the output's size
            original = ctx.image_tokenizer.decode_codes(torch.tensor([codes]))[0]
            images = [original.resize(images[0].size, Image.Resampling.BICUBIC)] + images
        paths = io.save_samples(images, config.output_path, query.id, text, config.debug)
        elapsed = time.perf_counter() - started
        where = paths[0] if len(paths) == 1 else io.query_folder(config.output_path, query.id, text)
        print(f"[{query.index}] {text[:60]!r}: {len(seeds)} image(s) of {images[0].size[0]} px in "
              f"{elapsed:.1f} s ({len(seeds) * 4 * layout.image_tokens / max(elapsed, 1e-9):.0f} "
              f"codes/s) -> {where}", flush=True)
