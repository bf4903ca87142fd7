"""Lformer's CVAE global latent: one vector z per image that every L-shaped block reads, so blocks
drawn in parallel agree on the whole picture.

    prior      p(z | text)  = N(mu_p(text), I)             mu_p from the mean of the caption's
                                                           token embeddings (the GPT's own)
    posterior  q(z | image) = N(mu_q(f), diag sigma^2(f))  f: the image's unit CLIP embedding
    context    w = MLP(z), added to the input embedding of the context slot ([BOI1], the slot
               that predicts block 0 and that every block attends to)
    loss       CE + beta * KL(q || p), beta warmed up (training/objectives.py)

Training draws z from the posterior (reparameterised, with the noise the data loader drew from
each sample's seed: resumable, the same on every TP rank); sampling draws z from the prior with
each sample's own generator, and classifier-free guidance feeds the same w to both branches.
The module is replicated on every TP rank and seeded alike, like the condition projector.
"""
from __future__ import annotations

import torch
from torch import nn


POSTERIOR_LOG_VAR_INIT = -4.0


class CVAE(nn.Module):
    def __init__(self, config, device=None, dtype=torch.float32):
        super().__init__()
        h, d = config.hidden_size, config.latent_dim
        self.prior = nn.Linear(h, d, device=device, dtype=dtype)
        self.posterior = nn.Linear(config.latent_source_dim, 2 * d, device=device, dtype=dtype)
        # the posterior starts nearly deterministic (sigma 0.14): z carries the image from the
        # first step. From sigma 1 the decoder learns to ignore a latent that is mostly noise and
        # the KL collapses to nothing (0.002 nats per image on the embedded default).
        with torch.no_grad():
            self.posterior.bias[d:].fill_(POSTERIOR_LOG_VAR_INIT)
        self.context = nn.Sequential(nn.Linear(d, h, device=device, dtype=dtype), nn.GELU(),
                                     nn.Linear(h, h, device=device, dtype=dtype))
        self.text_ids = (config.text_token_start, config.text_token_end)
        self.context_token = config.context_token

    def prior_mean(self, tokens, embeds) -> torch.Tensor:
        """mu_p [B, d] from the mean embedding of the caption's tokens (tokens [B, S], embeds
        [B, S, h]); a caption-free row (guidance's unconditional) averages nothing: zeros."""
        text = ((tokens >= self.text_ids[0]) & (tokens < self.text_ids[1])).to(embeds.dtype)
        pooled = (embeds * text[..., None]).sum(1) / text.sum(1, keepdim=True).clamp_min(1)
        return self.prior(pooled)

    def posterior_sample(self, source, noise, prior_mean):
        """z [B, d] = mu_q + sigma_q * noise and KL(q || p) [B] (nats per image)."""
        mu, log_var = self.posterior(source.to(self.posterior.weight.dtype)).chunk(2, dim=-1)
        log_var = log_var.clamp(-10, 10)
        z = mu + (0.5 * log_var).exp() * noise.to(mu.dtype)
        kl = 0.5 * (log_var.exp() + (mu - prior_mean) ** 2 - 1 - log_var).sum(-1)
        return z, kl

    def add_context(self, tokens, embeds, z, mask=None):
        """embeds [B, S, h] with w = MLP(z) added at each row's context slot (its first
        context_token), rows where mask [B] is False unchanged."""
        at = tokens == self.context_token
        first = at & (at.cumsum(1) == 1)                                    # [B, S]
        if mask is not None:
            first = first & mask[:, None]
        w = self.context(z.to(embeds.dtype))                               # [B, h]
        return embeds + first[..., None].to(embeds.dtype) * w[:, None, :]
