"""Throughput of the model itself (no DeepSpeed, no data loading); prints one JSON object.

    python bench/model_throughput.py --quick --threads 1   # a busy CPU, a couple of minutes
    python bench/model_throughput.py                       # a GPU: full sequences, more steps

For each model size and dtype:
  - train: forward + loss + backward tokens/s, and MFU = achieved model FLOP/s / the matmul FLOP/s
    measured in the same run and dtype (model FLOPs from megatron_t2i.training.flops, formula in
    the JSON). Weights are held in the dtype (as DeepSpeed bf16/fp16 training computes).
  - decode: generating one 1024-code image token by token after its text prompt, with the KV cache
    (GPT.allocate_kv_cache: each step runs the new token only) against recomputing the whole prefix
    every step (what the original CogView did). The uncached run times a few steps evenly spaced
    over the image and extrapolates to all 1024 (the JSON says how many were timed).
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
from bench.common import DTYPES, matmul_gflops, pick_device, print_json, sync  # noqa: E402
from megatron_t2i import mpu  # noqa: E402
from megatron_t2i.config import model_config  # noqa: E402
from megatron_t2i.model import GPT, language_model_loss, lm_logits  # noqa: E402
from megatron_t2i.tokenizers.layout import TokenLayout  # noqa: E402
from megatron_t2i.training.flops import FORMULA, model_flops_per_token  # noqa: E402

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


@torch.inference_mode()
def bench_decode(model: GPT, layout: TokenLayout, batch: int, uncached_steps: int,
                 device) -> dict:
    """Decode the image tokens of a text-to-image prompt greedily over the image codes."""
    model.eval()
    codes = layout.image_tokens                                   # 1024 for a 32x32 grid
    prefix = layout.seq_length("text_to_image") - codes - 1                 # [ROI1] text [size] [BOI1]
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(layout.text_offset, layout.special_offset, (batch, prefix),
                           generator=g).to(device)
    weight = model.word_embeddings.weight

    def next_code(logits):  # [B, 1, V] -> [B, 1]: the image codes are ids [0, C)
        return logits[:, -1:, :layout.num_image_codes].argmax(-1)

    def positions(start, end):
        return torch.arange(start, end, device=device).expand(batch, end - start)

    # KV-cached: prefill the prompt once, then one token per step
    cache = model.allocate_kv_cache(batch, prefix + codes)
    sync(device)
    start = time.perf_counter()
    token = next_code(model(prompt, positions(0, prefix), kv_cache=cache))
    sync(device)
    prefill = time.perf_counter() - start
    generated = [token]
    start = time.perf_counter()
    for t in range(prefix, prefix + codes - 1):
        token = next_code(model(token, positions(t, t + 1), kv_cache=cache))
        generated.append(token)
    sync(device)
    cached = prefill + time.perf_counter() - start

    # uncached: every step runs the transformer over the whole sequence so far (logits of the last
    # position only); time steps evenly spaced over the image, so their mean is the mean step
    sequence = torch.cat([prompt] + generated, 1)                 # [B, prefix + codes]
    lengths = torch.linspace(prefix, prefix + codes - 1, uncached_steps).round().long().tolist()
    elapsed, agree = 0.0, 0
    for length in lengths:
        sync(device)
        start = time.perf_counter()
        hidden = model.transformer(model.word_embeddings(sequence[:, :length]),
                                   positions(0, length))
        code = next_code(lm_logits(hidden[:, -1:], weight))
        sync(device)
        elapsed += time.perf_counter() - start
        agree += int(torch.equal(code, sequence[:, length:length + 1]))
    uncached = elapsed / len(lengths) * codes
    return {"batch": batch, "prompt_tokens": prefix, "image_tokens": codes,
            "kv_cached": {"seconds": cached, "prefill_seconds": prefill,
                          "tokens_per_s": batch * codes / cached},
            "uncached": {"seconds_extrapolated": uncached, "timed_steps": len(lengths),
                         "tokens_per_s": batch * codes / uncached,
                         # greedy codes of the timed steps equal to the cached run's (a check
                         # of the cache; low precision may flip near-ties)
                         "same_codes_as_cached": f"{agree}/{len(lengths)}"},
            "kv_cache_speedup": uncached / cached}


def train_entry(size, layout, dtype_name, rate, args, seq, device) -> dict:
    config = model_config(size, layout)
    entry = {"size": size, "dtype": dtype_name, "parameters": config.num_parameters(),
             "batch": args.batch, "seq_length": seq}
    flops_per_step = model_flops_per_token(config, seq) * args.batch * seq
    reason = skip_reason(flops_per_step * (args.warmup + args.steps), rate, args.budget_s)
    if reason:
        return {**entry, "skipped": reason}
    seconds = bench_train(build(size, layout, DTYPES[dtype_name], device), args.batch, seq,
                          args.warmup, args.steps, device)
    achieved = flops_per_step / seconds
    entry.update(seconds_per_step=seconds, tokens_per_s=args.batch * seq / seconds,
                 model_gflops_per_s=achieved / 1e9, mfu=achieved / (rate * 1e9))
    if entry["mfu"] > 1:
        entry["note"] = (f"MFU above 1: the {dtype_name} reference matmul runs slower here than "
                         f"the model's own matmuls (e.g. bf16 emulated on a CPU)")
    return entry


def decode_entry(size, layout, dtype_name, rate, args, device) -> dict:
    config = model_config(size, layout)
    full_seq = layout.seq_length("text_to_image") - 1
    # the uncached steps dominate: each a forward over up to the full sequence
    flops = (model_flops_per_token(config, full_seq, training=False) * full_seq
             * args.decode_batch * args.uncached_steps)
    reason = skip_reason(flops, rate, args.budget_s)
    if reason:
        return {"size": size, "dtype": dtype_name, "skipped": reason}
    return {"size": size, "dtype": dtype_name, **bench_decode(
        build(size, layout, DTYPES[dtype_name], device), layout, args.decode_batch,
        args.uncached_steps, device)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["demo", "cogview-tutorial"],
                   help="model sizes for the train measurement (megatron_t2i.config.MODEL_SIZES)")
    p.add_argument("--decode-sizes", nargs="*", default=None,
                   help="model sizes for the decode measurement (default: --sizes)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0: torch's default); on a busy CPU, 1 avoids threads "
                        "waiting on each other in the many small ops of decoding")
    p.add_argument("--layout", default="default", choices=sorted(LAYOUTS),
                   help="vocabulary: ours with 32x32-code images, or the released CogView one")
    p.add_argument("--batch", type=int, default=8, help="train micro-batch")
    p.add_argument("--seq-length", type=int, default=0,
                   help="train tokens per sample (0: the full text-to-image sequence)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed train steps")
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--uncached-steps", type=int, default=32,
                   help="uncached decoding steps timed (evenly spaced), extrapolated to all")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip a measurement estimated to take longer than this")
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized: batch 1, 128 tokens, 1 warm-up + 2 steps, decode the demo "
                        "size only with 4 uncached steps, 60 s budget per measurement")
    a = p.parse_args()
    if a.quick:
        a.batch, a.seq_length, a.warmup, a.steps = 1, 128, 1, 2
        a.decode_sizes = a.decode_sizes if a.decode_sizes is not None else ["demo"]
        a.uncached_steps, a.budget_s = 4, a.budget_s or 60.0
    if a.decode_sizes is None:
        a.decode_sizes = a.sizes
    for flag in ("batch", "warmup", "steps", "decode_batch", "uncached_steps"):
        least = 0 if flag == "warmup" else 1
        if getattr(a, flag) < least:
            p.error(f"--{flag.replace('_', '-')} must be at least {least}, got {getattr(a, flag)}")
    try:
        a.device = pick_device(a.device)
        a.layout_name, a.layout = a.layout, LAYOUTS[a.layout]()
        for size in set(a.sizes) | set(a.decode_sizes):
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
              "matmul_gflops_per_s": {}, "train": [], "decode": []}
    for dtype_name in a.dtypes:
        rate = matmul_gflops(a.device, DTYPES[dtype_name])
        result["matmul_gflops_per_s"][dtype_name] = rate
        result["train"] += [train_entry(size, a.layout, dtype_name, rate, a, a.seq_length,
                                        a.device) for size in a.sizes]
        result["decode"] += [decode_entry(size, a.layout, dtype_name, rate, a, a.device)
                             for size in a.decode_sizes]
    print_json(result)


if __name__ == "__main__":
    main()
