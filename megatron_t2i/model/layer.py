"""The transformer layer: Sandwich-LN (CogView) around tensor-parallel attention and MLP.

    x -> input_layernorm -> attention -> dropout -> third_layernorm -> + x = h
    h -> post_attention_layernorm -> MLP -> dropout -> fourth_layernorm -> + h

third/fourth LayerNorm exist only with config.sandwich_ln. Dropout sits where the released model
had it (inside attention / MLP, before the sandwich LayerNorm). Activations are [B, S, h].
"""
from __future__ import annotations

import math

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


class GridConv(nn.Module):
    """TLD's depth-wise 3x3 convolution over a denoiser's latent grid, inside the MLP: each of
    this rank's MLP channels at a patch mixes with the same channel at its 8 neighbours (TLD's fix
    for patchy outputs: neighbouring patches agree from the first layer). Residual and zero-
    initialised, so a model with it starts as the one without; tensor-parallel along the MLP's
    channels (dim 0), so every size splits it like dense_h_to_4h's output."""

    def __init__(self, channels: int, device=None, dtype=torch.float32):
        super().__init__()
        tp = mpu.get_tensor_model_parallel_world_size()
        self.weight = nn.Parameter(torch.zeros(channels // tp, 1, 3, 3, device=device,
                                               dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(channels // tp, device=device, dtype=dtype))
        for p in (self.weight, self.bias):
            mpu.set_tensor_model_parallel_attributes(p, True, 0, 1)

    def forward(self, u, grid):
        """u [B, S, c]; grid [B, N]: the sequence position of each latent patch in raster order,
        -1 where the patch is not in this sequence (masked training) -> u with the convolution
        added at the patches."""
        b, n = grid.shape
        side, c = math.isqrt(n), u.shape[-1]
        present = (grid >= 0)[..., None].to(u.dtype)                          # [B, N, 1]
        index = grid.clamp_min(0)[..., None].expand(b, n, c)
        cells = (u.gather(1, index) * present).view(b, side, side, c).permute(0, 3, 1, 2)
        mixed = F.conv2d(cells, self.weight, self.bias, padding=1, groups=c)  # [B, c, n, n]
        mixed = mixed.permute(0, 2, 3, 1).reshape(b, n, c) * present
        return u.scatter_add(1, index, mixed.to(u.dtype))


class MLP(nn.Module):
    """h -> 4h (column-parallel), tanh-GELU, 4h -> h (row-parallel): one all-reduce in forward.
    With config.mlp_conv (a denoiser's), GridConv between the projections."""

    def __init__(self, config, device=None, params_dtype=torch.float32):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        self.dense_h_to_4h = mpu.ColumnParallelLinear(
            h, f, gather_output=False, init_method=normal_init(config.init_std),
            params_dtype=params_dtype, device=device)
        self.dense_4h_to_h = mpu.RowParallelLinear(
            f, h, input_is_parallel=True, init_method=normal_init(output_init_std(config)),
            params_dtype=params_dtype, device=device)
        self.grid_conv = GridConv(f, device, params_dtype) if config.mlp_conv else None

    def forward(self, x, grid=None):  # [B, S, h] -> [B, S, h]
        u = self.dense_h_to_4h(x)
        if self.grid_conv is not None:
            if grid is None:
                raise ValueError("MLP: a model with mlp_conv needs the latent grid's positions")
            u = self.grid_conv(u, grid)
        return self.dense_4h_to_h(F.gelu(u, approximate="tanh"))


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

    def forward(self, x, attention_mask=None, kv_cache: KVCache | None = None, grid=None):
        """x [B, S, h] -> [B, S, h]; attention_mask and kv_cache as in SelfAttention; grid: a
        denoiser's patch positions for the MLP's GridConv."""
        a = F.dropout(self.attention(self.input_layernorm(x), attention_mask, kv_cache),
                      self.hidden_dropout, self.training)
        if self.sandwich_ln:
            a = self.third_layernorm(a)
        h = x + a
        m = F.dropout(self.mlp(self.post_attention_layernorm(h), grid), self.hidden_dropout,
                      self.training)
        if self.sandwich_ln:
            m = self.fourth_layernorm(m)
        return h + m
