"""generate_samples.py end to end on a tiny checkpoint: text2image from a file and from stdin,
--with-id / --debug outputs, per-sample seeds across inference batch sizes, CFG, completion,
--rerank-top through score_captions, TP=2 under torchrun, one-line errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import generate_samples
from distributed import free_port
from generation_toy import make_checkpoint
from megatron_t2i.generation.batching import sample_seed
from megatron_t2i.generation.config import GenerationConfig, LoadConfig
from megatron_t2i.generation.loading import build_context
from megatron_t2i.generation.sampling import SamplingConfig
from megatron_t2i.generation.tasks.text2image import complete

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32  # pixels of the toy tokenizer's images


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, toy_tokenizers):
    root = tmp_path_factory.mktemp("t2i")
    tokenizers = toy_tokenizers
    return {"tp1": make_checkpoint(str(root / "tp1"), tokenizers),
            "tp2": make_checkpoint(str(root / "tp2"), tokenizers, tp=2)}


def run_main(ckpt_dir, out, *flags) -> int:
    return generate_samples.main(["--load", ckpt_dir, "--output-path", str(out), "--top-k", "10",
                                  *flags])


def pixels(path):
    return np.asarray(Image.open(path))


def write_queries(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return str(path)


def test_file_queries_with_id_and_seeds_independent_of_inference_batch(ckpt, tmp_path):
    source = write_queries(tmp_path / "q.txt", ["cat1\ta red circle", "cat2\ta big blue star"])
    runs = {}
    for mb in (1, 3):
        out = tmp_path / f"mb{mb}"
        assert run_main(ckpt["tp1"], out, "--input-source", source, "--with-id", "--batch-size",
                        "3", "--max-inference-batch-size", str(mb)) == 0
        runs[mb] = {p: pixels(out / p) for p in
                    (f"{c}/{k:03d}.png" for c in ("cat1", "cat2") for k in range(3))}
    for name, image in runs[1].items():
        assert image.shape == (SIZE, SIZE, 3)
        assert np.array_equal(image, runs[3][name]), name
    assert not np.array_equal(runs[1]["cat1/000.png"], runs[1]["cat1/001.png"])
    assert sample_seed(1234, 0, 1) != sample_seed(1234, 1, 0)


def test_debug_grid_cfg_and_no_overwrite(ckpt, tmp_path):
    source = write_queries(tmp_path / "q.txt", ["a red circle"])
    flags = ["--input-source", source, "--batch-size", "3", "--cfg-scale", "2", "--debug"]
    for _ in range(2):
        assert run_main(ckpt["tp1"], tmp_path / "out", *flags) == 0
    grids = sorted(os.listdir(tmp_path / "out"))
    assert len(grids) == 2 and all(g.startswith("a_red_circle-") for g in grids)
    assert Image.open(tmp_path / "out" / grids[0]).size == (3 * (SIZE + 2) + 2, SIZE + 2 + 2)
    # without --debug the same query twice: new names, the first files kept
    for _ in range(2):
        assert run_main(ckpt["tp1"], tmp_path / "plain", "--input-source", source,
                        "--batch-size", "1") == 0
    assert sorted(os.listdir(tmp_path / "plain" / "a_red_circle")) == ["000-1.png", "000.png"]


@pytest.mark.slow
def test_interactive_mode_through_stdin(ckpt, tmp_path):
    # through the launcher script, whose default input source is interactive
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(
        ["scripts/text2image.sh", "--load", ckpt["tp1"], "--output-path", str(out),
         "--batch-size", "1"], input="a red circle\n../../etc/x\nstop\n", text=True,
        capture_output=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("Query (stop to exit) >>> ") == 3
    for folder in ("a_red_circle", "etc_x"):
        assert pixels(out / folder / "000.png").shape == (SIZE, SIZE, 3)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing escaped the output folder


def test_script_without_a_checkpoint_says_how_to_make_one(tmp_path):
    proc = subprocess.run(["scripts/text2image.sh", "--load", str(tmp_path / "none")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"text2image.sh: no checkpoint in {tmp_path / 'none'}; train the demo model with "
        f"./scripts/pretrain_single_node.sh (it writes checkpoints/demo) or pass --load DIR"]


def test_completion_keeps_the_given_codes(ckpt, tmp_path):
    image_path = tmp_path / "input.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(image_path)
    source = write_queries(tmp_path / "q.txt", [f"a red circle\t{image_path}", "no image here"])
    assert run_main(ckpt["tp1"], tmp_path / "out", "--task", "completion", "--input-source",
                    source, "--batch-size", "2", "--keep-rows", "3", "--debug") == 0
    grid, = os.listdir(tmp_path / "out")  # the line without an image was skipped
    assert Image.open(tmp_path / "out" / grid).size == (3 * (SIZE + 2) + 2, SIZE + 2 + 2)

    ctx = build_context(LoadConfig(ckpt["tp1"]))
    config = GenerationConfig(samples=3, sampling=SamplingConfig(top_k=10), cfg_scale=1.0)
    codes = ctx.image_tokenizer.encode_images([Image.open(image_path)])[0]
    completed = complete(ctx, config, "a red circle", codes.tolist(), 0, keep_rows=3)
    grid = ctx.layout.image_grid
    assert completed.shape == (3, grid * grid)
    assert torch.equal(completed[:, :3 * grid], codes[:3 * grid].expand(3, -1))
    assert not torch.equal(completed[0, 3 * grid:], completed[1, 3 * grid:])
    assert int(completed.max()) < ctx.layout.num_image_codes


def test_rerank_top_keeps_the_best_scored(ckpt, tmp_path, monkeypatch, capsys):
    from megatron_t2i.generation import scoring
    calls = []

    def score_captions(ctx, text, codes):  # stand-in: prefer images with many high codes
        calls.append((text, tuple(codes.shape)))
        return codes.float().mean(dim=1)

    monkeypatch.setattr(scoring, "score_captions", score_captions)
    source = write_queries(tmp_path / "q.txt", ["a red circle"])
    assert run_main(ckpt["tp1"], tmp_path / "all", "--input-source", source, "--batch-size",
                    "4") == 0
    assert run_main(ckpt["tp1"], tmp_path / "top", "--input-source", source, "--batch-size", "4",
                    "--rerank-top", "2") == 0
    assert calls == [("a red circle", (4, 64))]
    assert "caption scores" in capsys.readouterr().out
    kept = sorted(os.listdir(tmp_path / "top" / "a_red_circle"))
    assert kept == ["000.png", "001.png"]
    # the kept images are two of the four samples, best first
    everything = [pixels(tmp_path / "all" / "a_red_circle" / f"{k:03d}.png") for k in range(4)]
    for k in range(2):
        ours = pixels(tmp_path / "top" / "a_red_circle" / f"{k:03d}.png")
        assert any(np.array_equal(ours, image) for image in everything)


@pytest.mark.slow
def test_tensor_parallel_run_under_torchrun_matches_one_process(ckpt, tmp_path):
    # two ranks load the two shards; rank 0 reads stdin and broadcasts the query
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--batch-size", "2"]
    tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", str(free_port()), "generate_samples.py", "--load",
                         ckpt["tp2"], "--output-path", str(tmp_path / "tp2"), "--top-k", "10",
                         *common],
                        input="a small green star\nstop\n", text=True, capture_output=True,
                        cwd=ROOT, env=env, timeout=300)
    assert tp.returncode == 0, tp.stderr[-2000:]
    source = write_queries(tmp_path / "q.txt", ["a small green star"])
    assert run_main(ckpt["tp1"], tmp_path / "tp1", "--input-source", source, *common) == 0
    for k in range(2):
        name = os.path.join("a_small_green_star", f"{k:03d}.png")
        assert np.array_equal(pixels(tmp_path / "tp1" / name), pixels(tmp_path / "tp2" / name))


def test_errors_are_one_line(ckpt, tmp_path, capsys):
    cases = [
        (["--output-path", str(tmp_path)], "--load DIR is required"),
        (["--load", ckpt["tp2"]], "saved at tensor-parallel size 2"),
        (["--load", ckpt["tp1"], "--input-source", str(tmp_path / "missing.txt")],
         "missing.txt: no such file"),
        (["--load", ckpt["tp1"], "--batch-size", "2", "--rerank-top", "3"],
         "--rerank-top 3 exceeds --batch-size 2"),
        (["--load", ckpt["tp1"], "--task", "completion", "--keep-rows", "8"],
         "--keep-rows 8: must be between 1 and 7"),
    ]
    for argv, message in cases:
        try:
            code = generate_samples.main(argv)
        except SystemExit as e:  # flag validation (argparse) exits by itself
            code = e.code
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("generate_samples.py: error: ") and message in err[-1], err


def test_each_round_is_written_as_it_completes(ckpt, tmp_path, monkeypatch):
    from megatron_t2i.generation.tasks import text2image
    rounds = []

    def generate(*args, **kwargs):  # the third round is interrupted (Ctrl-C)
        rounds.append(1)
        if len(rounds) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = text2image.generate
    monkeypatch.setattr(text2image, "generate", generate)
    source = write_queries(tmp_path / "q.txt", ["a red circle"])
    assert run_main(ckpt["tp1"], tmp_path / "out", "--input-source", source, "--batch-size", "6",
                    "--max-inference-batch-size", "2") == 130
    assert sorted(os.listdir(tmp_path / "out" / "a_red_circle")) == \
        ["000.png", "001.png", "002.png", "003.png"]


def test_a_caption_cut_to_the_layout_is_said(ckpt, tmp_path, capsys):
    source = write_queries(tmp_path / "q.txt", ["a big blue star " * 50])
    assert run_main(ckpt["tp1"], tmp_path / "out", "--input-source", source,
                    "--batch-size", "1") == 0
    assert "caption cut to 8 of its 350 ids (the checkpoint's max_text_tokens)" in \
        capsys.readouterr().out
