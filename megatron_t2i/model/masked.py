"""MaskDiT's masked-patch training of a denoiser (model/diffusion.py).

In training the trunk reads the caption (or condition), the noise level and a random share of the
latent patches only: the hidden patches' placeholders are dropped from its sequence, which is the
saving. A small decoder of the trunk's own layers then reads every position: the trunk's output
where it has one, a learned mask token at its cell's grid position where a patch was hidden, and
the denoising head reads the decoder. Sampling, evaluation and the unmasked fine-tune at the end
of training read every patch; the decoder then sees no mask token. With every patch visible the
trunk's inputs are the whole sequence in order, so the model is exactly the unmasked one.

    visible [B, N] bool: the patches the trunk reads, the same count in every row. The data
    loader draws them from each sample's seed, so every tensor-parallel rank of a data-parallel
    replica drops the same ones.

Replicated weights (the mask token) are built from one seed on every tensor-parallel rank, like the
patch projections; the decoder's layers are tensor-parallel like the trunk's.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_t2i.model.attention import normal_init
from megatron_t2i.model.diffusion import grid_positions, latent_positions
from megatron_t2i.model.layer import LayerNorm, TransformerLayer


def kept_positions(tokens: torch.Tensor, latent_token: int, visible: torch.Tensor):
    """tokens [B, S], visible [B, N] -> (index [B, K] of the positions the trunk reads, in order:
    every position that is not a latent placeholder and the placeholders of visible patches;
    hidden [B, S] bool, the placeholders of the hidden patches)."""
    where = latent_positions(tokens, latent_token, visible.shape[1])     # [B, S]
    keep = ~where
    keep[where] = visible.reshape(-1).to(torch.bool)  # placeholders are in patch order per row
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"masked training: every row must keep as many patches, found "
                         f"{visible.sum(1).tolist()} visible")
    index = keep.nonzero()[:, 1].view(len(tokens), -1)                   # row-major: in order
    return index, where & ~keep


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, S, ...] -> [B, K, ...] at index [B, K]."""
    shape = index.shape + x.shape[2:]
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape))


def gather_mask(mask: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """An attention mask [B or 1, 1, S, S] -> [B, 1, K, K] between the kept positions."""
    if mask is None:
        return None
    b, k, s = len(index), index.shape[1], mask.shape[-1]
    rows = mask.expand(b, 1, s, s).gather(2, index[:, None, :, None].expand(b, 1, k, s))
    return rows.gather(3, index[:, None, None, :].expand(b, 1, k, k))


def kept_grid(grid: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """A latent grid's positions grid [B, N] in a sequence of `length` -> their positions among
    the kept ones (index [B, K]), -1 for the patches not kept."""
    rank = torch.full((len(index), length), -1, dtype=torch.long, device=grid.device)
    rank.scatter_(1, index, torch.arange(index.shape[1], device=grid.device).expand_as(index))
    return rank.gather(1, grid)


def scatter_positions(kept: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """kept [B, K, h] back to [B, length, h] at index [B, K], zeros elsewhere."""
    out = kept.new_zeros(len(kept), length, kept.shape[-1])
    return out.scatter(1, index[..., None].expand_as(kept), kept)


class MaskDecoder(nn.Module):
    """decoder_layers of the trunk's kind over every position, then a LayerNorm."""

    def __init__(self, config, device=None, dtype=torch.float32):
        super().__init__()
        h = config.hidden_size
        self.mask_token = nn.Parameter(torch.empty(h, device=device, dtype=dtype))
        normal_init(config.init_std)(self.mask_token)
        self.layers = nn.ModuleList(TransformerLayer(config, config.num_layers + i, device, dtype)
                                    for i in range(config.decoder_layers))
        self.final_layernorm = LayerNorm(h, config.layernorm_epsilon, config.pb_relax,
                                         device=device, dtype=dtype)
        self.grid_base = config.grid_base

    def forward(self, hidden, attention_mask=None, where=None, hidden_patches=None, grid=None):
        """hidden [B, S, h] (the trunk's output) -> [B, S, h]. where [B, S]: the latent
        placeholders; hidden_patches [B, S]: those the trunk did not read, which read the mask
        token plus their cell's grid position; grid: the patches' positions (layer.GridConv)."""
        x = hidden
        if hidden_patches is not None:
            cells = grid_positions(int(where[0].sum()), x.shape[-1],
                                   self.grid_base).to(x)                           # [N, h]
            dense = x.new_zeros(x.shape)
            dense[where] = cells.repeat(len(x), 1)
            fill = self.mask_token.to(x.dtype) + dense
            x = torch.where(hidden_patches[..., None], fill, x)
        for layer in self.layers:
            x = layer(x, attention_mask, None, grid)
        return self.final_layernorm(x)
