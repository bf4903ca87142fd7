"""Raster decoding: one token per step after the prompt, with a KV cache, an allowed vocabulary
per step and classifier-free guidance (a second, unconditional state fed the same tokens)."""
from __future__ import annotations

from typing import Callable

import torch

from megatron_t2i.generation.sampling import classifier_free_guidance, sample
from megatron_t2i.generation.state import Decoding, DecodingState, Prompt, check_positions
from megatron_t2i.progress import progress_bar

Allowed = torch.Tensor | Callable[[int], torch.Tensor] | None


def new_positions(next_positions, prompt: Prompt, num_tokens: int) -> torch.Tensor:
    """The position ids of the N generated tokens as [B, N]: by default continuing after the
    prompt's last position; else from a tensor [N] / [B, N] or a callable step -> [B] or scalar."""
    b, last = prompt.batch, prompt.positions[:, -1:]
    if next_positions is None:
        return last + torch.arange(1, num_tokens + 1, device=last.device)
    if callable(next_positions):
        columns = [torch.as_tensor(next_positions(i), device=last.device).expand(b)
                   for i in range(num_tokens)]
        return torch.stack(columns, dim=1) if columns else last.new_empty(b, 0)
    positions = torch.as_tensor(next_positions, device=last.device)
    if positions.shape not in ((num_tokens,), (b, num_tokens)):
        raise ValueError(f"generate: next_positions must be [{num_tokens}] or [{b}, {num_tokens}], "
                         f"got {list(positions.shape)}")
    return positions.expand(b, num_tokens)


@torch.no_grad()
def generate(model, prompt: Prompt, num_tokens: int, decoding: Decoding = Decoding(),
             allowed: Allowed = None, generators: list[torch.Generator] | None = None,
             uncond: Prompt | None = None, next_positions=None, progress: bool | str = False,
             return_logits: bool = False):
    """Sample `num_tokens` tokens after `prompt` -> LongTensor [B, N].

    allowed: bool [V] mask of the tokens that may be drawn, or a callable step -> [V] (e.g. image
        codes inside an image, text after it); None allows every id.
    generators: one torch.Generator per row (per-sample seeds, on the model's device), the same
        on every TP rank; None uses the default generator.
    uncond: with decoding.cfg_scale != 0, the unconditional prompt of classifier-free guidance; it
        receives the same sampled tokens and always continues its own positions.
    next_positions: position ids of the generated tokens (see new_positions).
    progress: a tqdm bar over the tokens (a string is its description).
    return_logits: also return the logits each token was drawn from, float32 [B, N, V] (after
        guidance and the allowed mask, before temperature and filtering; V = vocab_size).
    """
    guided = decoding.cfg_scale != 0.0
    if guided and uncond is None:
        raise ValueError("generate: cfg_scale needs the unconditional prompt (uncond)")
    positions = new_positions(next_positions, prompt, num_tokens)
    states = [DecodingState(model, prompt, num_tokens, decoding.use_cache)]
    check_positions(model, prompt.positions, positions[:, :-1])  # the last is never fed
    if guided:
        uncond_positions = new_positions(None, uncond, num_tokens)
        check_positions(model, uncond.positions, uncond_positions[:, :-1])
        states.append(DecodingState(model, uncond, num_tokens, decoding.use_cache))

    tokens = prompt.tokens.new_empty(prompt.batch, num_tokens)
    seen = []
    vocab = decoding.vocab_size
    desc = progress if isinstance(progress, str) else None
    for step in progress_bar(range(num_tokens), desc=desc, unit="tok", disable=not progress,
                             leave=False):
        logits = states[0].logits()[:, -1, :vocab]
        if guided:
            logits = classifier_free_guidance(logits, states[1].logits()[:, -1, :vocab],
                                              decoding.cfg_scale)
        mask = allowed(step) if callable(allowed) else allowed
        if mask is not None:
            logits = logits.masked_fill(~mask[:logits.shape[-1]].to(logits.device), float("-inf"))
        if return_logits:
            seen.append(logits)
        tokens[:, step] = sample(logits, decoding.sampling, generators)
        if step + 1 < num_tokens:
            states[0].append(tokens[:, step], positions[:, step])
            if guided:
                states[1].append(tokens[:, step], uncond_positions[:, step])
    if return_logits:
        return tokens, (torch.stack(seen, 1) if seen
                        else prompt.tokens.new_empty(prompt.batch, 0, 0, dtype=torch.float32))
    return tokens
