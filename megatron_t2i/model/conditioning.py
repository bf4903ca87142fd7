"""A condition vector in place of a caption: a (unit) CLIP embedding [B, D] becomes `slots` input
embeddings [B, k, h] that the trunk reads at the [MASK] placeholders of the condition_to_image
template (`slot_inputs`; GPT.forward and the pipeline's ConditionPipe read them). Rows without a condition (dropped in training for
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

    def project(self, condition: torch.Tensor, present: torch.Tensor | None = None):
        """condition [B, D], present bool [B] (None: all) -> slot embeddings [B, k, h]. (A method,
        not forward: the pipeline's ConditionPipe is a ConditionProjector with a layer's forward.)"""
        if condition.dim() != 2 or condition.shape[1] != self.proj.in_features:
            raise ValueError(f"a condition of shape {tuple(condition.shape)}, this model's takes "
                             f"[batch, {self.proj.in_features}] (embeddings of another CLIP?)")
        out = self.proj(condition.to(self.proj.weight.dtype)).view(len(condition), self.slots, -1)
        if present is None:
            return out
        return torch.where(present.view(-1, 1, 1), out, self.null.expand_as(out))


def slot_inputs(projector: ConditionProjector, slot_token: int, tokens, condition,
                condition_mask=None):
    """The projected condition [B, D] (the null embedding where condition_mask [B] is False) at
    the slot_token placeholders of tokens [B, S], `projector.slots` of them in every row that has
    any -> (values [B, S, h], where [B, S] bool)."""
    where = tokens == slot_token                                            # [B, S]
    k = projector.slots
    per_row = where.sum(1)
    if not bool(((per_row == k) | (per_row == 0)).all()):
        raise ValueError(f"a conditioned row needs its {k} slot placeholders together, found "
                         f"{per_row.tolist()}")
    values = projector.project(condition, condition_mask)                         # [B, k, h]
    dense = values.new_zeros(*tokens.shape, values.shape[-1])
    dense[where] = values[per_row == k].reshape(-1, values.shape[-1])
    return dense, where
