"""A model moved to another image grid (training/regrid.py; convert_checkpoint.py regrid): the
position table's image rows resampled where each new cell's centre lies on the old grid, the
denoiser's sin-cos cells read at the old scale, the rest copied; the moved checkpoint fine-tunes
on data at the new grid and samples images of the new size through the same tokenizer."""
import filecmp
import os
import shutil
import subprocess
import sys

from dataclasses import replace

import pytest
import torch
from PIL import Image

import generate_samples
from megatron_t2i.model.diffusion import grid_positions
from megatron_t2i.tokenizers.layout import TokenLayout
from megatron_t2i.training import convert
from megatron_t2i.training.regrid import image_rows, regrid_positions
from test_training import BASE, run
from toy_data import write_toy_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = TokenLayout(num_image_codes=32, num_text_tokens=50, image_grid=3, max_text_tokens=5,
                     name="t")


def test_the_image_rows_of_the_position_table_move_to_the_new_grid():
    torch.manual_seed(0)
    rows = LAYOUT.max_positions("text_to_image")                      # 5 + 9 + 4
    table = torch.randn(rows, 8)
    start, old = image_rows(LAYOUT), 9
    torch.testing.assert_close(regrid_positions(table, LAYOUT, 3), table, atol=1e-6, rtol=0)
    moved = regrid_positions(table, LAYOUT, 9)
    assert moved.shape == (rows + 81 - old, 8)
    assert torch.equal(moved[:start], table[:start])
    assert torch.equal(moved[start + 81:], table[start + old:])
    # at 3x the side every third cell's centre is an old cell's centre
    grid = moved[start:start + 81].view(9, 9, 8)
    torch.testing.assert_close(grid[1::3, 1::3], table[start:start + old].view(3, 3, 8),
                               atol=1e-5, rtol=0)
    flat = table.clone()
    flat[start:start + old] = torch.arange(8.0)
    torch.testing.assert_close(regrid_positions(flat, LAYOUT, 7)[start:start + 49],
                               torch.arange(8.0).expand(49, 8), atol=1e-5, rtol=0)


def test_a_denoisers_cells_read_their_positions_at_the_old_scale():
    base = grid_positions(9, 16).view(3, 3, 16)
    assert torch.equal(grid_positions(9, 16, base=3).view(3, 3, 16), base)
    finer = grid_positions(81, 16, base=3).view(9, 9, 16)
    torch.testing.assert_close(finer[1::3, 1::3], base, atol=1e-6, rtol=0)
    assert not torch.allclose(finer, grid_positions(81, 16).view(9, 9, 16))


@pytest.mark.slow
def test_a_denoiser_moved_to_a_larger_grid_fine_tunes_and_samples_there(tmp_path,
                                                                           toy_tokenizers):
    text, image, layout = toy_tokenizers                     # an 8 x 8 grid
    data = write_toy_dataset(str(tmp_path / "toy.lmdb"), count=48, layout=layout,
                             image_tokenizer=image)
    small = str(tmp_path / "small")
    run(BASE + ["--data-path", data, "--train-iters", "2", "--tasks", "diffusion",
                "--save", small], nproc=1)
    os.makedirs(os.path.join(small, "tokenizers"), exist_ok=True)  # as pretrain.py keeps them
    shutil.copy(text, os.path.join(small, "tokenizers", "text.model"))
    moved = str(tmp_path / "moved")
    convert_tool = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py")]
    out = subprocess.run(convert_tool + ["regrid", small, moved, "--image-grid", "12"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    before, config, _, _ = convert.load_full_state_dict(small)
    after, moved_config, moved_layout, _ = convert.load_full_state_dict(moved)
    assert moved_layout.image_grid == 12 and moved_config.grid_base == 8
    assert filecmp.cmp(os.path.join(moved, "tokenizers", "text.model"), text, shallow=False)
    assert moved_config.max_position_embeddings == config.max_position_embeddings + 144 - 64
    for key, value in before.items():
        if key != "transformer.position_embeddings.weight":
            assert torch.equal(after[key], value), key

    bigger = replace(layout, image_grid=12)
    data12 = write_toy_dataset(str(tmp_path / "toy12.lmdb"), count=48, layout=bigger,
                               image_tokenizer=image)
    tuned = str(tmp_path / "tuned")
    log = run(BASE + ["--data-path", data12, "--train-iters", "2", "--tasks", "diffusion",
                      "--load", moved, "--finetune", "--save", tuned], nproc=1)
    assert "fine-tuning from" in log.stdout
    tuned_config = convert.read_info(tuned)[1]
    assert tuned_config.grid_base == 8                     # kept through the fine-tune, as is
    assert tuned_config.latent_scale == config.latent_scale  # the latent space it learnt in
    source = tmp_path / "q.txt"
    source.write_text("a red circle\n", encoding="utf-8")
    assert generate_samples.main(["--load", tuned, "--input-source", str(source),
                                  "--batch-size", "2", "--diffusion-steps", "2",
                                  "--text-tokenizer", text, "--image-tokenizer", image,
                                  "--output-path", str(tmp_path / "samples")]) == 0
    folder = tmp_path / "samples" / "a_red_circle"
    sizes = [Image.open(folder / f).size for f in sorted(os.listdir(folder))]
    assert sizes == [(48, 48)] * 2                # 12 codes x the toy tokenizer's 4 pixels
    # the old grid's data set against the moved checkpoint: one line naming the grid
    wrong = run(BASE + ["--data-path", data, "--train-iters", "1", "--tasks", "diffusion",
                        "--load", moved, "--finetune", "--save", str(tmp_path / "w")],
                nproc=1, check=False)
    assert wrong.returncode != 0 and "image_grid" in wrong.stdout + wrong.stderr
    bad = subprocess.run(convert_tool + ["regrid", small, str(tmp_path / "b"), "--image-grid",
                                         "1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--image-grid 1: expected at least 2" in bad.stderr


def test_an_interrupted_conversion_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import convert_checkpoint

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(convert_checkpoint, "regrid", interrupted)
    assert convert_checkpoint.main(["regrid", str(tmp_path), str(tmp_path / "out"),
                                    "--image-grid", "12"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "regrid: interrupted" in err[0]
