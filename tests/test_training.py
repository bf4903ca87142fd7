"""pretrain.py end to end under torchrun on CPU/gloo: resume, atomic checkpoints, fp16 overflow,
NaN guard and data-parallel equivalence. Each run is a real multi-process DeepSpeed job."""
import json
import math
import os
import signal
import subprocess
import sys

import psutil
import pytest
import torch

from distributed import free_port
from toy_data import write_toy_dataset

pytestmark = pytest.mark.slow  # multi-process / end-to-end runs: see conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--model-size", "tiny", "--micro-batch-size", "2", "--log-interval", "1",
        "--eval-interval", "1000", "--distributed-backend", "gloo", "--seed", "5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "toy.lmdb"), count=48)


def command(flags, nproc=2, program="pretrain.py"):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), os.path.join(ROOT, program), *flags]


def environment(inject=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRON_T2I_DIST_TIMEOUT_MINUTES="2",
               PYTHONUNBUFFERED="1")
    if inject:
        env["MEGATRON_T2I_INJECT"] = inject
    return env


def run(flags, nproc=2, inject=None, program="pretrain.py", check=True):
    if inject:
        program = os.path.join("tests", "train_harness.py")
    out = subprocess.run(command(flags, nproc, program), cwd=ROOT, env=environment(inject),
                         capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def kill_tree(pid):
    """SIGKILL a launcher and every worker (torchrun puts workers in sessions of their own)."""
    parent = psutil.Process(pid)
    for p in [parent, *parent.children(recursive=True)]:
        p.kill()


def metrics(save_dir) -> dict[int, dict]:
    """iteration -> logged values; a later line (a resumed run) replaces an earlier one."""
    rows = {}
    with open(os.path.join(save_dir, "tensorboard", "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                rows[row["iteration"]] = row
    return rows


def weights(save_dir, tag=None) -> dict:
    tag = tag or open(os.path.join(save_dir, "latest")).read().strip()
    path = os.path.join(save_dir, tag, "mp_rank_00_model_states.pt")
    return torch.load(path, weights_only=True, map_location="cpu")["module"]


def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, data):
    flags = BASE + ["--data-path", data, "--train-iters", "10", "--save-interval", "4"]
    full = str(tmp_path / "full")
    run(flags + ["--save", full])
    reference = metrics(full)

    interrupted = str(tmp_path / "interrupted")
    proc = subprocess.Popen(command(flags + ["--save", interrupted]), cwd=ROOT, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if "iteration 6/10" in line:  # after the checkpoint of iteration 4
            kill_tree(proc.pid)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    latest = open(os.path.join(interrupted, "latest")).read()
    assert latest in ("iter_0000004", "iter_0000008")  # the kill lands a few steps late at most
    start = int(latest[5:])

    out = run(flags + ["--save", interrupted])  # the same command resumes
    assert f"resuming from {interrupted}/iter_{start:07d} at iteration {start}" in out.stdout
    resumed = metrics(interrupted)
    for it in range(start + 1, 11):  # bitwise: same data, RNG, optimiser, schedule
        assert resumed[it]["train/loss"] == reference[it]["train/loss"], it
        assert resumed[it]["train/lr"] == reference[it]["train/lr"], it
    for key, value in weights(full).items():
        assert torch.equal(value, weights(interrupted)[key]), key


def kill_at(flags, line: str):
    """Start pretrain.py with flags, SIGKILL every process once `line` is printed."""
    proc = subprocess.Popen(command(flags), cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for out in proc.stdout:
        if line in out:
            kill_tree(proc.pid)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def resumed_equals_uninterrupted(flags, tmp_path, iterations: int = 8) -> str:
    """Train `flags` (with --train-iters `iterations`, saving every 4) uninterrupted, and again
    killed (SIGKILL) two iterations before the end and re-run: the same losses after the resumed
    checkpoint and the same final weights, bit for bit. Returns the uninterrupted --save."""
    full, interrupted = str(tmp_path / "full"), str(tmp_path / "interrupted")
    run(flags + ["--save", full])
    kill_at(flags + ["--save", interrupted], f"iteration {iterations - 2}/{iterations}")
    start = int(open(os.path.join(interrupted, "latest")).read()[5:])
    out = run(flags + ["--save", interrupted])
    assert f"at iteration {start}" in out.stdout
    reference, resumed = metrics(full), metrics(interrupted)
    for it in range(start + 1, iterations + 1):
        assert resumed[it]["train/loss"] == reference[it]["train/loss"], it
    for key, value in weights(full).items():
        assert torch.equal(value, weights(interrupted)[key]), key
    return full


def test_a_clip_conditioned_model_at_tp2_resumes_bitwise(tmp_path):
    """clip2image (condition slots, LAFITE noise, dropped conditions) with tensor parallelism:
    killed and resumed, it trains on exactly as the uninterrupted run."""
    data = write_toy_dataset(str(tmp_path / "clip.lmdb"), count=48, clip_dim=12)
    flags = BASE + ["--data-path", data, "--train-iters", "8", "--save-interval", "4",
                    "--tasks", "clip2image", "--clip-noise", "0.3", "--text-dropout", "0.3",
                    "--tensor-model-parallel-size", "2", "--condition-slots", "2"]
    full = resumed_equals_uninterrupted(flags, tmp_path)
    assert "conditioning.proj.weight" in weights(full)


def test_crash_during_a_checkpoint_write_leaves_latest_loadable(tmp_path, data):
    save = str(tmp_path / "ck")
    flags = BASE + ["--data-path", data, "--train-iters", "8", "--save-interval", "4", "--save", save]
    out = run(flags, inject="crash-save:8", check=False)
    assert out.returncode != 0
    assert open(os.path.join(save, "latest")).read() == "iter_0000004"
    assert os.path.isdir(os.path.join(save, "iter_0000008.partial"))  # the torn write
    assert not os.path.exists(os.path.join(save, "iter_0000008"))
    assert weights(save)  # the published one loads (weights_only)
    out = run(flags)      # resume goes on from iteration 4 and replaces the torn folder
    assert "at iteration 4" in out.stdout
    assert open(os.path.join(save, "latest")).read() == "iter_0000008"
    assert not os.path.exists(os.path.join(save, "iter_0000008.partial"))


def test_fp16_overflow_on_one_rank_is_skipped_by_all(tmp_path, data):
    save = str(tmp_path / "fp16")
    flags = BASE + ["--data-path", data, "--train-iters", "6", "--save", save, "--fp16"]
    run(flags, inject="overflow:3:1")  # inf on rank 1 only: the decision must be shared
    m = metrics(save)
    assert [m[i]["train/skipped_steps"] for i in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert m[3]["train/loss_scale"] < m[2]["train/loss_scale"]  # the scale backed off
    assert all(torch.isfinite(v).all() for v in weights(save).values() if v.is_floating_point())
    assert all(math.isfinite(m[i]["train/loss"]) for i in (4, 5, 6))  # training went on


def test_nan_loss_without_loss_scaling_stops_before_reaching_weights(tmp_path, data):
    save = str(tmp_path / "nan")
    flags = BASE + ["--data-path", data, "--train-iters", "6", "--save-interval", "2",
                    "--save", save]
    out = run(flags, inject="nan:3", check=False)
    assert out.returncode != 0
    assert "non-finite loss at iteration 3; weights are untouched" in out.stderr
    assert open(os.path.join(save, "latest")).read() == "iter_0000002"


def test_data_parallel_2_equals_one_rank_with_double_micro_batch(tmp_path, data):
    common = BASE + ["--data-path", data, "--train-iters", "4", "--hidden-dropout", "0",
                     "--attention-dropout", "0"]
    one, two = str(tmp_path / "dp1"), str(tmp_path / "dp2")
    run([*common, "--save", one, "--micro-batch-size", "4"], nproc=1)
    run([*common, "--save", two, "--micro-batch-size", "2"], nproc=2)
    w1, w2 = weights(one), weights(two)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-5, msg=key)
    m1, m2 = metrics(one), metrics(two)
    for it in range(1, 5):
        assert m2[it]["train/loss"] == pytest.approx(m1[it]["train/loss"], abs=1e-6)


def test_pipeline_2_stages_trains_like_one(tmp_path, data):
    """pretrain.py with PP=2 (DeepSpeed's pipeline engine) from the same seed gives the losses of
    the plain GPT (PP=1): same initial weights (per-layer seeds), same data, same objective."""
    common = BASE + ["--data-path", data, "--train-iters", "4", "--hidden-dropout", "0",
                     "--attention-dropout", "0", "--zero-stage", "1",
                     "--gradient-accumulation-steps", "2", "--micro-batch-size", "2"]
    one, two = str(tmp_path / "pp1"), str(tmp_path / "pp2")
    run([*common, "--save", one], nproc=1)
    run([*common, "--save", two, "--pipeline-model-parallel-size", "2"], nproc=2)
    m1, m2 = metrics(one), metrics(two)
    for it in range(1, 5):
        assert m2[it]["train/loss"] == pytest.approx(m1[it]["train/loss"], abs=1e-4), it
        assert m2[it]["train/image_loss"] == pytest.approx(m1[it]["train/image_loss"], abs=1e-4)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, data):
    save = str(tmp_path / "term")
    flags = BASE + ["--data-path", data, "--train-iters", "100000", "--save-interval", "100000",
                    "--save", save]
    proc = subprocess.Popen(command(flags), cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "iteration 3/" in line:  # a scheduler pre-empting the job signals every process
            for worker in psutil.Process(proc.pid).children(recursive=True):
                worker.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest[-2000:]
    assert "stopped by signal, checkpoint saved" in rest
    tag = open(os.path.join(save, "latest")).read()
    assert 3 <= int(tag[5:]) < 100000 and weights(save)


def test_tensor_parallel_2_trains_like_one(tmp_path, data):
    """TP=2 through pretrain.py: the same losses and the same clipped gradient norm as TP=1 (the
    norm counts each split parameter's shards once and replicated parameters once)."""
    common = BASE + ["--data-path", data, "--train-iters", "3", "--hidden-dropout", "0",
                     "--attention-dropout", "0", "--clip-grad", "0.5"]
    one, two = str(tmp_path / "tp1"), str(tmp_path / "tp2")
    run([*common, "--save", one], nproc=1)
    run([*common, "--save", two, "--tensor-model-parallel-size", "2"], nproc=2)
    m1, m2 = metrics(one), metrics(two)
    for it in range(1, 4):
        assert m2[it]["train/loss"] == pytest.approx(m1[it]["train/loss"], abs=1e-5), it
        assert m2[it]["train/grad_norm"] == pytest.approx(m1[it]["train/grad_norm"], rel=1e-5), it
