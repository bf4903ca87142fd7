"""scripts/quickstart.sh end to end at toy size: every stage runs and the figures it prints are
those of the report; run again, every stage is skipped and the same figures are printed."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # multi-process / end-to-end runs: see conftest.py

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "quickstart.sh"), *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=1200)


def test_every_script_is_executable():
    """The README runs them as ./scripts/NAME.sh."""
    scripts = sorted((ROOT / "scripts").glob("*.sh"))
    assert scripts and all(os.access(p, os.X_OK) for p in scripts), \
        [p.name for p in scripts if not os.access(p, os.X_OK)]


def test_a_bad_method_or_trunk_length_is_one_line_before_any_work(tmp_path):
    for env, message in (({"METHOD": "gan"}, "METHOD must be caption, clip-gen"),
                         ({"METHOD": "diffusion", "TRUNK_ITERS": "2k"},
                          "TRUNK_ITERS must be a whole number of iterations, got '2k'")):
        r = run({**env, "DATA_DIR": str(tmp_path / "data")})
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "data").exists()


def stage_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("==== quickstart ")]


def test_quickstart_runs_every_stage_then_skips_them(tmp_path):
    env = {"DATA_DIR": str(tmp_path / "data"), "SAVE": str(tmp_path / "ckpt"),
           "OUTPUT_PATH": str(tmp_path / "out"), "SYNTHETIC_COUNT": "150", "VQVAE_STEPS": "20",
           "TEXT_VOCAB_SIZE": "400", "MODEL_SIZE": "tiny", "TRAIN_ITERS": "4",
           "MICRO_BATCH_SIZE": "2", "NUM_PROMPTS": "3", "SAMPLES": "2", "RERANK_TOP": "1",
           "NUM_GPUS_PER_WORKER": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    first = run(env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stages = stage_lines(first.stdout)
    assert [s.split()[2] for s in stages] == ["1/4", "2/4", "3/4", "4/4", "done"], stages
    assert not any("skipped" in s for s in stages), stages

    out = tmp_path / "out"
    report = json.loads((out / "eval" / "report.json").read_text())
    best = report["alignment_reranked"]
    assert report["source"]["reranked"] == "best 1 of 2 by caption score" and best["images"] == 3
    printed = re.search(r"colour alignment, best by caption score\s+([0-9.]+)", first.stdout)
    assert printed and float(printed.group(1)) == round(best["colour"], 3)
    swap = {o: "n/a" if v is None else f"{v:.2f}"  # None: no held-out pair named in that order
            for o, v in report["binding"]["colour"]["text->image"].items()}
    assert set(swap.values()) != {"n/a"}  # 150 images hold some two-shape pictures out
    assert f"{swap['named in reading order']} when the caption names the shapes in reading " \
           f"order, {swap['named in reverse']} in reverse" in first.stdout
    printed = re.search(r"VQ-VAE PSNR on held-out images\s+([0-9.]+)", first.stdout)
    assert printed and float(printed.group(1)) == round(report["tokenizer"]["psnr"], 3)
    assert (out / "eval" / "grid.png").stat().st_size > 0
    assert len(list((out / "text2image").rglob("*.png"))) == 2 * 2  # 2 captions, best 2 of 8 each
    for where in ("eval/grid.png", "eval/report.md", "tensorboard --logdir"):
        assert where in first.stdout
    meta = json.loads((tmp_path / "ckpt" / "iter_0000004" / "meta.json").read_text())
    assert meta["iteration"] == meta["train_iters"] == 4

    again = run({k: v for k, v in env.items() if k != "TRAIN_ITERS"})  # finished: its own count
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    stages = stage_lines(again.stdout)
    assert all("skipped" in s for s in stages[:4]), stages
    assert printed.group(0) in again.stdout  # the same figures, from the same report

    bad = run(env, "--train-iters", "5")
    assert bad.returncode == 2 and "takes no arguments" in bad.stderr


def tiny_recipe(method: str, tmp_path) -> dict:
    """The environment of a METHOD's quickstart on a tiny data set, model and evaluation."""
    return {"METHOD": method, "DATA_DIR": str(tmp_path / "data"), "SAVE": str(tmp_path / "ckpt"),
            "OUTPUT_PATH": str(tmp_path / "out"), "SYNTHETIC_COUNT": "150", "VQVAE_STEPS": "20",
            "TEXT_VOCAB_SIZE": "400", "CLIP_STEPS": "5", "MODEL_SIZE": "tiny", "TRAIN_ITERS": "4",
            "MICRO_BATCH_SIZE": "2", "NUM_PROMPTS": "3", "SAMPLES": "2", "RERANK_TOP": "1",
            "NUM_GPUS_PER_WORKER": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}


def test_the_language_free_quickstart_trains_a_clip_and_a_model_that_never_reads_a_caption(
        tmp_path):
    first = run(tiny_recipe("clip-gen", tmp_path))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stages = stage_lines(first.stdout)
    assert [s.split()[2] for s in stages] == ["1/6", "2/6", "3/6", "4/6", "5/6", "6/6", "done"]
    report = json.loads((tmp_path / "out" / "eval" / "report.json").read_text())
    assert report["source"]["reranked"] == "best 1 of 2 by clip score"
    assert report["source"]["condition"].startswith("CLIP text embedding")
    assert report["binding"] is None  # no caption direction to score a swap with
    printed = re.search(r"CLIP text->image R@1 among 100 \(held-out\)\s+([0-9.]+)", first.stdout)
    assert printed, first.stdout[-2000:]
    assert re.search(r"sampling: [0-9.]+ images/s drawn, [0-9.]+ with reranking \(cpu\); "
                     r"training took \d+ min \d\d s", first.stdout), first.stdout[-2000:]
    assert (tmp_path / "ckpt" / "tokenizers" / "clip.pt").is_file()  # generation needs it
    assert len(list((tmp_path / "out" / "text2image").rglob("*.png"))) == 2 * 2


def test_the_lformer_quickstart_decodes_in_l_shapes_with_and_without_the_cvae(tmp_path):
    env = {"METHOD": "lformer", "DATA_DIR": str(tmp_path / "data"),
           "SYNTHETIC_COUNT": "150", "VQVAE_STEPS": "20", "TEXT_VOCAB_SIZE": "400",
           "CLIP_STEPS": "5", "MODEL_SIZE": "tiny", "TRAIN_ITERS": "4", "MICRO_BATCH_SIZE": "2",
           "NUM_PROMPTS": "3", "SAMPLES": "2", "RERANK_TOP": "1", "NUM_GPUS_PER_WORKER": "1",
           "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    for cvae, stages in (("0", 5), ("8", 6)):
        out = tmp_path / f"out{cvae}"
        first = run({**env, "CVAE": cvae, "SAVE": str(tmp_path / f"ckpt{cvae}"),
                     "OUTPUT_PATH": str(out)})
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        names = [s.split()[2] for s in stage_lines(first.stdout)]
        assert names == [f"{i}/{stages}" for i in range(1, stages + 1)] + ["done"], names
        report = json.loads((out / "eval" / "report.json").read_text())
        assert report["source"]["decoding"] == "lshape"
        assert re.search(r"colour alignment, best by caption score\s+[0-9.]+ +\(target 0.85",
                         first.stdout), first.stdout[-2000:]
        assert len(list((out / "text2image").rglob("*.png"))) == 2 * 2
        config = json.loads((tmp_path / f"ckpt{cvae}" / "iter_0000004" / "model_config.json")
                            .read_text())
        assert config["latent_dim"] == int(cvae)
    layout = json.loads((tmp_path / "data" / "tokens-lshape.lmdb" / "layout.json").read_text())
    assert layout["image_order"] == "lshape"


def test_the_diffusion_quickstart_trains_a_denoiser_and_reranks_by_clip(tmp_path):
    first = run({**tiny_recipe("diffusion", tmp_path), "TRUNK_ITERS": "2"})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stages = stage_lines(first.stdout)
    assert [s.split()[2] for s in stages] == [f"{i}/7" for i in range(1, 8)] + ["done"], stages
    assert "trunk: demo model, autoregressive text->image" in stages[3]
    assert f"trunk initialised from {tmp_path / 'ckpt'}-trunk" in first.stdout
    report = json.loads((tmp_path / "out" / "eval" / "report.json").read_text())
    assert report["source"]["decoding"] == "diffusion"
    assert report["source"]["reranked"] == "best 1 of 2 by clip score"
    assert report["source"]["sampling"].startswith("dpm-solver++, 15 steps, cfg-scale 2")
    assert report["heldout_loss"]["patches"] > 0 and report["binding"] is None
    assert re.search(r"shape alignment, best by clip score\s+[0-9.]+ +\(target 0.7",
                     first.stdout), first.stdout[-2000:]
    config = json.loads((tmp_path / "ckpt" / "iter_0000004" / "model_config.json").read_text())
    assert config["head"] == "denoise" and config["latent_channels"] > 0
    state = torch.load(tmp_path / "ckpt" / "iter_0000004" / "mp_rank_00_model_states.pt",
                       weights_only=True)
    assert state["ema"]["updates"] == 4  # the recipe keeps the moving average it samples with
    assert len(list((tmp_path / "out" / "text2image").rglob("*.png"))) == 2 * 2


def test_the_fast_language_free_quickstart_trains_a_masked_denoiser_on_pictures_alone(tmp_path):
    first = run({**tiny_recipe("fast-language-free", tmp_path), "TRAIN_ITERS": "10",
                 "TRUNK_ITERS": "2"})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stages = stage_lines(first.stdout)
    assert [s.split()[2] for s in stages] == [f"{i}/7" for i in range(1, 8)] + ["done"], stages
    assert "trunk: demo model, autoregressive CLIP embedding->image" in stages[3]
    assert f"trunk initialised from {tmp_path / 'ckpt'}-trunk" in first.stdout
    assert "the condition projector too" in first.stdout  # the language-free trunk's slots
    report = json.loads((tmp_path / "out" / "eval" / "report.json").read_text())
    assert report["source"]["decoding"] == "diffusion"
    assert report["source"]["condition"].startswith("CLIP text embedding")
    assert report["heldout_loss"]["patches"] > 0
    assert re.search(r"colour alignment, best by clip score\s+[0-9.]+ +\(target 0.75",
                     first.stdout), first.stdout[-2000:]
    config = json.loads((tmp_path / "ckpt" / "iter_0000010" / "model_config.json").read_text())
    assert config["decoder_layers"] == 1 and config["condition_slots"] > 0
    logged = [json.loads(line) for line in
              (tmp_path / "ckpt" / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/hidden_patch_loss" in r for r in logged)  # trained with hidden patches
    assert len(list((tmp_path / "out" / "text2image").rglob("*.png"))) == 2 * 2
    pairs = tmp_path / "pairs.tsv"  # the CLIP condition interpolated along the sphere
    pairs.write_text("a red circle\ta blue square\n", encoding="utf-8")
    strip = subprocess.run([sys.executable, "generate_samples.py", "--task", "interpolation",
                            "--load", str(tmp_path / "ckpt"), "--input-source", str(pairs),
                            "--batch-size", "3", "--diffusion-steps", "3", "--output-path",
                            str(tmp_path / "strip")], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert strip.returncode == 0, strip.stderr[-2000:]
    assert len(list((tmp_path / "strip").rglob("*.png"))) == 3 + 1


def test_default_inputs_from_a_large_folder_reach_the_generator(tmp_path):
    """image2text.sh / super_resolution.sh / post_selection.sh pick the first images of a large
    synthetic folder: under pipefail a `| head` used to kill them silently (SIGPIPE, exit 141)."""
    synthetic = tmp_path / "data" / "synthetic"
    synthetic.mkdir(parents=True)
    for i in range(5000):  # far more sorted names than a pipe buffer holds
        (synthetic / f"{i:06d}_a_long_enough_name.png").touch()
        (synthetic / f"{i:06d}_a_long_enough_name.txt").write_text("a caption")
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "LOAD": str(tmp_path / "none"),
           "OUTPUT_PATH": str(tmp_path / "out")}
    for script in ("image2text.sh", "super_resolution.sh", "post_selection.sh"):
        r = subprocess.run([str(ROOT / "scripts" / script)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "no checkpoint in" in r.stderr, (script, r.returncode, r.stderr)
