"""Choosing the next token from logits: temperature, top-k, top-p, classifier-free guidance, and
per-sample random streams.

Every function works on a batch of rows [B, V] and treats each row on its own: top-p keeps, per
row, the smallest set of most probable tokens whose mass exceeds p (the original code summed the
probabilities of the whole batch, so it was right only at batch 1).

Per-sample seeds: `sample` draws row i with its own torch.Generator, so a sample depends only on
its seed and its logits, never on which other samples share the batch or on the batch size. The
draw is the Gumbel-max trick, argmax(logits / T + G) with G = -log(-log U), U uniform: exactly a
draw from softmax(logits / T), and one fixed-size block of uniforms per row and step whatever the
filtering left, so a row's random stream advances identically in every batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0      # keep the k most probable tokens (0: all)
    top_p: float = 0.0  # keep the most probable tokens until their mass exceeds p (0: all)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"sampling: temperature must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"sampling: top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.top_p < 1.0:
            raise ValueError(f"sampling: top_p must be in [0, 1) (0 disables it), got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """logits [..., V] (a row per position) -> a copy with every token outside each row's top-k / top-p set at -inf.

    Ties at the k-th value are all kept. A row always keeps at least its most probable token."""
    logits = logits.clone()
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # per row
        # drop a token when the tokens ranked above it already hold more than top_p of the mass
        drop = torch.zeros_like(cumulative, dtype=torch.bool)
        drop[..., 1:] = cumulative[..., :-1] > top_p
        logits.masked_fill_(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def classifier_free_guidance(cond_logits: torch.Tensor, uncond_logits: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """cond + scale * (cond - uncond): push the distribution away from what the model predicts
    without the text. scale 0 is plain conditional sampling."""
    return cond_logits + scale * (cond_logits - uncond_logits)


def gumbel_noise(shape, generators: list[torch.Generator] | None, device) -> torch.Tensor:
    """Standard Gumbel noise [B, ..., V]; row i from generators[i] (all from the default generator when
    None)."""
    if generators is None:
        uniform = torch.rand(shape, device=device)
    else:
        if len(generators) != shape[0]:
            raise ValueError(f"sampling: {len(generators)} generators for a batch of {shape[0]} rows")
        uniform = torch.stack([torch.rand(shape[1:], generator=g, device=device)
                               for g in generators])
    # U = 0 gives -inf noise (never chosen); U < 1 always, so the inner log is finite
    return -torch.log(-torch.log(uniform))


def sample(logits: torch.Tensor, config: SamplingConfig = SamplingConfig(),
           generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """logits [B, V] -> one token id per row, LongTensor [B]; logits [B, N, V] (N positions drawn
    together, block-parallel decoding) -> [B, N], row i's N draws from generators[i]. Tokens
    masked to -inf beforehand (e.g. outside the allowed vocabulary) are never drawn."""
    logits = filter_logits(logits.float() / config.temperature, config.top_k, config.top_p)
    noise = gumbel_noise(logits.shape, generators, logits.device)
    return (logits + noise).argmax(dim=-1)
