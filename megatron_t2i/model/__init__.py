"""The GPT over [text | image] tokens (tensor-parallel via mpu)."""
from megatron_t2i.model.attention import (KVCache, SelfAttention, attention, block_causal_mask,
                                          causal_mask, prefix_visible_mask)
from megatron_t2i.model.gpt import GPT, Transformer, language_model_loss, lm_logits
from megatron_t2i.model.layer import MLP, LayerNorm, TransformerLayer

__all__ = ["GPT", "Transformer", "TransformerLayer", "SelfAttention", "MLP", "LayerNorm",
           "KVCache", "attention", "causal_mask", "prefix_visible_mask", "block_causal_mask",
           "lm_logits", "language_model_loss"]
