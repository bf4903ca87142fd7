"""The transformer layer: Sandwich-LN (CogView) around tensor-parallel attention and MLP.

    x -> input_layernorm -> attention -> dropout -> third_layernorm -> + x = h
    h -> post_attention_layernorm -> MLP -> dropout -> fourth_layernorm -> + h

third/fourth LayerNorm exist only with config.sandwich_ln. Dropout sits where the released model
had it (inside attention / MLP, before the sandwich LayerNorm). Activations are [B, S, h].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_t2i import mpu
from megatron_t2i.model.attention import KVCache, SelfAttention, normal_init, output_init_std


class LayerNorm(nn.LayerNorm):
    """LayerNorm, optionally with PB-relax: the input is first divided by max|x| / 8.

    LayerNorm is scale-invariant (up to eps), so the result is the same, but the fp16 intermediate
    x² can no longer overflow. The max is taken per token (over the hidden dim), not over the whole
    tensor as in the released code: a token's output then never depends on the other tokens or
    samples of the batch, so KV-cached decoding equals full recomputation and a sample does not
    change with its batch companions. We only ever scale down (divisor >= 1): below |x| = 8
    nothing can overflow, and dividing by a tiny max would itself underflow.
    """

    def __init__(self, hidden_size: int, eps: float, pb_relax: bool, device=None, dtype=None):
        super().__init__(hidden_size, eps=eps, device=device, dtype=dtype)
        self.pb_relax = pb_relax

    def forward(self, x):
        if self.pb_relax:
            # detached: by scale invariance the divisor's gradient is ~0, no need to backprop it
            x = x / (x.detach().abs().amax(-1, keepdim=True) / 8).clamp_min(1)
        return super().forward(x)


class MLP(nn.Module):
    """h -> 4h (column-parallel), tanh-GELU, 4h -> h (row-parallel): one all-reduce in forward."""

    def __init__(self, config, device=None, params_dtype=torch.float32):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        self.dense_h_to_4h = mpu.ColumnParallelLinear(
            h, f, gather_output=False, init_method=normal_init(config.init_std),
            params_dtype=params_dtype, device=device)
        self.dense_4h_to_h = mpu.RowParallelLinear(
            f, h, input_is_parallel=True, init_method=normal_init(output_init_std(config)),
            params_dtype=params_dtype, device=device)

    def forward(self, x):  # [B, S, h] -> [B, S, h]
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class TransformerLayer(nn.Module):
    """One layer; attribute names are the CogView checkpoint keys under transformer.layers.{i}."""

    def __init__(self, config, layer_number: int, device=None, params_dtype=torch.float32):
        super().__init__()

        def layernorm():
            return LayerNorm(config.hidden_size, config.layernorm_epsilon, config.pb_relax,
                             device=device, dtype=params_dtype)

        self.input_layernorm = layernorm()
        self.attention = SelfAttention(config, layer_number, device, params_dtype)
        self.post_attention_layernorm = layernorm()
        self.mlp = MLP(config, device, params_dtype)
        if config.sandwich_ln:
            self.third_layernorm = layernorm()
            self.fourth_layernorm = layernorm()
        self.sandwich_ln = config.sandwich_ln
        # on the default RNG stream: these activations are replicated over TP ranks, so every rank
        # (and a TP=1 run with the same seed) must drop the same elements
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x, attention_mask=None, kv_cache: KVCache | None = None):
        """x [B, S, h] -> [B, S, h]; attention_mask and kv_cache as in SelfAttention."""
        a = F.dropout(self.attention(self.input_layernorm(x), attention_mask, kv_cache),
                      self.hidden_dropout, self.training)
        if self.sandwich_ln:
            a = self.third_layernorm(a)
        h = x + a
        m = F.dropout(self.mlp(self.post_attention_layernorm(h)), self.hidden_dropout,
                      self.training)
        if self.sandwich_ln:
            m = self.fourth_layernorm(m)
        return h + m
