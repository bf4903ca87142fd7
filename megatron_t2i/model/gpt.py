"""The GPT over [text | image] tokens: token inputs (and float embedding slots), the trunk, a head.

Module names reproduce the CogView checkpoint keys (`word_embeddings`, `transformer.
position_embeddings`, `transformer.layers.{i}`, `transformer.final_layernorm`), so importing a
released model is a key-for-key copy. The pieces (trunk.Transformer, heads) are separate so the
pipeline stages (model/pipeline.py) are built from the same ones.

Build on the meta device to count parameters without allocating:
    GPT(model_config("cogview-4b"), device="meta")
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_t2i import mpu
from megatron_t2i.model.attention import KVCache, normal_init
from megatron_t2i.model.conditioning import ConditionProjector, slot_inputs
from megatron_t2i.model.cvae import CVAE
from megatron_t2i.model.diffusion import LatentInputs
from megatron_t2i.model.heads import build_head
from megatron_t2i.model.masked import (MaskDecoder, gather_mask, gather_positions, kept_grid,
                                       kept_positions, scatter_positions)
from megatron_t2i.model.trunk import Transformer, check_inputs, seed_component


@dataclass
class Slots:
    """Float inputs in place of some tokens' embeddings: where mask [B, S] is True the trunk reads
    values [B, S, h] (e.g. a projected CLIP embedding, a noise level, a latent patch) instead of
    the embedding of the token there (a placeholder id). The same on every TP rank."""
    values: torch.Tensor
    mask: torch.Tensor


def with_slots(embeds, slots: Slots | None):
    """Token embeddings [B, S, h] with the slot values where slots.mask."""
    if slots is None:
        return embeds
    return torch.where(slots.mask[..., None], slots.values.to(embeds.dtype), embeds)


class GPT(nn.Module):
    def __init__(self, config, device=None, params_dtype=torch.float32, seed: int | None = None):
        """seed: build each component from its own seed (see trunk.seed_component); without it,
        from the default RNG's current state."""
        super().__init__()
        self.config = config
        seed_component(seed, 0)
        self.word_embeddings = mpu.VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, init_method=normal_init(config.init_std),
            params_dtype=params_dtype, device=device)
        self.transformer = Transformer(config, device, params_dtype, seed)
        self.head = build_head(config, device, params_dtype)  # the denoising head: zeros
        if config.condition_slots:
            seed_component(seed, config.num_layers + 3)
            self.conditioning = ConditionProjector(config, device, params_dtype)
        if config.latent_dim:
            seed_component(seed, config.num_layers + 4)
            self.cvae = CVAE(config, device, params_dtype)
        if config.latent_channels:
            seed_component(seed, config.num_layers + 5)
            self.latent_inputs = LatentInputs(config, device, params_dtype)
        if config.decoder_layers:
            seed_component(seed, config.num_layers + 6)
            self.mask_decoder = MaskDecoder(config, device, params_dtype)

    def embed(self, tokens, slots: Slots | None = None):
        """tokens [B, S] -> input embeddings [B, S, h], slot values where slots.mask."""
        return with_slots(self.word_embeddings(tokens), slots)

    def condition_slots(self, tokens, condition, condition_mask=None) -> Slots:
        """The Slots of a conditioned model (see conditioning.slot_inputs)."""
        if not self.config.condition_slots:
            raise ValueError("GPT: a condition was given to a model without condition slots "
                             "(trained on captions)")
        return Slots(*slot_inputs(self.conditioning, self.config.slot_token, tokens, condition,
                                  condition_mask))

    def prior_latent(self, tokens, noise) -> torch.Tensor:
        """A CVAE model's z [B, d] drawn from its prior p(z | the caption in tokens [B, S]): the
        prior mean plus noise [B, d] (standard normal, drawn by the caller per sample)."""
        mean = self.cvae.prior_mean(tokens, self.word_embeddings(tokens))
        return mean + noise.to(mean.dtype)

    def inputs(self, tokens, slots: Slots | None = None, condition=None, condition_mask=None,
               latent=None, latent_source=None, latent_noise=None, latent_mask=None,
               noisy_latents=None, noise_level=None, known_latents=None, known_mask=None):
        """tokens [B, S] -> the trunk's input embeddings [B, S, h] (with the condition's slots,
        the CVAE's context or a denoiser's noisy patches, see forward), and the KL [B] of a CVAE
        trained on latent_source (else None)."""
        if condition is not None:
            slots = self.condition_slots(tokens, condition, condition_mask)
        if noisy_latents is not None:
            if not self.config.latent_channels:
                raise ValueError("GPT: noisy latents were given to a model without a denoiser")
            return self.latent_inputs(tokens, self.embed(tokens, slots), noisy_latents,
                                      noise_level, known_latents, known_mask), None
        if latent_source is None and latent is None:
            return self.embed(tokens, slots), None
        if not self.config.latent_dim:
            raise ValueError("GPT: a latent was given to a model without a CVAE")
        words, kl = self.word_embeddings(tokens), None
        embeds = with_slots(words, slots)  # the CVAE's prior pools the caption's own words
        if latent is None:  # training: z from the posterior of the image's CLIP embedding
            prior = self.cvae.prior_mean(tokens, words)
            latent, kl = self.cvae.posterior_sample(latent_source, latent_noise, prior)
            if latent_mask is not None:
                kl = kl * latent_mask.to(kl.dtype)
        return self.cvae.add_context(tokens, embeds, latent, latent_mask), kl

    def hidden(self, tokens, position_ids, attention_mask=None, kv_cache: KVCache | None = None,
               visible_patches=None, **inputs):
        """tokens, position_ids [B, S] -> the final hidden states [B, S, h] (inputs: the
        keywords of forward that fill slots or the CVAE context)."""
        check_inputs(tokens, position_ids, self.config.max_position_embeddings,
                     cached=kv_cache is not None)
        return self._hidden(tokens, self.inputs(tokens, **inputs)[0], position_ids,
                            attention_mask, kv_cache, visible_patches)

    def _hidden(self, tokens, embeds, position_ids, attention_mask, kv_cache, visible_patches):
        """The trunk (on the visible patches only, given visible_patches [B, N]) and a
        denoiser's mask decoder (model/masked.py) -> [B, S, h]."""
        where = tokens == self.config.latent_token if self.config.latent_channels else None
        # a denoiser's grid convolution: the sequence position of every latent patch, in order
        grid = where.nonzero()[:, 1].view(len(tokens), -1) if self.config.mlp_conv else None
        if visible_patches is None:
            hidden = self.transformer(embeds, position_ids, attention_mask, kv_cache, grid)
            hidden_patches = None
        else:
            if not self.config.decoder_layers:
                raise ValueError("GPT: visible_patches (masked training) need a denoiser with a "
                                 "mask decoder (decoder_layers > 0)")
            index, hidden_patches = kept_positions(tokens, self.config.latent_token,
                                                   visible_patches)
            kept = self.transformer(gather_positions(embeds, index),
                                    gather_positions(position_ids, index),
                                    gather_mask(attention_mask, index), None,
                                    None if grid is None else kept_grid(grid, index,
                                                                        tokens.shape[1]))
            hidden = scatter_positions(kept, index, tokens.shape[1])
        if self.config.decoder_layers:
            hidden = self.mask_decoder(hidden, attention_mask, where, hidden_patches, grid)
        return hidden

    def forward(self, tokens, position_ids, attention_mask=None, kv_cache: KVCache | None = None,
                gather_logits: bool = False, slots: Slots | None = None, condition=None,
                condition_mask=None, latent=None, latent_source=None, latent_noise=None,
                latent_mask=None, noisy_latents=None, noise_level=None, visible_patches=None,
                known_latents=None, known_mask=None):
        """-> the head's output: logits [B, S, V/tp] (all V with gather_logits) for the LM head;
        (logits, KL [B]) when a CVAE model is given latent_source; x0 predictions [B, S, d] of a
        denoiser given noisy_latents [B, N, d] and noise_level [B] (model/diffusion.py).

        attention_mask: bool [B or 1, 1, S, T] (True = may attend), T = cached + S tokens;
        None means causal. kv_cache: decode incrementally, the S tokens following the cached ones.
        slots: float inputs in place of tokens' embeddings; condition [B, D] (+ condition_mask
        [B]): of a conditioned model, projected into its slots (see condition_slots). Of a CVAE
        model (model/cvae.py), in rows where latent_mask [B] (None: all): latent z [B, d] (sampling,
        from prior_latent), or latent_source [B, D] and latent_noise [B, d] (training: z from the
        posterior, and its KL returned). visible_patches [B, N] bool: a denoiser's trunk reads
        only these patches (masked training, model/masked.py). known_latents [B, N, d] and
        known_mask [B, N] bool: the patches given to a denoiser with an inpainting channel.
        """
        check_inputs(tokens, position_ids, self.config.max_position_embeddings,
                     cached=kv_cache is not None)
        embeds, kl = self.inputs(tokens, slots, condition, condition_mask, latent, latent_source,
                                 latent_noise, latent_mask, noisy_latents, noise_level,
                                 known_latents, known_mask)
        hidden = self._hidden(tokens, embeds, position_ids, attention_mask, kv_cache,
                              visible_patches)
        out = self.head(hidden, self.word_embeddings.weight, gather_logits)
        return out if kl is None else (out, kl)

    def allocate_kv_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        """A KV cache for `batch` sequences of up to `max_len` tokens, on this rank's heads; dtype
        and device default to the model's."""
        attn = self.transformer.layers[0].attention
        weight = self.word_embeddings.weight
        return KVCache(len(self.transformer.layers), attn.num_heads, attn.head_dim).allocate(
            batch, max_len, dtype or weight.dtype, device or weight.device)
