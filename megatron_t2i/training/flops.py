"""Model FLOPs and a reference matmul rate, so speed is reported as a ratio (MFU), not a bare number.

MFU = achieved model FLOP/s / matmul FLOP/s measured on the same device, dtype and run. Against a
rate measured in the same run, a figure means the same on a laptop CPU and on an H200.
"""
from __future__ import annotations

import logging
import time

import torch

from megatron_t2i.device import synchronize

logger = logging.getLogger("megatron_t2i.train")

FORMULA = "6*N_params_nonembedding + 6*V*h (head) + 12*layers*hidden*seq (attention), per token"


def model_flops(config, batch: int, seq_length: int, kept_length: int | None = None,
                training: bool = True) -> float:
    """Forward+backward FLOPs (x3 of forward; forward only when `training` is False) of `batch`
    sequences of seq_length tokens: the trunk's layers over kept_length of them (a denoiser's
    masked training, model/masked.py; default all), a mask decoder's layers and the head over
    every one. The head is the LM head's vocabulary, or a denoiser's patch projections in and out
    (its noise MLP runs once per sequence: left out); embeddings (lookups) are excluded."""
    h, f = config.hidden_size, config.ffn_hidden_size
    kept = seq_length if kept_length is None else kept_length

    def layers(count: int, tokens: int) -> float:  # matmul weights, then QK^T and AV
        return count * tokens * (2 * (4 * h * h + 2 * h * f) + 4 * h * tokens)

    head = 2 * config.latent_channels * h if config.latent_channels else config.vocab_size * h
    forward = batch * (layers(config.num_layers, kept) + layers(config.decoder_layers, seq_length)
                       + seq_length * 2 * head)
    return 3 * forward if training else forward


def model_flops_per_token(config, seq_length: int, training: bool = True) -> float:
    """model_flops of one unmasked sequence, per token."""
    return model_flops(config, 1, seq_length, training=training) / seq_length


def matmul_flops(dtype=torch.float32, device="cpu", size: int | None = None,
                 seconds: float = 0.5) -> float:
    """Sustained FLOP/s of a square matmul on `device` in `dtype` (the reference for MFU).
    size: default 4096 on GPUs (smaller ones do not reach peak), 512 on CPUs (where bf16 matmuls
    can run at well under a GFLOP/s)."""
    device = torch.device(device)
    size = size or (4096 if device.type == "cuda" else 512)
    g = torch.Generator().manual_seed(0)  # private: leaves the training RNG streams untouched
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)

    for _ in range(2):  # warm-up: kernels, clocks, allocator
        a @ b
    synchronize(device)
    n, start = 0, time.perf_counter()
    while True:
        a @ b
        n += 1
        if n % 4 == 0:
            synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2 * size ** 3 * n / elapsed


class MatmulReference:
    """The FLOP/s that MFU divides by, per device: a given peak (e.g. a GPU's datasheet figure),
    or measured here as the best of several matmul probes, probed again every `reprobe` calls
    of mfu(). A matmul probed while the machine is busy reads low; the best of many does not, and
    the model's own achieved rate is a matmul rate too: when it exceeds the probes, the reference
    is raised to it (logged once), so the MFU reported never exceeds 1."""

    def __init__(self, dtype=torch.float32, device="cpu", peak: float | None = None,
                 probes: int = 3, reprobe: int = 10):
        self.dtype, self.device, self.given = dtype, torch.device(device), peak is not None
        self.calls, self.reprobe, self.raised = 0, reprobe, False
        self.rate = peak if self.given else max(
            matmul_flops(dtype, self.device, seconds=0.2) for _ in range(probes))

    def mfu(self, achieved: float) -> float:
        """achieved model FLOP/s per device -> its share of the reference, in [0, 1]."""
        self.calls += 1
        if not self.given and (self.calls % self.reprobe == 0 or achieved > self.rate):
            self.rate = max(self.rate, matmul_flops(self.dtype, self.device, seconds=0.1))
        if achieved > self.rate:
            if not self.raised:
                logger.warning(
                    "the model ran at %.1f GFLOP/s, above the matmul reference %.1f GFLOP/s%s: "
                    "the reference is raised to it", achieved / 1e9, self.rate / 1e9,
                    " (--peak-flops)" if self.given else " (probed while the machine was busy)")
                self.raised = True
            self.rate = achieved
        return achieved / self.rate
