"""Continuous latents of a token data set: the codebook vector of every image code.

A denoiser (model/diffusion.py) trains on the image tokenizer's latent space: each record's codes
looked up in the VQ-VAE codebook give its latent grid [N, d], which the VQ-VAE decoder decodes, so
no data set has to be preprocessed again and the latents are exactly those of its codes. The
scale gives them unit root mean square over the data (latent diffusion's scale factor); it is saved in the
model config, and sampling divides by it before snapping to the nearest codebook vector (EMACodebook.nearest).
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

