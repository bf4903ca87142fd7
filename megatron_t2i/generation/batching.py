"""Many samples of one query: per-sample seeds and rounds of at most max_inference_batch_size.

Sample k of query q draws from its own generator seeded with hash(seed, q, k), so an image depends
neither on the round it falls in nor on how many samples share its batch: the same seed gives the
same image in the scripts, the web demo and evaluation.
"""
from __future__ import annotations

import hashlib
import math

import torch


def sample_seed(seed: int, query_index: int, sample_index: int) -> int:
    """A 63-bit seed of one sample, a hash of (seed, query, sample): independent streams per
    sample, the same on every run, rank and batch composition."""
    digest = hashlib.blake2b(f"{seed}/{query_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def query_seeds(seed: int, query_index: int, count: int) -> list[int]:
    return [sample_seed(seed, query_index, k) for k in range(count)]


def in_rounds(seeds: list[int], size: int, device, draw, on_round=None, label: str = ""):
    """draw(generators, round_label) -> a tensor of len(generators) rows, called for each round of
    at most `size` seeds; their rows concatenated (CPU). on_round(rows, first_row) is called as each
    round is done (e.g. to write its images at once)."""
    out, rounds = [], math.ceil(len(seeds) / size)
    for start in range(0, len(seeds), size):
        generators = [torch.Generator(device=device).manual_seed(s)
                      for s in seeds[start:start + size]]
        round_label = f"{label} round {start // size + 1}/{rounds}" if rounds > 1 else label
        out.append(draw(generators, round_label).cpu())
        if on_round is not None:
            on_round(out[-1], start)
    return torch.cat(out)
