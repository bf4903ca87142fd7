"""The first run on a real GPU, as one prepared script: the CUDA paths checked, bf16 training and
generation speed measured, with the peak GPU memory of each. Prints one JSON object and writes it
to --output. Without CUDA the GPU-only parts are skipped, each with a line saying so, and the
rest runs on the CPU, so the script itself is tested where no GPU is.

    python bench/gpu_check.py                     # one GPU: about 8 minutes
    python bench/gpu_check.py --quick             # the CPU: about 3 minutes

Sections (each a key of the JSON):
  environment   torch, CUDA, the GPU, its datasheet bf16 peak where known
  checks        on the device: GPT logits equal the CPU's; KV-cached decoding equals recomputation;
                a sample depends only on its seed; a checkpoint written and loaded back gives the
                same logits; pretrain.py (DeepSpeed, bf16 on a GPU) trains, saves and resumes
  training      bench/train_throughput.py's measurement (the trainer itself) at cogview-tutorial
                and cogview-1b: tokens/s, MFU against the matmul measured in the run and against
                the datasheet peak, peak memory
  generation    bench/generation_throughput.py's measurement (`generate`): images/s of the
                CogView-4B shape (random weights, bf16) at batch 1 and 16, KV-cached and not
  quickstart    ./scripts/quickstart.sh on the GPU with its wall time (GPU only: on a CPU it is
                the 30-minute job of the README)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import print_json  # noqa: E402
from megatron_t2i.device import resolve_device, synchronize  # noqa: E402

# dense bf16 tensor-core peaks from the vendors' datasheets, FLOP/s (no sparsity)
DATASHEET_BF16 = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 PCIe": 756.5e12,
                  "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10": 125e12}


def skipped(reason: str) -> dict:
    print(f"gpu_check: skipped: {reason}", file=sys.stderr, flush=True)
    return {"skipped": reason}


def environment(device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2 ** 30, 1),
                   bf16_datasheet_peak=datasheet_peak(props.name))
    else:
        env["gpu"] = None
    return env


def datasheet_peak(name: str) -> float | None:
    for key, peak in DATASHEET_BF16.items():  # the longest match first ("H100 SXM" before "H100")
        if key in name:
            return peak
    return None


def peak_memory(device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)}


def reset_memory(device) -> None:
    gc.collect()  # the previous measurement's engine and model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---- checks --------------------------------------------------------------------------------------
def check(name: str, fn) -> dict:
    start = time.perf_counter()
    try:
        detail = fn()
        result = {"ok": True, **(detail or {})}
    except Exception as e:  # noqa: BLE001 -- every failure is a finding to report, not a crash
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(f"gpu_check: {name}: {'ok' if result['ok'] else 'FAILED ' + result['error']}",
          file=sys.stderr, flush=True)
    return result


def check_logits(device) -> dict:
    from megatron_t2i.config import model_config
    from megatron_t2i.model import GPT
    from megatron_t2i.tokenizers.layout import TokenLayout

    layout = TokenLayout(num_image_codes=64, num_text_tokens=100, image_grid=8, max_text_tokens=8)
    config = model_config("tiny", layout, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    cpu = GPT(config).eval()
    on_device = GPT(config).eval()
    on_device.load_state_dict(cpu.state_dict())
    on_device.to(device)
    tokens = torch.randint(0, layout.vocab_size, (2, 40))
    positions = torch.arange(40).expand(2, -1)
    used = layout.vocab_size  # the padding rows' logits are -inf by design
    with torch.no_grad():
        want = cpu(tokens, positions).float()[..., :used]
        got = on_device(tokens.to(device), positions.to(device)).float().cpu()[..., :used]
        low = on_device.to(torch.bfloat16)(tokens.to(device),
                                            positions.to(device)).float().cpu()[..., :used]
    error = (got - want).abs().max().item()
    if not error <= 1e-3 or not torch.isfinite(low).all():  # NaN fails too
        raise AssertionError(f"fp32 logits differ from the CPU's by {error:.2e}, or bf16 logits "
                             f"are not finite")
    return {"max_abs_difference_fp32": error,
            "max_abs_difference_bf16": (low - want).abs().max().item()}


def check_decoding(device) -> dict:
    from megatron_t2i.config import model_config
    from megatron_t2i.generation.sampling import SamplingConfig
    from megatron_t2i.generation.state import Decoding, Prompt
    from megatron_t2i.generation.strategies.raster import generate
    from megatron_t2i.generation.vocab import image_vocab_mask
    from megatron_t2i.model import GPT
    from megatron_t2i.tokenizers.layout import TokenLayout

    layout = TokenLayout(num_image_codes=64, num_text_tokens=100, image_grid=8, max_text_tokens=8)
    config = model_config("tiny", layout, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config).eval().to(device)
    prompt = Prompt.of(layout.text_to_image([1, 2, 3]), 3, device)
    mask = image_vocab_mask(layout, config.vocab_size).to(device)

    def run(use_cache, seeds, p=prompt):
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        return generate(model, p, 30, Decoding(SamplingConfig(top_k=20), use_cache=use_cache,
                                                vocab_size=layout.vocab_size), mask, gens).cpu()

    cached, uncached = run(True, [1, 2, 3]), run(False, [1, 2, 3])
    if not torch.equal(cached, uncached):
        raise AssertionError("KV-cached decoding drew other tokens than recomputation")
    alone = run(True, [2], Prompt(prompt.tokens[:1], prompt.positions[:1]))
    if not torch.equal(alone[0], cached[1]):
        raise AssertionError("a sample changed with the batch it was drawn in")
    return {"tokens_compared": cached.numel()}


def check_checkpoint(device, tmp: str) -> dict:
    from megatron_t2i.config import model_config
    from megatron_t2i.generation.loading import load_model
    from megatron_t2i.model import GPT
    from megatron_t2i.tokenizers.layout import TokenLayout
    from megatron_t2i.training.convert import save_model_checkpoint

    layout = TokenLayout(num_image_codes=64, num_text_tokens=100, image_grid=8, max_text_tokens=8)
    config = model_config("tiny", layout, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config).eval()
    folder = os.path.join(tmp, "ckpt")
    save_model_checkpoint(folder, model.state_dict(), config, layout, tp=1, dtype=torch.bfloat16)
    loaded = load_model(folder, device)[0]
    tokens = torch.randint(0, layout.vocab_size, (1, 20))
    positions = torch.arange(20)[None]
    used = layout.vocab_size  # the padding rows' logits are -inf by design
    with torch.no_grad():
        want = model.to(torch.bfloat16).float()(tokens, positions)[..., :used]
        got = loaded.float()(tokens.to(device), positions.to(device)).cpu()[..., :used]
    error = (got - want).abs().max().item()
    if not error <= 1e-3:  # NaN fails too
        raise AssertionError(f"reloaded logits differ by {error:.2e}")
    return {"stored_dtype": "bf16", "max_abs_difference": error}


def check_training(device, tmp: str, iterations: int) -> dict:
    """pretrain.py through torchrun (1 process): bf16 on a GPU, fp32 on the CPU; train, then
    resume to more iterations from the saved checkpoint."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from toy_data import write_toy_dataset

    data = write_toy_dataset(os.path.join(tmp, "toy.lmdb"), count=64)
    save = os.path.join(tmp, "train")
    flags = ["--model-size", "tiny", "--data-path", data, "--save", save, "--micro-batch-size",
             "8", "--log-interval", "5", "--eval-interval", "1000", "--save-interval",
             str(iterations), "--lr", "2e-3"] + (["--bf16"] if device.type == "cuda" else [])

    def pretrain(iters):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "1", "pretrain.py", *flags, "--train-iters",
                              str(iters)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        if out.returncode:
            raise AssertionError(f"pretrain.py exited {out.returncode}: "
                                 f"{(out.stderr or out.stdout).strip().splitlines()[-1]}")
        return out.stdout

    first = pretrain(iterations)
    second = pretrain(iterations + 5)
    if f"resuming from {save}" not in second:
        raise AssertionError("the second run did not resume from the first's checkpoint")
    rows = [json.loads(line) for line in open(os.path.join(save, "tensorboard", "metrics.jsonl"))]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    return {"precision": "bf16" if device.type == "cuda" else "fp32", "iterations": iterations + 5,
            "first_loss": losses[0], "last_loss": losses[-1], "log_lines": len(first.splitlines())}


# ---- throughput ----------------------------------------------------------------------------------
def training_speed(sizes, device, quick: bool) -> list[dict]:
    from bench.train_throughput import measure, random_dataset
    from megatron_t2i.tokenizers.layout import TokenLayout

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29541"))
    dtype = "bf16" if device.type == "cuda" else "fp32"
    peak = datasheet_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        layout = TokenLayout(image_grid=32) if device.type == "cuda" else TokenLayout()
        data = random_dataset(os.path.join(tmp, "tokens.lmdb"), layout)
        for size in sizes:
            reset_memory(device)
            micro = 1 if quick else 4
            r = measure(size, data, dtype, micro, 1 if quick else 3, 2 if quick else 10)
            if peak:
                r["mfu_vs_datasheet"] = round(r["model_tflops_per_s"] * 1e12 / peak, 4)
            out.append({**r, **peak_memory(device)})
            print(f"gpu_check: training {size}: {r['tokens_per_s']} tokens/s, MFU {r['mfu']}",
                  file=sys.stderr, flush=True)
    return out


def generation_speed(device, quick: bool) -> dict:
    from bench.generation_throughput import measure
    from megatron_t2i.config import model_config
    from megatron_t2i.model import GPT
    from megatron_t2i.tokenizers.layout import TokenLayout
    from megatron_t2i.training.flops import MatmulReference

    on_gpu = device.type == "cuda"
    size = "cogview-4b" if on_gpu else "demo"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    layout = TokenLayout.cogview() if on_gpu else TokenLayout(num_image_codes=512,
                                                              num_text_tokens=1000, image_grid=16,
                                                              max_text_tokens=28)
    args = argparse.Namespace(steps=3 if quick else 8, max_seconds=5.0 if quick else 60.0,
                              reference=MatmulReference(dtype, device))
    config = model_config(size, layout, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device).to(dtype).eval()  # random-ish weights: speed only
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    cases = []
    with torch.no_grad():
        for batch in (1, 16) if not quick else (1,):
            for cache in (True, False):
                reset_memory(device)
                case = measure(size, model, batch, cache, args, device, layout)
                cases.append({**case, **peak_memory(device)})
                print(f"gpu_check: generation {size} batch {batch} cache {cache}: "
                      f"{case['images_per_s']} images/s", file=sys.stderr, flush=True)
    return {"model_size": size, "dtype": str(dtype).replace("torch.", ""), "cases": cases,
            **({} if on_gpu else {"note": "the CogView-4B shape needs a GPU; the demo size ran"})}


def quickstart(device, tmp: str) -> dict:
    if device.type != "cuda":
        return skipped("the quickstart on a CPU is ./scripts/quickstart.sh itself (about 30 "
                       "minutes on 2 cores, figures in the README)")
    env = dict(os.environ, DATA_DIR=os.path.join(tmp, "qs_data"),
               SAVE=os.path.join(tmp, "qs_ckpt"), OUTPUT_PATH=os.path.join(tmp, "qs_out"))
    start = time.perf_counter()
    out = subprocess.run([os.path.join(ROOT, "scripts", "quickstart.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if out.returncode:
        return {"ok": False, "seconds": round(seconds, 1),
                "error": (out.stderr or out.stdout).strip().splitlines()[-1][:300]}
    report = json.load(open(os.path.join(tmp, "qs_out", "eval", "report.json")))
    best = report.get("alignment_reranked") or report["alignment"]
    stages = [line for line in out.stdout.splitlines() if line.startswith("==== quickstart")]
    return {"ok": True, "seconds": round(seconds, 1), "stages": stages,
            "colour": best["colour"], "shape": best["kind"],
            "psnr": report["tokenizer"]["psnr"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and sizes (a CPU)")
    p.add_argument("--output", default=os.path.join(ROOT, "runs", "gpu_check.json"))
    p.add_argument("--no-quickstart", action="store_true", help="skip the quickstart run")
    a = p.parse_args()
    device = resolve_device()
    result = {"benchmark": "gpu_check", "environment": environment(device)}
    if device.type != "cuda":
        skipped("no CUDA device: checks run on the CPU, bf16, the datasheet MFU, the "
                "CogView-4B generation and peak GPU memory need a GPU")
    with tempfile.TemporaryDirectory() as tmp:
        result["checks"] = {
            "logits_match_cpu": check("logits match the CPU's", lambda: check_logits(device)),
            "decoding": check("cached = uncached decoding, seeds",
                              lambda: check_decoding(device)),
            "checkpoint_round_trip": check("checkpoint round trip",
                                           lambda: check_checkpoint(device, tmp)),
            "deepspeed_training": check("pretrain.py trains and resumes",
                                        lambda: check_training(device, tmp,
                                                               10 if a.quick else 30)),
        }
        sizes = ["demo"] if a.quick else ["cogview-tutorial", "cogview-1b"]
        result["training"] = training_speed(sizes, device, a.quick)
        result["generation"] = generation_speed(device, a.quick)
        synchronize(device)
        result["quickstart"] = skipped("--no-quickstart") if a.no_quickstart \
            else quickstart(device, tmp)
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with open(a.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print_json(result)
    failed = [k for k, v in result["checks"].items() if not v["ok"]]
    print(f"gpu_check: {len(result['checks']) - len(failed)} of {len(result['checks'])} checks "
          f"passed{'; failed: ' + ', '.join(failed) if failed else ''} -> {a.output}",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
