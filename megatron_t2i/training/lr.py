"""Learning-rate schedules: linear warm-up, then cosine, linear or constant decay to a floor.

`lr_factor` is a pure function of the step, so a resumed run needs only the step count (the torch
LambdaLR that wraps it saves exactly that in checkpoints).
"""
from __future__ import annotations

import math

import torch

STYLES = ("cosine", "linear", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, style: str = "cosine",
              min_ratio: float = 0.1) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based)."""
    if style not in STYLES:
        raise ValueError(f"unknown lr decay style {style!r}; expected one of {', '.join(STYLES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if style == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if style == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer, total_steps: int, warmup_fraction: float = 0.1,
                    style: str = "cosine", min_ratio: float = 0.1):
    warmup = int(round(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, style, min_ratio))
