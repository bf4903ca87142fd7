"""The GPT over [text | image] tokens: embeddings, layer stack, tied head, and the LM loss.

Module names reproduce the CogView checkpoint keys (`word_embeddings`, `transformer.
position_embeddings`, `transformer.layers.{i}`, `transformer.final_layernorm`), so importing a
released model is a key-for-key copy. The pieces (Transformer's embedding / layers / final norm,
`lm_logits`, `language_model_loss`) are separate so the pipeline version reuses them.

Build on the meta device to count parameters without allocating:
    GPT(model_config("cogview-4b"), device="meta")
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_t2i import mpu
from megatron_t2i.model.attention import KVCache, normal_init
from megatron_t2i.model.layer import LayerNorm, TransformerLayer


def seed_component(seed: int | None, index: int) -> None:
    """With a seed, build component `index` (0 word embeddings, 1 position embeddings, 2+i layer i,
    L+2 final LayerNorm) from seed + index: DeepSpeed's seed_layers rule, so the GPT and its
    pipeline stages (model/pipeline.py) start from the same weights whatever the pipeline size."""
    if seed is not None:
        mpu.model_parallel_seed(seed + index)


class Transformer(nn.Module):
    """Position embeddings + embedding dropout, the layers, and the final LayerNorm."""

    def __init__(self, config, device=None, params_dtype=torch.float32, seed: int | None = None):
        super().__init__()
        seed_component(seed, 1)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                config.hidden_size, device=device,
                                                dtype=params_dtype)
        normal_init(config.init_std)(self.position_embeddings.weight)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)  # default stream: replicated
        layers = []
        for i in range(config.num_layers):
            seed_component(seed, 2 + i)
            layers.append(TransformerLayer(config, i, device, params_dtype))
        self.layers = nn.ModuleList(layers)
        seed_component(seed, config.num_layers + 2)
        self.final_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon,
                                         config.pb_relax, device=device, dtype=params_dtype)
        self.checkpoint_activations = config.checkpoint_activations

    def embed(self, word_embeds, position_ids):
        """word_embeds [B, S, h] + position embeddings of position_ids [B, S], then dropout."""
        return self.embedding_dropout(word_embeds + self.position_embeddings(position_ids))

    def forward(self, word_embeds, position_ids, attention_mask=None,
                kv_cache: KVCache | None = None):
        """-> final hidden states [B, S, h]. With kv_cache, the S tokens follow the cached ones."""
        x = self.embed(word_embeds, position_ids)
        recompute = self.checkpoint_activations and kv_cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            # checkpointing keeps only each layer's input; mpu.checkpoint replays the RNG states
            # so the recomputed dropout masks are the ones of the first pass
            x = mpu.checkpoint(layer, x, attention_mask) if recompute \
                else layer(x, attention_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(x.shape[1])
        return self.final_layernorm(x)


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


class GPT(nn.Module):
    def __init__(self, config, device=None, params_dtype=torch.float32, seed: int | None = None):
        """seed: build each component from its own seed (see seed_component); without it, from
        the default RNG's current state."""
        super().__init__()
        self.config = config
        seed_component(seed, 0)
        self.word_embeddings = mpu.VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, init_method=normal_init(config.init_std),
            params_dtype=params_dtype, device=device)
        self.transformer = Transformer(config, device, params_dtype, seed)

    def forward(self, tokens, position_ids, attention_mask=None, kv_cache: KVCache | None = None,
                gather_logits: bool = False):
        """tokens, position_ids [B, S] -> logits [B, S, V/tp] (all V with gather_logits).

        attention_mask: bool [B or 1, 1, S, T] (True = may attend), T = cached + S tokens;
        None means causal. kv_cache: decode incrementally, the S tokens following the cached ones.
        """
        if tokens.dim() != 2 or tokens.shape != position_ids.shape:
            raise ValueError(f"GPT: tokens and position_ids must both be [batch, seq], got "
                             f"{list(tokens.shape)} and {list(position_ids.shape)}")
        # a sequence may be longer than the position table when its position ids restart
        # (super-resolution); only then are the ids themselves looked at (a device sync)
        limit = self.config.max_position_embeddings
        if kv_cache is None and tokens.shape[1] > limit and int(position_ids.max()) >= limit:
            raise ValueError(f"GPT: sequence of {tokens.shape[1]} tokens has position ids up to "
                             f"{int(position_ids.max())}, beyond max_position_embeddings {limit}")
        hidden = self.transformer(self.word_embeddings(tokens), position_ids, attention_mask,
                                  kv_cache)
        return lm_logits(hidden, self.word_embeddings.weight, gather_logits,
                         self.config.num_tokens)

    def allocate_kv_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        """A KV cache for `batch` sequences of up to `max_len` tokens, on this rank's heads; dtype
        and device default to the model's."""
        attn = self.transformer.layers[0].attention
        weight = self.word_embeddings.weight
        return KVCache(len(self.transformer.layers), attn.num_heads, attn.head_dim).allocate(
            batch, max_len, dtype or weight.dtype, device or weight.device)
