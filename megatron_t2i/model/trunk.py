"""The transformer trunk: input embeddings [B, S, h] in, final hidden states [B, S, h] out.

Position embeddings + embedding dropout, the layers, the final LayerNorm. It knows nothing of
tokens or heads: the GPT puts token embeddings (and float embedding slots) in front of it and a
head behind it, the pipeline stages cut the same pieces into a flat list. Module names are the
CogView checkpoint keys under `transformer.` (`position_embeddings`, `layers.{i}`,
`final_layernorm`).
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_t2i import mpu
from megatron_t2i.model.attention import KVCache, normal_init
from megatron_t2i.model.layer import LayerNorm, TransformerLayer


def seed_component(seed: int | None, index: int) -> None:
    """With a seed, build component `index` (0 word embeddings, 1 position embeddings, 2+i layer i,
    L+2 final LayerNorm, L+3 the conditioning projector) from seed + index: DeepSpeed's seed_layers
    rule, so the GPT and its pipeline stages (model/pipeline.py) start from the same weights
    whatever the pipeline size."""
    if seed is not None:
        mpu.model_parallel_seed(seed + index)


def check_inputs(tokens, position_ids, limit: int, cached: bool = False,
                 what: str = "GPT") -> None:
    """tokens and position_ids must both be [B, S]; a sequence longer than the position table
    (`limit`) is fine only when its position ids restart (super-resolution), and only then are
    the ids themselves looked at (a device sync)."""
    if tokens.dim() != 2 or tokens.shape != position_ids.shape:
        raise ValueError(f"{what}: tokens and position_ids must both be [batch, seq], got "
                         f"{list(tokens.shape)} and {list(position_ids.shape)}")
    if not cached and tokens.shape[1] > limit and int(position_ids.max()) >= limit:
        raise ValueError(f"{what}: sequence of {tokens.shape[1]} tokens has position ids up to "
                         f"{int(position_ids.max())}, beyond max_position_embeddings {limit}")


class Transformer(nn.Module):
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

    def embed(self, input_embeds, position_ids):
        """input_embeds [B, S, h] + position embeddings of position_ids [B, S], then dropout."""
        return self.embedding_dropout(input_embeds + self.position_embeddings(position_ids))

    def forward(self, input_embeds, position_ids, attention_mask=None,
                kv_cache: KVCache | None = None, grid=None):
        """-> final hidden states [B, S, h]. attention_mask: bool [B or 1, 1, S, T] (True = may
        attend), None for causal; with kv_cache the S inputs follow the cached ones; grid [B, N]:
        a denoiser's latent patch positions (layer.GridConv)."""
        x = self.embed(input_embeds, position_ids)
        recompute = self.checkpoint_activations and kv_cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            # checkpointing keeps only each layer's input; mpu.checkpoint replays the RNG states
            # so the recomputed dropout masks are the ones of the first pass
            x = mpu.checkpoint(layer, x, attention_mask, None, grid) if recompute \
                else layer(x, attention_mask, kv_cache, grid)
        if kv_cache is not None:
            kv_cache.advance(x.shape[1])
        return self.final_layernorm(x)
