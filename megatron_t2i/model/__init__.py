"""The GPT over [text | image] tokens (tensor-parallel via mpu): token inputs and embedding slots,
the transformer trunk, heads; and the same pieces as DeepSpeed pipeline stages."""
from megatron_t2i.model.attention import (KVCache, SelfAttention, attention, block_causal_mask,
                                          causal_mask, prefix_visible_mask)
from megatron_t2i.model.gpt import GPT, Slots
from megatron_t2i.model.heads import HEADS, LMHead, language_model_loss, lm_logits
from megatron_t2i.model.layer import MLP, LayerNorm, TransformerLayer
from megatron_t2i.model.trunk import Transformer

__all__ = ["GPT", "Slots", "Transformer", "TransformerLayer", "SelfAttention", "MLP", "LayerNorm",
           "KVCache", "attention", "causal_mask", "prefix_visible_mask", "block_causal_mask",
           "HEADS", "LMHead", "lm_logits", "language_model_loss"]
