"""Training throughput of the real set-up (DeepSpeed engine, loop, loss), printed as JSON.

For each model size: tokens/s and model FLOPs utilisation (MFU = model FLOP/s / matmul FLOP/s
measured in the same run, device and dtype), over timed optimiser steps after warm-up steps.

    python bench/train_throughput.py --quick            # CPU: demo + a few tutorial steps
    python bench/train_throughput.py --sizes cogview-tutorial --dtype bf16 --steps 20   # a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_t2i import mpu  # noqa: E402
from megatron_t2i.data.lmdb_store import write_token_dataset  # noqa: E402
from megatron_t2i.tokenizers.layout import TokenLayout  # noqa: E402
from megatron_t2i.training.flops import FORMULA  # noqa: E402
from megatron_t2i.training.config import TrainConfig  # noqa: E402
from megatron_t2i.training.setup import prepare  # noqa: E402


def random_dataset(path: str, layout: TokenLayout, count: int = 64) -> str:
    rng = np.random.default_rng(0)
    records = [(rng.integers(0, layout.num_text_tokens, layout.max_text_tokens),
                rng.integers(0, layout.num_image_codes, layout.image_tokens), f"r{i}")
               for i in range(count)]
    write_token_dataset(path, records, layout)
    return path


def measure(size: str, data: str, dtype: str, micro_batch: int, warmup: int, steps: int) -> dict:
    trainer = prepare(TrainConfig(
        data_path=(data,), model_size=size, train_iters=warmup + steps,
        micro_batch_size=micro_batch, holdout_fraction=0.0, fp16=dtype == "fp16",
        bf16=dtype == "bf16", model_overrides={"hidden_dropout": 0.0, "attention_dropout": 0.0}))
    for _ in range(warmup):
        trainer.train_step()
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    trainer.work = [0, 0.0]  # tokens fed and their model FLOPs, counted by train_step
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    tokens = trainer.work[0] / steps
    flops = trainer.work[1] / steps / seconds
    mpu.destroy_model_parallel()
    return {"model_size": size, "dtype": dtype, "parameters": trainer.config.num_parameters(),
            "seq_length": int(tokens) // micro_batch, "micro_batch": micro_batch,
            "seconds_per_step": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
            "model_tflops_per_s": round(flops / 1e12, 4),
            "matmul_tflops_per_s": round(trainer.reference.rate / 1e12, 4),
            "mfu": round(trainer.reference.mfu(flops), 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["demo", "cogview-tutorial"])
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="few steps, small batch (CPU)")
    a = p.parse_args()
    if a.quick:
        a.micro_batch_size, a.warmup, a.steps = 2, 1, 3
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = random_dataset(os.path.join(tmp, "tokens.lmdb"), TokenLayout())
        for size in a.sizes:
            results.append(measure(size, data, a.dtype, a.micro_batch_size, a.warmup, a.steps))
    print(json.dumps({"benchmark": "train_throughput", "device": str(torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")), "flops_formula": FORMULA,
        "results": results}, indent=2))


if __name__ == "__main__":
    main()
