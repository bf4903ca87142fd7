"""Helpers shared by the benchmarks: timing, the reference matmul rate, JSON output (the device
rule is megatron_t2i.device's, re-exported here as resolve_device and sync).

Every benchmark reports speed against a matmul rate measured in the same run, on the same device
and in the same dtype (megatron_t2i.training.flops.matmul_flops), so a figure such as MFU means
the same on a laptop CPU and on an H200.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_t2i.device import resolve_device, synchronize as sync  # noqa: E402,F401
from megatron_t2i.training.flops import matmul_flops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn, seconds: float, device: torch.device) -> tuple[int, float]:
    """Call fn repeatedly for about `seconds` after one warm-up call -> (calls, elapsed seconds)."""
    fn()
    sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls, elapsed


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32,
                  seconds: float = 1.0, size: int | None = None) -> float:
    """Sustained GFLOP/s of a square size x size matmul in `dtype` on `device`. Default size:
    4096 on a GPU (1024 leaves a large GPU partly idle), 1024 on a CPU."""
    size = size or (4096 if torch.device(device).type == "cuda" else 1024)
    return matmul_flops(dtype, device, size, seconds) / 1e9


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def print_json(result: dict) -> None:
    """One JSON object on stdout, floats to 5 significant digits."""
    print(json.dumps(_rounded(result), indent=2), flush=True)
