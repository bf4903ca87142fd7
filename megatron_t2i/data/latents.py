"""Continuous latents of a token data set: the codebook vector of every image code.

A denoiser (model/diffusion.py) trains on the image tokenizer's latent space: each record's codes
looked up in the VQ-VAE codebook give its latent grid [N, d], which the VQ-VAE decoder decodes, so
no data set has to be preprocessed again and the latents are exactly those of its codes. A scale
gives them unit root mean square over the data (latent diffusion's scale factor); it is saved in
the model config, and sampling divides by it before snapping to the nearest codebook vector
(EMACodebook.nearest).
"""
from __future__ import annotations

import os

import numpy as np
import torch


def image_tokenizer_of(meta: dict, what: str):
    """The ImageTokenizer a data set was preprocessed with (its report's path, checked against
    the sha256 in its metadata); a one-line error when it is gone or changed."""
    from megatron_t2i.tokenizers.vqvae import ImageTokenizer, file_sha256
    path = meta.get("report", {}).get("image_tokenizer_path")
    if not path or not os.path.isfile(path):
        raise ValueError(f"{what}: a denoiser reads the latents of the data set's image tokenizer, "
                         f"and its file {path or '(none recorded)'} is not there")
    want = meta.get("image_tokenizer_sha256")
    if want and file_sha256(path) != want:
        raise ValueError(f"{what}: {path} changed since the data set was preprocessed (sha256 "
                         f"differs); preprocess again with the tokenizer to train on")
    return ImageTokenizer.load(path)


def codebook(tokenizer) -> np.ndarray:
    """The tokenizer's codebook as [K, d] float32 (row k: the latent of code k)."""
    return tokenizer.model.quantize_t.embed.t().float().cpu().numpy().copy()


def latent_scale(table: np.ndarray, dataset, indices, limit: int = 2000) -> float:
    """1 / the root mean square of the latents of up to `limit` records of `indices` (over every
    patch and channel): what gives the training latents the noise's scale."""
    picked = np.asarray(indices)[:limit]
    if not len(picked):
        raise ValueError("no training records to measure the latents' scale on")
    counts = np.zeros(len(table))
    for i in picked:
        np.add.at(counts, np.asarray(dataset[int(i)].image_codes, dtype=np.int64).reshape(-1), 1)
    second_moment = float(counts / counts.sum() @ (table.astype(np.float64) ** 2).mean(1))
    return float(1.0 / max(np.sqrt(second_moment), 1e-8))


def latent_table(tokenizer, config) -> np.ndarray:
    """The denoiser's latent of every code, [K, d] float32: what training and evaluation read."""
    return (codebook(tokenizer) * config.latent_scale).astype(np.float32)


def random_known_mask(grid: int, rng: np.random.Generator) -> np.ndarray:
    """A training sample's given patches for in/outpainting, [grid^2] bool: a random rectangle of
    the grid (each side 1 to grid - 1 cells), either the part to repaint (inpainting: the rest is
    given) or the part given (outpainting), with even odds. Never all or nothing."""
    h, w = (int(rng.integers(1, grid)) for _ in range(2))
    top, left = int(rng.integers(0, grid - h + 1)), int(rng.integers(0, grid - w + 1))
    box = np.zeros((grid, grid), dtype=bool)
    box[top:top + h, left:left + w] = True
    return (~box if rng.random() < 0.5 else box).reshape(-1)


def box_known_mask(grid: int, box: tuple[float, float, float, float],
                   outside: bool = False) -> np.ndarray:
    """The patches given when repainting `box` (x0, y0, x1, y1 as fractions of the image's width
    and height): [grid^2] bool, True where a cell's centre lies outside the box (inside it with
    `outside`: outpainting keeps the box and repaints the rest)."""
    centres = (np.arange(grid) + 0.5) / grid
    x0, y0, x1, y1 = box
    inside = ((centres[:, None] >= y0) & (centres[:, None] < y1)
              & (centres[None, :] >= x0) & (centres[None, :] < x1))
    return (inside if outside else ~inside).reshape(-1)
