"""Self-attention: fused tensor-parallel QKV, PB-relax scores, attention masks and a KV cache.

Shapes: B batch, S new tokens (queries), T keys attended (cached + new), h hidden size, n heads on
this rank (num_attention_heads / tp), d head dim. Masks are bool [B or 1, 1, S, T], True = may
attend; every query must be allowed at least one key.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from megatron_t2i import mpu


def normal_init(std: float):
    """init_method for the mpu layers: N(0, std) on the full weight."""
    def init(weight):
        return nn.init.normal_(weight, mean=0.0, std=std)
    return init


# ----------------------------------------------------------------------------------------------
# Masks

def causal_mask(s: int, total: int | None = None, device=None) -> torch.Tensor:
    """[1, 1, s, total]: the last s positions of a `total`-long sequence (default s), each seeing
    itself and everything before it. With total > s these are the rows of a cached decoding step."""
    total = s if total is None else total
    return torch.ones(s, total, dtype=torch.bool, device=device).tril(total - s)[None, None]


def prefix_visible_mask(s: int, prefix_len: int, device=None) -> torch.Tensor:
    """[1, 1, s, s]: the first prefix_len positions see the whole prefix (bidirectional, e.g. a
    conditioning text or image); every later position is causal."""
    mask = causal_mask(s, device=device).clone()
    mask[..., :prefix_len, :prefix_len] = True
    return mask


def block_causal_mask(block_ids: torch.Tensor) -> torch.Tensor:
    """block_ids [S] or [B, S] (integers) -> [1 or B, 1, S, S]: position i sees position j iff
    block_ids[j] <= block_ids[i], i.e. full attention inside a block and to every earlier block
    (block-parallel decoding generates all tokens of a block in one step)."""
    ids = block_ids if block_ids.dim() == 2 else block_ids[None]
    return ids[:, None, None, :] <= ids[:, None, :, None]


# ----------------------------------------------------------------------------------------------
# Attention core

def attention(q, k, v, mask=None, dropout_p: float = 0.0, pb_relax_alpha: float | None = None):
    """softmax(q kᵀ / √d) v.  q [B, n, S, d], k and v [B, n, T, d] -> [B, n, S, d].

    mask None means causal over a whole sequence (S == T), or one new token seeing every cached
    key (S == 1); a step of several new tokens after cached ones must pass its mask.
    pb_relax_alpha None: PyTorch SDPA (exact for any bool mask). A number α: CogView's PB-relax,
    S = (q / (α√d)) kᵀ, softmax((S - max S)·α): the same value, but no fp16 intermediate can
    overflow (QKᵀ itself can exceed 65504 in late training).
    Probability dropout runs under the TP RNG tracker: heads differ per rank, so must the masks.
    """
    s, t = q.shape[2], k.shape[2]
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4
                             or tuple(mask.shape[-2:]) != (s, t)):
        raise ValueError(f"attention_mask: expected a bool tensor [B or 1, 1, {s}, {t}] "
                         f"(queries x keys), got {mask.dtype} {list(mask.shape)}")
    if mask is None and 1 < s < t:
        raise ValueError(f"attention: {s} new tokens after {t - s} cached ones need an explicit "
                         f"attention_mask (e.g. causal_mask({s}, {t}) or the decoding state's)")
    if mask is None and s > 1 and pb_relax_alpha is not None:
        mask = causal_mask(s, t, q.device)
    with mpu.get_rng_tracker().fork() if dropout_p > 0 else nullcontext():
        if pb_relax_alpha is None:  # SDPA's own causal mask (s == t) allows its fused kernels
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                  is_causal=mask is None and s == t)
        scores = torch.matmul(q / (pb_relax_alpha * math.sqrt(q.shape[-1])), k.transpose(-1, -2))
        if mask is not None:  # [B, n, S, T]
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax((scores - scores.amax(-1, keepdim=True)) * pb_relax_alpha, dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        return torch.matmul(probs, v)


# ----------------------------------------------------------------------------------------------
# KV cache

class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding (under no_grad).

    keys / values: one [B, n, max_len, d] tensor per layer, of which the first `length` positions
    are filled. A forward step with S new tokens writes their keys and values in place at
    [length, length + S) of each layer (SelfAttention.forward via `update`), attends to all
    length + S, and the model then calls `advance(S)`. Nothing of the prefix is recomputed.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int):
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    def allocate(self, batch: int, max_len: int, dtype=torch.float32, device=None) -> "KVCache":
        shape = (batch, self.num_heads, max_len, self.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.values = [torch.empty_like(k) for k in self.keys]
        self.length = 0
        return self

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def reset(self) -> None:
        """Forget the cached tokens (the memory stays allocated)."""
        self.length = 0

    def select(self, indices: torch.Tensor) -> None:
        """Keep the batch rows `indices` [B'] (they may repeat or reorder, e.g. beam search)."""
        self.keys = [k.index_select(0, indices) for k in self.keys]
        self.values = [v.index_select(0, indices) for v in self.values]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, n, S, d] of `layer` after the cached ones; -> all keys, values [B, n, T, d]."""
        if not self.keys:
            raise ValueError("KV cache: call allocate(batch, max_len) before decoding")
        end = self.length + k.shape[2]
        if k.shape[0] != self.batch_size or end > self.max_len:
            raise ValueError(f"KV cache: batch {k.shape[0]} with {end} tokens does not fit the "
                             f"cache allocated for batch {self.batch_size}, {self.max_len} tokens")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        """Forget the cached tokens after the first `length` (roll back a decoding step)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KV cache: cannot truncate {self.length} cached tokens to {length}")
        self.length = length


# ----------------------------------------------------------------------------------------------
# The module

class SelfAttention(nn.Module):
    """Fused-QKV tensor-parallel self-attention. Attribute names follow the CogView checkpoint."""

    def __init__(self, config, layer_number: int, device=None, params_dtype=torch.float32):
        super().__init__()
        tp = mpu.get_tensor_model_parallel_world_size()
        config.check_tensor_parallel(tp)
        self.layer_number = layer_number  # index of this layer's slot in a KVCache
        self.num_heads = config.num_attention_heads // tp
        self.head_dim = config.head_dim
        self.dropout_p = config.attention_dropout
        self.pb_relax_alpha = config.pb_relax_alpha if config.pb_relax else None
        h = config.hidden_size
        # stride 3: this rank holds rows [Q_r; K_r; V_r] of the full [Q; K; V], i.e. its own heads.
        self.query_key_value = mpu.ColumnParallelLinear(
            h, 3 * h, gather_output=False, init_method=normal_init(config.init_std), stride=3,
            params_dtype=params_dtype, device=device)
        self.dense = mpu.RowParallelLinear(
            h, h, input_is_parallel=True, init_method=normal_init(output_init_std(config)),
            params_dtype=params_dtype, device=device)

    def forward(self, x, attention_mask=None, kv_cache: KVCache | None = None):
        """x [B, S, h] (replicated over TP ranks) -> [B, S, h] (summed over TP ranks)."""
        b, s, _ = x.shape
        qkv = self.query_key_value(x)  # [B, S, 3·n·d], laid out [Q_r | K_r | V_r], heads inside
        q, k, v = qkv.view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_number, k, v)  # [B, n, T, d]
        context = attention(q, k, v, attention_mask, self.dropout_p if self.training else 0.0,
                            self.pb_relax_alpha)  # [B, n, S, d]
        return self.dense(context.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


def output_init_std(config) -> float:
    """Output projections (attention.dense, mlp.dense_4h_to_h) are scaled by 1/sqrt(2·layers) so
    the residual stream's variance does not grow with depth (GPT-2)."""
    return config.init_std / math.sqrt(2 * config.num_layers)
