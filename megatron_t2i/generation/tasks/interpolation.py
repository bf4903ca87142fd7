"""Interpolation between two prompts (TLD's): a denoiser's images along the way from prompt A to
prompt B, every one drawn from the same starting noise, written as frames and one strip.

Input lines `prompt A<TAB>prompt B`; --batch-size K frames at t = 0, 1/(K-1), ..., 1. The noise
is the one text2image draws for a query's first sample, so frame 0 is text2image's first image of
A (and the last frame B's, drawn from A's noise).

A CLIP-conditioned (language-free) denoiser interpolates its condition: the CLIP text embeddings
of A and B, spherically (both are unit vectors, as is every point between). A caption denoiser
cannot mix two token sequences, so it mixes what they predict: at every step
x0 = (1 - t) x0(A) + t x0(B), and guidance against the unconditional prompt applies to the mix
(composable diffusion's weighted sum).
"""
from __future__ import annotations

import os
import time

import torch

from megatron_t2i.generation import io
from megatron_t2i.generation.batching import sample_seed
from megatron_t2i.generation.strategies.diffusion import (branch, denoise, latents_to_codes,
                                                          make_sampler, predict_x0)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Unit vectors a, b [D] and weights t [K] -> [K, D] along the great circle from a to b
    (linear where they are parallel)."""
    angle = torch.arccos((a @ b).clamp(-1.0, 1.0))
    t = t[:, None].to(a.dtype)
    if float(angle) < 1e-4:
        out = (1 - t) * a + t * b
    else:
        out = (torch.sin((1 - t) * angle) * a + torch.sin(t * angle) * b) / torch.sin(angle)
    return out / out.norm(dim=-1, keepdim=True)


def mixing(other, weights: torch.Tensor):
    """A denoiser (for strategies.diffusion.denoise) whose conditional rows predict
    (1 - w) x0(their prompt) + w x0(`other`), w = weights [K]; rows after the first K (guidance's
    unconditional branch) are left as they are. other: (tokens, positions, mask) of K rows."""
    def predict(model, tokens, positions, mask, x, sigma, **inputs):
        out = predict_x0(model, tokens, positions, mask, x, sigma, **inputs)
        k = len(weights)
        w = weights.view(-1, 1, 1).to(out)
        mixed = (1 - w) * out[:k] + w * predict_x0(model, *other, x[:k], sigma)
        return torch.cat([mixed, out[k:]])
    return predict


def interpolate(ctx, config, text_a: str, text_b: str, query_index: int) -> torch.Tensor:
    """-> codes [K, grid^2] of the K = config.samples frames from text_a to text_b."""
    layout, model, device = ctx.layout, ctx.model, ctx.device
    k = config.samples
    if k < 2:
        raise ValueError(f"--batch-size {k}: an interpolation needs at least 2 frames")
    t = torch.linspace(0.0, 1.0, k, device=device)
    g = torch.Generator(device=device).manual_seed(sample_seed(config.seed, query_index, 0))
    noise = torch.randn(layout.image_tokens, model.config.latent_channels, generator=g,
                        device=device).expand(k, -1, -1)
    guided = bool(config.cfg_scale)

    def rows(seq, inputs=None):
        return branch(layout, seq, k, device, inputs)

    if ctx.config.condition_slots:  # language-free: the condition itself, along the sphere
        seq = layout.condition_to_latents(ctx.config.condition_slots)
        ends = ctx.clip.encode_texts([text_a, text_b]).to(device, torch.float32)
        cond = rows(seq, {"condition": slerp(ends[0], ends[1], t),
                          "condition_mask": torch.ones(k, dtype=torch.bool, device=device)})
        uncond = rows(seq, {"condition": torch.zeros_like(cond[3]["condition"]),
                            "condition_mask": torch.zeros(k, dtype=torch.bool, device=device)})
        denoiser = predict_x0
    else:  # captions: the two predictions, mixed
        encode = ctx.text_tokenizer.encode
        cond = rows(layout.text_to_latents(encode(text_a)))
        uncond = rows(layout.text_to_latents([]))
        denoiser = mixing(rows(layout.text_to_latents(encode(text_b)))[:3], t)
    x0 = denoise(model, cond, uncond if guided else None,
                 make_sampler(config.sampler, config.diffusion_steps), noise, config.cfg_scale,
                 progress=f"[{query_index}]" if io.token_progress(ctx.is_writer) else False,
                 denoiser=denoiser)
    return latents_to_codes(ctx, x0)


def main_interpolation(ctx, config) -> None:
    if not ctx.config.latent_channels:
        raise ValueError("--task interpolation needs a denoiser (--tasks diffusion or "
                         "clip-diffusion); this checkpoint is autoregressive")

    def parse(line):
        a, tab, b = line.partition("\t")
        if not tab or not a.strip() or not b.strip():
            raise ValueError("expected prompt A<TAB>prompt B (--task interpolation)")
        return a.strip(), b.strip()

    for query in io.queries(config.input_source, config.with_id, ctx.is_writer, parse):
        started = time.perf_counter()
        a, b = query.item
        codes = interpolate(ctx, config, a, b, query.index)
        if not ctx.is_writer:
            continue
        name = f"{a} to {b}"
        images = ctx.image_tokenizer.decode_codes(codes)
        frames = io.save_samples(images, config.output_path, query.id, name)
        strip = io.save_grid(images, os.path.join(os.path.dirname(frames[0]), "strip.png"),
                             nrow=len(images))
        print(f"[{query.index}] {a[:40]!r} -> {b[:40]!r}: {len(images)} frames in "
              f"{time.perf_counter() - started:.1f} s -> {strip}", flush=True)
