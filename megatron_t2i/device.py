"""Which device a process computes on: the one rule for training, generation and benchmarks."""
from __future__ import annotations

import os

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto': this process's GPU (LOCAL_RANK under a launcher) if there is one, else the CPU;
    or the device named (cpu, cuda, cuda:N), made current. One line when CUDA is missing."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available")
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)
        return device
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def synchronize(device) -> None:
    """Wait for queued GPU work, so wall-clock time covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
