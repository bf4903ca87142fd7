"""Defaults that fit real data: a rising held-out loss is reported and the best checkpoint kept
and loadable (--checkpoint best); the guidance scale chosen on held-out captions is recorded
beside the checkpoint and is what generation samples with unless --cfg-scale says otherwise."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from generation_toy import make_checkpoint
from megatron_t2i.generation import guidance
from megatron_t2i.generation.config import GenerationConfig, LoadConfig
from megatron_t2i.generation.loading import build_context
from toy_data import write_toy_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--model-size", "tiny", "--micro-batch-size", "10", "--log-interval", "20",
         "--eval-interval", "5", "--eval-iters", "2", "--distributed-backend", "gloo", "--seed", "5",
         "--holdout-fraction", "0.25", "--train-iters", "100", "--lr", "1e-2", "--hidden-dropout",
         "0", "--attention-dropout", "0", "--save-interval", "1000",
         "--tasks", "text2image:1,image2text:3", "--text-dropout", "0.1"]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, toy_tokenizers):
    """A tiny model trained 60 iterations on 18 records of random captions: it memorises them,
    so its held-out loss turns up."""
    root = tmp_path_factory.mktemp("overfit")
    data = write_toy_dataset(str(root / "toy.lmdb"), count=24, layout=toy_tokenizers[2])
    save = str(root / "ckpt")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                          "--standalone", "pretrain.py", *TRAIN, "--data-path", data,
                          "--save", save], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    os.makedirs(os.path.join(save, "tokenizers"), exist_ok=True)  # (toy data names none)
    for path, name in zip(toy_tokenizers[:2], ("text.model", "vqvae.pt")):
        shutil.copyfile(path, os.path.join(save, "tokenizers", name))
    return {"data": data, "save": save, "log": out.stdout + out.stderr}


def eval_losses(save):
    with open(os.path.join(save, "tensorboard", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["iteration"]: r["eval/loss"] for r in rows if "eval/loss" in r}


@pytest.mark.slow
def test_rising_held_out_loss_is_reported_and_the_best_checkpoint_kept(overfit):
    losses = eval_losses(overfit["save"])
    best_iteration = min(losses, key=losses.get)
    assert best_iteration < 100 and losses[100] > losses[best_iteration]  # it did overfit
    with open(os.path.join(overfit["save"], "best")) as f:
        assert f.read().strip() == f"iter_{best_iteration:07d}"
    with open(os.path.join(overfit["save"], "latest")) as f:
        assert f.read().strip() == "iter_0000100"
    log = overfit["log"]
    assert f"is {100 * (losses[100] / losses[best_iteration] - 1):.1f}% above its best, " \
           f"{losses[best_iteration]:.4f} at iteration {best_iteration}" in log
    assert log.count("the model is overfitting") == 1  # explained once, then one line each
    assert "reads each of the 18 training records about 56 times" in log  # 100 x 10 / 18
    ctx = build_context(LoadConfig(overfit["save"], checkpoint="best"))
    assert ctx.folder.endswith(f"iter_{best_iteration:07d}")
    assert build_context(LoadConfig(overfit["save"])).folder.endswith("iter_0000100")


@pytest.mark.slow
def test_the_guidance_chosen_on_held_out_captions_is_the_default(overfit, tmp_path):
    save, data = overfit["save"], overfit["data"]
    out = subprocess.run([sys.executable, "-m", "megatron_t2i.cli.choose_guidance", "--load", save,
                          "--data-path", data, "--holdout-fraction", "0.25", "--seed", "5",
                          "--num-prompts", "4", "--samples-per-prompt", "2",
                          "--guidance-scales", "0,2,4"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(save, "guidance.json")) as f:
        recorded = json.load(f)["iter_0000100"]
    assert set(recorded["scores"]) == {"0.0", "2.0", "4.0"} and recorded["captions"] == 4
    best = max(recorded["scores"].values())
    assert recorded["scores"][str(recorded["cfg_scale"])] >= best - guidance.MARGIN
    chosen = recorded["cfg_scale"]

    def draw(folder, *flags):
        subprocess.run([sys.executable, "generate_samples.py", "--load", save, "--input-source",
                        str(queries), "--batch-size", "2", "--output-path", str(folder),
                        *flags],
                       cwd=ROOT, check=True, capture_output=True, timeout=600)
        return sorted((p.name, p.read_bytes()) for p in folder.rglob("*.png"))

    queries = tmp_path / "q.txt"
    queries.write_text("a b c\n")
    assert draw(tmp_path / "default") == draw(tmp_path / "explicit", "--cfg-scale", str(chosen))
    other = 4.0 if chosen != 4.0 else 0.0
    assert draw(tmp_path / "default") != draw(tmp_path / "other", "--cfg-scale", str(other))


def test_the_smallest_scale_near_the_best_is_chosen(tmp_path, toy_tokenizers, monkeypatch):
    """The rule on made-up scores: images of scale s score own-caption margins that grow with s
    up to 2 and stay there; 2 is chosen, not 3, since more guidance costs diversity."""
    save = make_checkpoint(str(tmp_path / "ck"), toy_tokenizers)
    ctx = build_context(LoadConfig(save))
    strength = {0.0: 0.0, 1.0: 1.0, 2.0: 3.0, 3.0: 3.0 + guidance.MARGIN / 2}
    drawn = []

    def fake_text2image(ctx, config, text, q):
        drawn.append(config.cfg_scale)
        return torch.full((config.samples, 1), q)  # "codes" that name their caption

    def fake_matrix(ctx, codes, captions, kind):
        own = codes[:, 0]
        s = strength[drawn[-1]]
        return s * torch.nn.functional.one_hot(own, len(captions)).float()

    import megatron_t2i.generation.tasks.text2image as t2i
    monkeypatch.setattr(t2i, "text2image", fake_text2image)
    monkeypatch.setattr(guidance, "caption_matrix", fake_matrix)
    result = guidance.choose_guidance(ctx, GenerationConfig(samples=2), ["x", "y", "z"],
                                      list(strength), progress=False)
    assert result["cfg_scale"] == 2.0
    assert result["scores"]["0.0"] == pytest.approx(torch.tensor(1 / 3).log().item())
    path = guidance.record_guidance(ctx.folder, result)
    assert guidance.recorded_guidance(ctx.folder)["cfg_scale"] == 2.0 and os.path.isfile(path)
    assert guidance.resolve_guidance(ctx, GenerationConfig()).cfg_scale == 2.0
    assert guidance.resolve_guidance(ctx, GenerationConfig(cfg_scale=0.5)).cfg_scale == 0.5
