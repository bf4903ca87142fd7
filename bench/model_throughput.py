"""Throughput of the model itself (no DeepSpeed, no data loading); prints one JSON object.

    python bench/model_throughput.py --quick --threads 1   # a busy CPU, a couple of minutes
    python bench/model_throughput.py                       # a GPU: full sequences, more steps

For each model size and dtype: forward + loss + backward tokens/s of GPT, and MFU = achieved model
FLOP/s / the matmul reference of the same run and dtype (megatron_t2i.training.flops: the best of
several probes, never below the model's own rate; model FLOPs formula in the JSON). Weights are
held in the dtype (as DeepSpeed bf16/fp16 training computes). The whole training step (DeepSpeed,
data) is bench/train_throughput.py; decoding, through `generate`, bench/generation_throughput.py.
With --budget-s, a measurement whose estimated time (its FLOPs at the measured matmul rate) exceeds
the budget is skipped with the reason (e.g. bf16 on a CPU without bf16 instructions).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import DTYPES, print_json, resolve_device, sync  # noqa: E402
from megatron_t2i import mpu  # noqa: E402
from megatron_t2i.config import model_config  # noqa: E402
from megatron_t2i.model import GPT, language_model_loss  # noqa: E402
from megatron_t2i.tokenizers.layout import TokenLayout  # noqa: E402
from megatron_t2i.training.flops import FORMULA, MatmulReference, model_flops_per_token  # noqa: E402

LAYOUTS = {"default": lambda: TokenLayout(image_grid=32),  # our vocabulary, 32x32-code images
           "cogview": TokenLayout.cogview}                 # the released CogView vocabulary


def build(size: str, layout: TokenLayout, dtype: torch.dtype, device) -> GPT:
    mpu.model_parallel_seed(0)  # weights, and the dropout stream attention dropout draws from
    return GPT(model_config(size, layout), device=device, params_dtype=dtype)


def skip_reason(flops: float, rate_gflops: float, budget_s: float | None) -> str | None:
    estimate = flops / (rate_gflops * 1e9)
    if budget_s is not None and estimate > budget_s:
        return (f"estimated {estimate:.0f} s at the measured matmul rate, over --budget-s "
                f"{budget_s:g}; run without --quick / with a larger --budget-s")
    return None


def bench_train(model: GPT, batch: int, seq: int, warmup: int, steps: int, device) -> float:
    """Mean seconds of forward + loss + backward over `steps` after `warmup`."""
    model.train()
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
    position_ids = torch.arange(seq, device=device).expand(batch, seq)
    loss_mask = torch.ones(batch, seq, device=device)

    def step():
        loss, _ = language_model_loss(model(tokens[:, :-1], position_ids), tokens[:, 1:], loss_mask)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def train_entry(size, layout, dtype_name, reference, args, seq, device) -> dict:
    config = model_config(size, layout)
    entry = {"size": size, "dtype": dtype_name, "parameters": config.num_parameters(),
             "batch": args.batch, "seq_length": seq}
    flops_per_step = model_flops_per_token(config, seq) * args.batch * seq
    reason = skip_reason(flops_per_step * (args.warmup + args.steps), reference.rate / 1e9,
                         args.budget_s)
    if reason:
        return {**entry, "skipped": reason}
    seconds = bench_train(build(size, layout, DTYPES[dtype_name], device), args.batch, seq,
                          args.warmup, args.steps, device)
    achieved = flops_per_step / seconds
    entry.update(seconds_per_step=seconds, tokens_per_s=args.batch * seq / seconds,
                 model_gflops_per_s=achieved / 1e9, mfu=reference.mfu(achieved),
                 matmul_reference_gflops_per_s=reference.rate / 1e9)
    return entry


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["demo", "cogview-tutorial"],
                   help="model sizes (megatron_t2i.config.MODEL_SIZES)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0: torch's default)")
    p.add_argument("--layout", default="default", choices=sorted(LAYOUTS),
                   help="vocabulary: ours with 32x32-code images, or the released CogView one")
    p.add_argument("--batch", type=int, default=8, help="train micro-batch")
    p.add_argument("--seq-length", type=int, default=0,
                   help="train tokens per sample (0: the full text-to-image sequence)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed train steps")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip a measurement estimated to take longer than this")
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized: batch 1, 128 tokens, 1 warm-up + 2 steps, 60 s budget per "
                        "measurement")
    a = p.parse_args()
    if a.quick:
        a.batch, a.seq_length, a.warmup, a.steps = 1, 128, 1, 2
        a.budget_s = a.budget_s or 60.0
    for flag in ("batch", "warmup", "steps"):
        least = 0 if flag == "warmup" else 1
        if getattr(a, flag) < least:
            p.error(f"--{flag.replace('_', '-')} must be at least {least}, got {getattr(a, flag)}")
    try:
        a.device = resolve_device(a.device)
        a.layout_name, a.layout = a.layout, LAYOUTS[a.layout]()
        for size in a.sizes:
            model_config(size, a.layout)  # unknown sizes fail here, before any measurement
    except ValueError as e:
        p.error(str(e))
    full_seq = a.layout.seq_length("text_to_image") - 1  # the model reads all tokens but the last
    a.seq_length = a.seq_length or full_seq
    if a.seq_length > full_seq:
        p.error(f"--seq-length {a.seq_length} exceeds the text-to-image sequence "
                f"({full_seq} tokens)")
    return a


def main() -> None:
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    result = {"benchmark": "model_throughput", "device": str(a.device),
              "torch_threads": torch.get_num_threads(), "layout": a.layout_name,
              "flops_formula": FORMULA + "; N = matmul weights of the layers, V*h = the tied "
                                         "head; MFU = model FLOP/s / matmul FLOP/s (same dtype)",
              "matmul_gflops_per_s": {}, "train": []}
    for dtype_name in a.dtypes:
        reference = MatmulReference(DTYPES[dtype_name], a.device)
        result["matmul_gflops_per_s"][dtype_name] = reference.rate / 1e9
        result["train"] += [train_entry(size, a.layout, dtype_name, reference, a, a.seq_length,
                                        a.device) for size in a.sizes]
    print_json(result)


if __name__ == "__main__":
    main()
