"""Heads read the trunk's hidden states: the tied LM head (codes and text) or the denoising head
(x0 of latent patches, model/diffusion.py), named by ModelConfig.head.

Loss functions that go with a head live beside it (language_model_loss); the training objectives
(megatron_t2i/training/objectives.py) build on them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_t2i import mpu


def lm_logits(hidden, word_embeddings_weight, gather: bool = False, num_tokens: int = 0):
    """Tied head, no bias: hidden [B, S, h] · Eᵀ with E this rank's vocab rows [V/tp, h]
    -> logits [B, S, V/tp], or all [B, S, V] when gather (needs an all-gather; the loss does not).

    num_tokens: ids in use; the logits of the padding rows beyond are -inf, so the padding (which
    grows with the tensor-parallel size) never takes probability mass: a TP=2 model computes the
    TP=1 model's losses and samples."""
    logits = F.linear(mpu.copy_to_tensor_model_parallel_region(hidden), word_embeddings_weight)
    local = word_embeddings_weight.shape[0]
    start = mpu.get_tensor_model_parallel_rank() * local
    if 0 < num_tokens < start + local:
        padding = torch.arange(start, start + local, device=logits.device) >= num_tokens
        logits = logits.masked_fill(padding, float("-inf"))
    return mpu.gather_from_tensor_model_parallel_region(logits) if gather else logits


def language_model_loss(logits_parallel, labels, loss_mask):
    """-> (weighted mean loss, per-token loss [B, S]). logits_parallel [B, S, V/tp]; labels [B, S];
    loss_mask [B, S] of 0/1 or weights (e.g. a text-loss scale): mean = Σ w·loss / Σ w."""
    per_token = mpu.vocab_parallel_cross_entropy(logits_parallel.float(), labels)
    weights = loss_mask.float()
    mean = (per_token * weights).sum() / weights.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return mean, per_token


class LMHead(nn.Module):
    """The tied LM head: logits over the vocabulary from the word embedding matrix (no weights of
    its own, so none in the checkpoint)."""

    def __init__(self, config):
        super().__init__()
        self.num_tokens = config.num_tokens

    def forward(self, hidden, word_embeddings_weight, gather: bool = False):
        return lm_logits(hidden, word_embeddings_weight, gather, self.num_tokens)


def _denoise_head(config, device=None, dtype=torch.float32):
    from megatron_t2i.model.diffusion import DenoiseHead
    return DenoiseHead(config, device, dtype)


HEADS = {"lm": lambda config, device=None, dtype=None: LMHead(config), "denoise": _denoise_head}


def build_head(config, device=None, dtype=torch.float32) -> nn.Module:
    if config.head not in HEADS:
        raise ValueError(f"model config: unknown head {config.head!r}; known: {', '.join(HEADS)}")
    return HEADS[config.head](config, device, dtype)
