"""A condition vector in place of a caption: a (unit) CLIP embedding [B, D] becomes `slots` input
embeddings [B, k, h] that the trunk reads at the [MASK] placeholders of the condition_to_image
template (GPT.forward builds the Slots). Rows without a condition (dropped in training for
classifier-free guidance, and the unconditional branch at sampling) read a learned null embedding.

Replicated on every tensor-parallel rank: its input is the same everywhere and it is built from
the same seed (trunk.seed_component), so every rank holds and trains the same weights.
"""
from __future__ import annotations

import torch
from torch import nn


class ConditionProjector(nn.Module):
    def __init__(self, config, device=None, dtype=torch.float32):
        super().__init__()
        k, h = config.condition_slots, config.hidden_size
        self.slots = k
        self.proj = nn.Linear(config.condition_dim, k * h, device=device, dtype=dtype)
        self.null = nn.Parameter(torch.empty(k, h, device=device, dtype=dtype))
        # a unit vector through N(0, std) weights gives embeddings of the token embeddings' scale
        for p in (self.proj.weight, self.null):
            nn.init.normal_(p, mean=0.0, std=config.init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, condition: torch.Tensor, present: torch.Tensor | None = None):
        """condition [B, D], present bool [B] (None: all) -> slot embeddings [B, k, h]."""
        out = self.proj(condition.to(self.proj.weight.dtype)).view(len(condition), self.slots, -1)
        if present is None:
            return out
        return torch.where(present.view(-1, 1, 1), out, self.null.expand_as(out))
