"""Does masked-patch training (MaskDiT) save time here? Held-out denoising loss against wall-clock
and against model FLOPs of the language-free denoiser (--tasks clip-diffusion), masked and
unmasked, same data, model and wall-clock budget, with the alignment of each at the end; beside
them the paired-caption denoiser (--tasks diffusion) on the same data and budget, so the cost of
dropping captions is a number.

Every run is `pretrain.py` (the production path) on the same LMDB (written with --clip), model
(--model-size with --decoder-layers for every run, so the models are the same), batch, learning
rate and held-out records, for as many iterations as fit --budget-s at the speed a 25-iteration
probe of that run measured here; it logs each evaluation with the run's cumulative training-step
seconds and model FLOPs (progress/*, evaluation excluded). The masked run ends with
--unmask-finetune-iters.

    python bench/masked_diffusion.py --alignment 32                  # the README's figures
    python bench/masked_diffusion.py --quick --budget-s 20 --eval-interval 10   # a smoke run

Interrupted, the same command goes on: every run resumes from its newest checkpoint (finished ones
are read back). Outputs (--output-dir): masked_diffusion.json (curves and figures), masked_diffusion.md (the
table), masked_diffusion.png (the two plots). The goal it checks: the masked run reaches the
unmasked run's final held-out loss in <= 0.7x its wall-clock.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.common import print_json  # noqa: E402
from megatron_t2i.io_utils import write_json_atomic, write_text_atomic  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL = 0.7


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default=os.path.join(ROOT, "data", "tokens-clip.lmdb"),
                   help="an LMDB written by preprocess (with --clip for --language-free)")
    p.add_argument("--output-dir", default=os.path.join(ROOT, "runs", "masked_diffusion"))
    p.add_argument("--model-size", default="demo")
    p.add_argument("--decoder-layers", type=int, default=1)
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="training seconds of each run (default: %(default)s)")
    p.add_argument("--unmask-finetune", type=float, default=0.1,
                   help="share of the masked run trained unmasked at the end (default: 0.1)")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--no-paired", dest="paired", action="store_false",
                   help="leave out the paired-caption denoiser")
    p.add_argument("--alignment", type=int, default=0, metavar="PROMPTS",
                   help="evaluate each run on this many held-out captions (evaluate.py, 8 "
                        "samples each, guidance 2, best 1 by CLIP score); 0: losses only")
    p.add_argument("--quick", action="store_true", help="a smoke run: the tiny model")
    p.add_argument("--summarise-only", action="store_true",
                   help="recompute the figures, table and plot from --output-dir's JSON")
    return p.parse_args(argv)


def train(args, name: str, task: str, iters: int, mask_ratio: float) -> dict:
    save = os.path.join(args.output_dir, name)
    flags = ["--data-path", args.data_path, "--save", save, "--model-size",
             "tiny" if args.quick else args.model_size, "--decoder-layers",
             str(args.decoder_layers), "--tasks", f"{task}:1", "--train-iters", str(iters),
             "--micro-batch-size", str(args.micro_batch_size), "--lr", str(args.lr),
             "--hidden-dropout", "0", "--attention-dropout", "0", "--text-dropout", "0.1",
             "--ema-decay", "0.999", "--eval-interval", str(args.eval_interval), "--eval-iters",
             str(args.eval_iters), "--log-interval", str(args.eval_interval),
             "--save-interval", str(10 ** 9), "--distributed-backend", "gloo"]
    if mask_ratio:
        flags += ["--mask-ratio", str(mask_ratio), "--unmask-finetune-iters",
                  str(round(args.unmask_finetune * iters))]
    # an existing run (of an interrupted bench) is resumed from its newest checkpoint by
    # pretrain.py, or found finished
    print(f"== {name}: {task}, {iters} iterations, mask ratio {mask_ratio}", flush=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "pretrain.py"), *flags], check=True,
                   cwd=ROOT, env={**os.environ, "MASTER_PORT": str(free_port())})
    rows = [json.loads(line) for line in open(os.path.join(save, "tensorboard",
                                                           "metrics.jsonl"))]
    curve = [{"iteration": r["iteration"], "loss": r["eval/x0_loss"],
              "seconds": r["progress/train_seconds"], "flops": r["progress/model_flops"]}
             for r in rows if "eval/x0_loss" in r]
    if not curve or curve[-1]["iteration"] != iters:
        raise SystemExit(f"bench: {name} stopped before its {iters} iterations; the same "
                         f"command resumes it")
    return {"name": name, "task": task, "iters": iters, "mask_ratio": mask_ratio, "save": save,
            "curve": curve, "seconds_per_iteration": curve[-1]["seconds"] / iters}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reach(curve: list[dict], target: float, key: str) -> float | None:
    """The first `key` (seconds or flops) at which the held-out loss is <= target, linearly
    interpolated between evaluations; None if it never is."""
    for before, after in zip([None] + curve[:-1], curve):
        if after["loss"] <= target:
            if before is None or before["loss"] == after["loss"]:
                return after[key]
            share = (before["loss"] - target) / (before["loss"] - after["loss"])
            return before[key] + share * (after[key] - before[key])
    return None


def speed_probe(args, task: str, mask_ratio: float) -> float:
    """Seconds per training step of a 25-iteration run of this kind (after its first 5)."""
    probe = train(args, f"probe-{task}-{mask_ratio:g}", task, 25, mask_ratio)
    rows = probe["curve"]
    return rows[-1]["seconds"] / 25 if len(rows) < 2 else \
        (rows[-1]["seconds"] - rows[0]["seconds"]) / (rows[-1]["iteration"] - rows[0]["iteration"])


def evaluate(args, run: dict) -> dict:
    out = os.path.join(run["save"], "eval")
    subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--load", run["save"],
                    "--data-path", args.data_path, "--num-prompts", str(args.alignment),
                    "--samples-per-prompt", "8", "--rerank-top", "1", "--cfg-scale", "2",
                    "--output-path", out], check=True, cwd=ROOT)
    report = json.load(open(os.path.join(out, "report.json")))
    best = report.get("alignment_reranked") or report["alignment"]
    return {"colour": best["colour"], "shape": best["kind"], "position": best["position"],
            "images_per_s": report["speed"]["images_per_s"]}


RUNS = (("language-free unmasked", "clip-diffusion", False),
        ("language-free masked", "clip-diffusion", True),
        ("paired captions", "diffusion", False))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarise_only:
        path = os.path.join(args.output_dir, "masked_diffusion.json")
        try:
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
            return report(result, args.output_dir)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise SystemExit(f"bench: {path}: not a report of this bench ({e})") from None
    os.makedirs(args.output_dir, exist_ok=True)
    kinds = RUNS if args.paired else RUNS[:2]
    eval_interval = args.eval_interval
    args.eval_interval = 5  # the probes: an evaluation's progress row every 5 iterations
    speeds = {name: speed_probe(args, task, args.mask_ratio if masked else 0.0)
              for name, task, masked in kinds}
    args.eval_interval = eval_interval
    runs = [train(args, name.replace(" ", "-"), task, max(10, round(args.budget_s / speeds[name])),
                  args.mask_ratio if masked else 0.0) for name, task, masked in kinds]
    result = {
        "data": args.data_path, "model_size": "tiny" if args.quick else args.model_size,
        "decoder_layers": args.decoder_layers, "micro_batch": args.micro_batch_size,
        "lr": args.lr, "budget_s": args.budget_s,
        "eval": f"{args.eval_iters} micro-batches of held-out records",
        "probe_seconds_per_iteration": speeds, "runs": runs,
    }
    if args.alignment:
        for run in runs:
            run["alignment"] = evaluate(args, run)
    return report(result, args.output_dir)


def summarise(result: dict) -> dict:
    """The figures of the runs' curves: final losses, when each language-free run first reaches
    the unmasked run's final held-out loss (seconds and FLOPs), the masked/unmasked ratios."""
    runs = result["runs"]
    target = runs[0]["curve"][-1]["loss"]
    result["target_loss"] = target
    for run in runs:
        final = run["curve"][-1]
        run.update(final_loss=final["loss"], train_seconds=final["seconds"],
                   model_flops=final["flops"])
        if run["task"] == "clip-diffusion":
            for key in ("seconds", "flops"):
                run[f"reaches_target_at_{key}"] = reach(run["curve"], target, key)
    unmasked, masked = runs[0], runs[1]
    for key in ("seconds", "flops"):
        at, ref = masked[f"reaches_target_at_{key}"], unmasked[f"reaches_target_at_{key}"]
        masked[f"{key}_ratio_to_unmasked"] = None if at is None else at / ref
        unmasked[f"{key}_ratio_to_unmasked"] = 1.0
    ratio = masked["seconds_ratio_to_unmasked"]
    result["goal"] = {"wall_clock_ratio": ratio, "target": GOAL,
                      "met": ratio is not None and ratio <= GOAL}
    return result


def report(result: dict, output_dir: str) -> int:
    result = summarise(result)
    write_json_atomic(os.path.join(output_dir, "masked_diffusion.json"), result)
    write_text_atomic(os.path.join(output_dir, "masked_diffusion.md"), table(result))
    plot(result, os.path.join(output_dir, "masked_diffusion.png"))
    print_json({k: v for k, v in result.items() if k != "runs"} | {
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in result["runs"]]})
    return 0


def table(result: dict) -> str:
    lines = ["| run | iterations | s/iteration | training s | model TFLOP | final held-out x0 "
             "loss | first reaches the unmasked final loss at (s, x unmasked's) | colour | "
             "shape |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        at = r.get("reaches_target_at_seconds")
        ratio = r.get("seconds_ratio_to_unmasked")
        reach_s = "–" if r["task"] != "clip-diffusion" else "never" if at is None else \
            f"{at:.0f} s" + (f" ({ratio:.2f}x)" if ratio is not None else "")
        a = r.get("alignment") or {}
        lines.append(f"| {r['name']} | {r['iters']} | "
                     f"{r['seconds_per_iteration']:.3f} | {r['train_seconds']:.0f} | "
                     f"{r['model_flops'] / 1e12:.1f} | {r['final_loss']:.4f} | {reach_s} | "
                     + (f"{a['colour']:.3f} | {a['shape']:.3f} |" if a else "– | – |"))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in result["runs"]:
        c = r["curve"]
        label = f"{r['name']} (mask {r['mask_ratio']:g})"
        axes[0].plot([p["seconds"] for p in c], [p["loss"] for p in c], marker=".", label=label)
        axes[1].plot([p["flops"] / 1e12 for p in c], [p["loss"] for p in c], marker=".",
                     label=label)
    for ax, xlabel in zip(axes, ("training seconds (evaluation excluded)", "model TFLOP")):
        ax.axhline(result["target_loss"], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out x0 loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    tmp = path + ".partial.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("bench: interrupted; the same command goes on from the runs already trained "
                 "(each resumes from its newest checkpoint)")
    except subprocess.CalledProcessError as e:
        sys.exit(f"bench: {e.cmd[1]} failed (exit {e.returncode}); see its output above")
