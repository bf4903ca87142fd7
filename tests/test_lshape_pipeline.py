"""L-shape models through the product: generate_samples.py --decoding lshape (text2image,
completion, reranking, one-line refusals of the other order) and pretrain.py on an L-shape data
set at TP=2 and PP=2 against one process."""
import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image

import generate_samples
from generation_toy import make_checkpoint
from megatron_t2i.generation.config import GenerationConfig, LoadConfig
from megatron_t2i.generation.loading import build_context
from megatron_t2i.generation.sampling import SamplingConfig
from megatron_t2i.generation.tasks.text2image import complete
from test_training import BASE, metrics, run
from toy_data import TOY_LAYOUT, write_toy_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, toy_tokenizers):
    root = tmp_path_factory.mktemp("lshape")
    text, image, layout = toy_tokenizers
    lshape = (text, image, dataclasses.replace(layout, image_order="lshape"))
    return {"lshape": make_checkpoint(str(root / "lshape"), lshape),
            "raster": make_checkpoint(str(root / "raster"), toy_tokenizers)}


def images(folder):
    return {name: np.asarray(Image.open(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder))}


def test_text2image_decodes_an_lshape_checkpoint_in_its_order(ckpts, tmp_path, capsys):
    source = tmp_path / "q.txt"
    source.write_text("a red circle\n", encoding="utf-8")
    runs = {}
    for name, flags in {"auto": [], "lshape": ["--decoding", "lshape"],
                        "rounds": ["--max-inference-batch-size", "1"],
                        "reranked": ["--batch-size", "4", "--rerank-top", "2"]}.items():
        argv = ["--load", ckpts["lshape"], "--input-source", str(source), "--top-k", "10",
                "--batch-size", "3", "--cfg-scale", "1.5", "--output-path",
                str(tmp_path / name), *flags]
        assert generate_samples.main(argv) == 0
        runs[name] = images(tmp_path / name / "a_red_circle")
    assert runs["auto"].keys() == {"000.png", "001.png", "002.png"}
    for name in ("lshape", "rounds"):  # per-sample seeds: any round size, the same images
        assert all(np.array_equal(runs[name][k], v) for k, v in runs["auto"].items())
    assert len(runs["reranked"]) == 2 and "caption scores" in capsys.readouterr().out


@pytest.mark.parametrize("which,flag,message", [
    ("lshape", "raster", "--decoding raster: this checkpoint was trained to generate in lshape "
                         "order"),
    ("raster", "lshape", "preprocessed with --image-order lshape")])
def test_the_other_order_is_refused_in_one_line(ckpts, tmp_path, capsys, which, flag, message):
    source = tmp_path / "q.txt"
    source.write_text("a red circle\n", encoding="utf-8")
    assert generate_samples.main(["--load", ckpts[which], "--input-source", str(source),
                                  "--decoding", flag, "--output-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("generate_samples.py: error: ") and message in err[-1], err


def test_completion_keeps_the_first_blocks(ckpts):
    ctx = build_context(LoadConfig(ckpts["lshape"]))
    config = GenerationConfig(samples=3, sampling=SamplingConfig(top_k=10), cfg_scale=1.0)
    grid = ctx.layout.image_grid
    codes = torch.randint(0, ctx.layout.num_image_codes, (grid * grid,))
    done = complete(ctx, config, "a red circle", codes.tolist(), 0, keep_rows=3)
    square = done.view(3, grid, grid)
    assert torch.equal(square[:, :3, :3], codes.view(grid, grid)[:3, :3].expand(3, -1, -1))
    assert not torch.equal(square[0, 3:], square[1, 3:])  # the rest is drawn, per sample


LSHAPE_TOY = dataclasses.replace(TOY_LAYOUT, image_order="lshape")


@pytest.fixture(scope="module")
def lshape_data(tmp_path_factory):
    return write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "toy.lmdb"), count=48,
                             layout=LSHAPE_TOY)


@pytest.mark.slow
def test_lshape_training_at_tp2_and_pp2_equals_one_process(tmp_path, lshape_data):
    common = BASE + ["--data-path", lshape_data, "--train-iters", "3", "--hidden-dropout", "0",
                     "--attention-dropout", "0", "--tasks", "text2image:3,image2text:1",
                     "--zero-stage", "1", "--gradient-accumulation-steps", "2"]
    one = str(tmp_path / "one")
    run([*common, "--save", one], nproc=1)
    reference = metrics(one)
    assert reference[3]["train/image_loss"] < reference[1]["train/image_loss"]
    for name, flags in {"tp2": ["--tensor-model-parallel-size", "2"],
                        "pp2": ["--pipeline-model-parallel-size", "2"]}.items():
        run([*common, "--save", str(tmp_path / name), *flags], nproc=2)
        other = metrics(str(tmp_path / name))
        for it in range(1, 4):
            assert other[it]["train/loss"] == pytest.approx(reference[it]["train/loss"],
                                                            abs=1e-4), (name, it)
    # the checkpoint remembers its order: a raster data set is refused for fine-tuning
    raster = write_toy_dataset(str(tmp_path / "raster.lmdb"), count=8)
    out = run([*common, "--data-path", raster, "--save", one, "--train-iters", "4"], nproc=1,
              check=False)
    assert out.returncode != 0 and "image_order: expected raster, found lshape" in \
        out.stdout + out.stderr
