"""A denoiser on the trunk: continuous latent patches in, their clean values (x0) out.

The sequence is text->image's, `[ROI1] caption [size] [BOI1] [ENC] x N`, attended
bidirectionally: each [ENC] placeholder reads one noisy latent patch through `patch_in`, the
[BOI1] slot carries the noise level sigma (sinusoidal features -> MLP, added to its embedding),
and the denoising head reads the x0 prediction of every position (the objective scores the [ENC]
ones). Time and condition as tokens of one bidirectional sequence is U-ViT's design; the noising
x_t = (1 - sigma) x0 + sigma e and x0 prediction are TLD's.

In/outpainting (ModelConfig.inpaint_channel, TLD's mask channel): each patch also reads its
known latent and a 0/1 mask beside it through `known_in`, zero-initialised, so a denoiser
fine-tuned with it starts as the one it was trained from; the known patches are then given at
every step (generation/tasks/text2image.py, completion).

A latent patch is one cell of the image tokenizer's grid: its codebook vector (the VQ-VAE's
continuous latent space, which its decoder decodes), times ModelConfig.latent_scale so the data
have unit variance. Sampling snaps the final x0 to the nearest codebook vector.

Replicated on every tensor-parallel rank, seeded alike (trunk.seed_component), like the condition
projector: inputs and hidden states are the same on every rank, so are the weights and gradients.
"""
from __future__ import annotations

import math

import torch
from torch import nn

NOISE_FEATURES = 128  # sinusoidal features of the noise level (TLD's noise_embed_dims)


def noise_features(sigma: torch.Tensor, dim: int = NOISE_FEATURES) -> torch.Tensor:
    """sigma [B] in [0, 1] -> [B, dim]: sin/cos of 1000 sigma at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=sigma.device) / half)
    angles = 1000.0 * sigma.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class LatentInputs(nn.Module):
    """Noisy latent patches and the noise level -> input embeddings at their placeholders (each
    patch with its cell's grid_positions)."""

    def __init__(self, config, device=None, dtype=torch.float32):
        super().__init__()
        h, d = config.hidden_size, config.latent_channels
        self.latent_token, self.noise_token = config.latent_token, config.noise_token
        self.grid_base = config.grid_base
        self.patch_in = nn.Linear(d, h, device=device, dtype=dtype)
        self.noise_mlp = nn.Sequential(nn.Linear(NOISE_FEATURES, h, device=device, dtype=dtype),
                                       nn.SiLU(), nn.Linear(h, h, device=device, dtype=dtype))
        # a unit-variance patch through N(0, std / sqrt(d)) weights: embeddings of the token
        # embeddings' scale
        nn.init.normal_(self.patch_in.weight, mean=0.0, std=config.init_std / math.sqrt(d))
        for layer in (self.noise_mlp[0], self.noise_mlp[2]):
            nn.init.normal_(layer.weight, mean=0.0, std=config.init_std)
        for layer in (self.patch_in, self.noise_mlp[0], self.noise_mlp[2]):
            nn.init.zeros_(layer.bias)
        if config.inpaint_channel:  # [known latent * mask, mask] per patch, zero at the start
            self.known_in = nn.Linear(d + 1, h, device=device, dtype=dtype)
            nn.init.zeros_(self.known_in.weight)
            nn.init.zeros_(self.known_in.bias)

    def forward(self, tokens, embeds, noisy, sigma, known=None, known_mask=None):
        """tokens [B, S], embeds [B, S, h], noisy [B, N, d] (N = placeholders per row), sigma [B]
        -> embeds with patch_in(noisy) at the [ENC] placeholders and the noise embedding added at
        [BOI1]. known [B, N, d] and known_mask [B, N] (bool; None: nothing known): the patches
        given (in/outpainting), read by a model with an inpainting channel."""
        where = latent_positions(tokens, self.latent_token, noisy.shape[1])  # [B, S]
        patches = self.patch_in(noisy.to(self.patch_in.weight.dtype))        # [B, N, h]
        patches = patches + grid_positions(noisy.shape[1], patches.shape[-1],
                                           self.grid_base).to(patches)
        if hasattr(self, "known_in"):
            m = (torch.zeros(noisy.shape[:2], device=noisy.device) if known_mask is None
                 else known_mask.to(noisy.device)).to(patches.dtype)[..., None]  # [B, N, 1]
            given = torch.zeros_like(noisy) if known is None else known
            patches = patches + self.known_in(torch.cat([given.to(patches.dtype) * m, m], -1))
        elif known_mask is not None:
            raise ValueError("denoiser: known patches were given to a model without an "
                             "inpainting channel (train or fine-tune it with --inpaint-masks)")
        dense = embeds.new_zeros(embeds.shape)
        dense[where] = patches.reshape(-1, patches.shape[-1]).to(embeds.dtype)
        embeds = torch.where(where[..., None], dense, embeds)
        level = self.noise_mlp(noise_features(sigma).to(self.patch_in.weight.dtype))  # [B, h]
        at_level = (tokens == self.noise_token)[..., None].to(embeds.dtype)
        return embeds + at_level * level[:, None, :].to(embeds.dtype)


def grid_positions(n: int, h: int, base: int = 0) -> torch.Tensor:
    """[n, h] fixed 2-D sin-cos embeddings of a square grid of n cells (row features, then
    column features; DiT's), of unit amplitude. Patches of pure noise must still know where they
    are, and the trunk's learned position embeddings start at the token scale (std 0.02), below
    the noise's. Measured on the demo (1,500 iterations, with patch_in's smaller init): held-out
    x0 loss 0.065 against 0.071 with neither, 0.109 against 0.122 at high noise. base: the grid
    side the model learnt them on (ModelConfig.grid_base; 0: this one); a grid of another side
    reads them where its cells' centres lie on that grid, cell i at (i + 1/2) base / side - 1/2,
    so a cell keeps its place in the picture (position interpolation, as training/regrid.py
    does to the learned table)."""
    side = math.isqrt(n)
    if side * side != n or h % 4:
        raise ValueError(f"denoiser: {n} latent patches are not a square grid, or hidden size "
                         f"{h} is not a multiple of 4")
    freqs = 1.0 / 10_000.0 ** (torch.arange(h // 4, dtype=torch.float64) / (h // 4))
    cells = (torch.arange(side, dtype=torch.float64) + 0.5) * ((base or side) / side) - 0.5
    coords = cells[:, None] * freqs[None]                                       # [side, h/4]
    axis = torch.cat([coords.sin(), coords.cos()], dim=1)                      # [side, h/2]
    rows = axis[:, None, :].expand(side, side, -1)
    cols = axis[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(n, h).float()


class DenoiseHead(nn.Module):
    """hidden [B, S, h] -> x0 predictions [B, S, d]. Zero-initialised: a fresh model predicts
    the data mean (0), the minimiser of the loss before it has learnt anything."""

    def __init__(self, config, device=None, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.latent_channels, device=device,
                              dtype=dtype)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden, word_embeddings_weight=None, gather: bool = False):
        return self.proj(hidden)


def latent_positions(tokens: torch.Tensor, latent_token: int, n: int) -> torch.Tensor:
    """The [ENC] positions of tokens [B, S], n per row, as a bool mask [B, S]."""
    where = tokens == latent_token
    if not bool((where.sum(1) == n).all()):
        raise ValueError(f"denoiser: every row needs {n} latent placeholders (one per noisy "
                         f"patch), found {where.sum(1).tolist()}")
    return where


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise (TLD; the flow-matching path diffusers' flow sigmas
    follow). sigma: a float or [B] (broadcast over the trailing dims)."""
    if torch.is_tensor(sigma) and sigma.dim():
        sigma = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - sigma) * x0 + sigma * noise
