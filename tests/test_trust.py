"""Trust no file: a pickle payload in a checkpoint never runs, damaged checkpoints and data sets
are one line naming the file (never SIGBUS, never garbage), training falls back to the previous
intact checkpoint by flag, resumed logs hold no replayed iterations, old checkpoints are pruned,
user outputs are ordinary files. Real subprocesses, since a crash would take pytest with it."""
import json
import os
import subprocess
import sys

import pytest
import torch

from distributed import free_port
from generation_toy import make_checkpoint
from megatron_t2i.training.manifest import write_manifest
from toy_data import write_toy_dataset

pytestmark = pytest.mark.slow  # multi-process / end-to-end runs: see conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--model-size", "tiny", "--micro-batch-size", "2", "--log-interval", "1",
         "--eval-interval", "2", "--eval-iters", "1", "--distributed-backend", "gloo",
         "--seed", "5", "--save-interval", "2"]


class Payload:
    """What a hostile checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRON_T2I_DIST_TIMEOUT_MINUTES="2",
               PYTHONUNBUFFERED="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          **kwargs)


def pretrain(flags):
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                "--master_port", str(free_port()), "pretrain.py", *TRAIN, *flags])


def error_lines(out) -> list[str]:
    """The lines of stderr that are ours (not the launchers' and libraries' chatter)."""
    return [line for line in out.stderr.splitlines() if ": error: " in line]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_tokenizers):
    """A 4-iteration run: checkpoints at iterations 2 and 4, with tokenizers for generation."""
    root = tmp_path_factory.mktemp("trust")
    data = write_toy_dataset(str(root / "toy.lmdb"), count=32)
    save = str(root / "ck")
    out = pretrain(["--data-path", data, "--train-iters", "4", "--save", save])
    assert out.returncode == 0, out.stderr[-3000:]
    tokenizers = toy_tokenizers
    return {"root": root, "data": data, "save": save, "tokenizers": tokenizers}


def copy_run(trained, tmp_path) -> str:
    import shutil
    save = str(tmp_path / "ck")
    shutil.copytree(trained["save"], save)
    return save


def test_a_pickle_payload_is_refused_by_every_entry_point_and_never_runs(trained, tmp_path):
    save = copy_run(trained, tmp_path)
    marker = tmp_path / "payload_ran"
    folder = os.path.join(save, "iter_0000004")
    weights = os.path.join(folder, "mp_rank_00_model_states.pt")
    blob = torch.load(weights, weights_only=False)
    blob["module"]["word_embeddings.weight"] = Payload(str(marker))
    torch.save(blob, weights)
    write_manifest(folder)  # whoever wrote the payload can write a matching manifest too
    tiny = make_checkpoint(str(tmp_path / "gen"), trained["tokenizers"])  # for generation
    gen_weights = os.path.join(tiny, "iter_0000000", "mp_rank_00_model_states.pt")
    gen_blob = torch.load(gen_weights, weights_only=True)
    gen_blob["module"]["word_embeddings.weight"] = Payload(str(marker))
    torch.save(gen_blob, gen_weights)
    write_manifest(os.path.dirname(gen_weights))

    queries = tmp_path / "q.txt"
    queries.write_text("a red circle\n")
    entry_points = {
        "resume": pretrain(["--data-path", trained["data"], "--train-iters", "6", "--save", save]),
        "finetune": pretrain(["--data-path", trained["data"], "--train-iters", "2", "--load", save,
                              "--finetune", "--save", str(tmp_path / "ft")]),
        "generation": run([sys.executable, "generate_samples.py", "--load", tiny,
                           "--input-source", str(queries), "--output-path", str(tmp_path / "s")]),
        "conversion": run([sys.executable, "tools/convert_checkpoint.py", "reshard", save,
                           str(tmp_path / "resharded"), "--tp", "1"]),
    }
    for name, out in entry_points.items():
        assert out.returncode != 0, (name, out.stderr[-2000:])  # torchrun's 1 for pretrain's 2
        lines = error_lines(out)
        assert len(lines) == 1 and "refused by the safe loader" in lines[0] \
            and "mp_rank_00_model_states.pt" in lines[0] and "posix.system" in lines[0], \
            (name, out.stderr[-2000:])
    assert not marker.exists()
    # on purpose, and loudly, it does load (and runs the payload): the override is explicit
    out = run([sys.executable, "generate_samples.py", "--load", tiny, "--input-source",
               str(queries), "--output-path", str(tmp_path / "s"), "--trust-checkpoint"])
    assert marker.exists() and "fully unpickled (--trust-checkpoint)" in out.stderr


def test_a_truncated_checkpoint_offers_the_previous_one_and_the_flag_takes_it(trained, tmp_path):
    save = copy_run(trained, tmp_path)
    weights = os.path.join(save, "iter_0000004", "mp_rank_00_model_states.pt")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    flags = ["--data-path", trained["data"], "--train-iters", "6", "--save", save]
    out = pretrain(flags)
    assert out.returncode != 0
    line, = error_lines(out)
    assert f"{weights}: {size // 2} bytes, {size} when saved" in line
    assert f"the previous complete checkpoint is {os.path.join(save, 'iter_0000002')}" in line
    assert "--resume-fallback" in line
    out = pretrain(flags + ["--resume-fallback"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming from {os.path.join(save, 'iter_0000002')} at iteration 2" in out.stdout
    assert open(os.path.join(save, "latest")).read() == "iter_0000006"


def test_bit_flips_are_named_by_generation_and_refused_by_reshard(trained, tmp_path):
    save = copy_run(trained, tmp_path)
    weights = os.path.join(save, "iter_0000004", "mp_rank_00_model_states.pt")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:  # 64 KiB of noise inside, the size unchanged
        f.seek(size // 3)
        f.write(os.urandom(min(64 << 10, size // 3)))
    out = run([sys.executable, "tools/convert_checkpoint.py", "reshard", save,
               str(tmp_path / "resharded"), "--tp", "1"])
    assert out.returncode == 2 and not os.path.exists(tmp_path / "resharded")
    assert f"{weights}: checksum differs from manifest.json" in out.stderr
    from megatron_t2i.generation.loading import load_model
    with pytest.raises(ValueError, match=f"{weights}: checksum differs .*damaged on disk"):
        load_model(save)


def test_an_edited_token_layout_is_caught(trained, tmp_path):
    save = copy_run(trained, tmp_path)
    path = os.path.join(save, "iter_0000004", "token_layout.json")
    layout = json.load(open(path))
    layout["max_text_tokens"] += 1
    json.dump(layout, open(path, "w"))
    from megatron_t2i.generation.loading import load_model
    with pytest.raises(ValueError, match="token_layout.json: checksum differs .*edited after saving"):
        load_model(save)


def test_non_finite_weights_of_an_unverified_checkpoint_are_refused(trained, tmp_path):
    folder = make_checkpoint(str(tmp_path / "old"), trained["tokenizers"])
    weights = os.path.join(folder, "iter_0000000", "mp_rank_00_model_states.pt")
    blob = torch.load(weights, weights_only=True)
    blob["module"]["transformer.layers.1.mlp.dense_4h_to_h.weight"][3, 5] = float("nan")
    torch.save(blob, weights)
    os.remove(os.path.join(folder, "iter_0000000", "manifest.json"))  # saved before manifests
    from megatron_t2i.generation.loading import load_model
    with pytest.raises(ValueError, match="dense_4h_to_h.weight holds non-finite values"):
        load_model(folder)


def test_truncated_lmdb_is_one_line_for_training_and_preprocessing(trained, tmp_path):
    data = write_toy_dataset(str(tmp_path / "toy.lmdb"), count=400)
    mdb = os.path.join(data, "data.mdb")
    with open(mdb, "r+b") as f:
        f.truncate(os.path.getsize(mdb) // 2)
    out = pretrain(["--data-path", data, "--train-iters", "2"])
    assert out.returncode == 1 and "exitcode  : 2" in out.stderr  # pretrain's 2, not SIGBUS
    line, = error_lines(out)
    assert f"{mdb}: " in line and "truncated" in line
    text_path, image_path, _ = trained["tokenizers"]
    out = run([sys.executable, "-m", "megatron_t2i.cli.preprocess", "--input", str(tmp_path),
               "--output", data, "--text-tokenizer", text_path, "--image-tokenizer", image_path])
    assert out.returncode == 1 and "truncated" in out.stderr.strip().splitlines()[-1]


def test_resumed_logs_hold_each_iteration_once(trained, tmp_path):
    save = copy_run(trained, tmp_path)
    logged = os.path.join(save, "tensorboard", "metrics.jsonl")
    with open(logged, "a") as f:  # a run killed after iteration 5, its log ahead of checkpoint 4
        f.write(json.dumps({"iteration": 5, "train/loss": 9.0}) + "\n" + '{"iterat')
    out = pretrain(["--data-path", trained["data"], "--train-iters", "6", "--save", save])
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in open(logged)]
    train = [r["iteration"] for r in rows if "train/loss" in r]
    assert train == [1, 2, 3, 4, 5, 6]
    assert all(r.get("train/loss") != 9.0 for r in rows)


def test_old_checkpoints_are_pruned_keeping_the_newest_and_the_best(trained, tmp_path):
    save = str(tmp_path / "keep")
    out = pretrain(["--data-path", trained["data"], "--train-iters", "8", "--save", save,
                    "--keep-checkpoints", "2"])
    assert out.returncode == 0, out.stderr[-2000:]
    tags = sorted(t for t in os.listdir(save) if t.startswith("iter_"))
    best = open(os.path.join(save, "best")).read()
    losses = {t: json.load(open(os.path.join(save, t, "meta.json")))["heldout_loss"] for t in tags}
    assert set(tags) == {"iter_0000006", "iter_0000008", best}
    assert losses[best] == min(losses.values())


def test_outputs_are_ordinary_files_under_umask_022(trained, tmp_path):
    tiny = make_checkpoint(str(tmp_path / "gen"), trained["tokenizers"])
    queries = tmp_path / "q.txt"
    queries.write_text("a red circle\n")
    out = run([sys.executable, "generate_samples.py", "--load", tiny, "--input-source",
               str(queries), "--output-path", str(tmp_path / "s"), "--batch-size", "2"],
              preexec_fn=lambda: os.umask(0o022))
    assert out.returncode == 0, out.stderr[-2000:]
    images = sorted((tmp_path / "s" / "a_red_circle").iterdir())
    assert [p.name for p in images] == ["000.png", "001.png"]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in images)
