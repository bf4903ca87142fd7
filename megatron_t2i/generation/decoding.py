"""Autoregressive decoding: raster order with a KV cache (or full recomputation), allowed-vocabulary
masks, classifier-free guidance; and the log-likelihood of given tokens (post-selection).

KV cache: the prompt goes through the model in one chunk, then each step feeds only the one new
token; keys and values of everything before are read from the cache, never recomputed (the
original recomputed Q/K/V of the whole prefix at every step). `use_cache=False` recomputes the
whole sequence at every step: the slow reference the cached path is tested against.

Tensor parallelism: the logits are gathered from every TP rank (gather_logits=True), so every
rank sees the same full [B, V] logits and, given generators seeded alike, samples the same token;
no broadcast of tokens is needed.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from megatron_t2i import mpu
from megatron_t2i.data.loader import target_length
from megatron_t2i.generation.sampling import SamplingConfig, classifier_free_guidance, sample

Allowed = torch.Tensor | Callable[[int], torch.Tensor] | None


def image_vocab_mask(layout, vocab_size: int) -> torch.Tensor:
    """bool [vocab_size]: True for the image codes [0, C) (what may follow [BOI*])."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[:layout.num_image_codes] = True
    return mask


def text_vocab_mask(layout, vocab_size: int, extra: tuple[int, ...] = ()) -> torch.Tensor:
    """bool [vocab_size]: True for the text ids [C, C + T) (what may follow [EOI*]) and the ids in
    `extra` (e.g. [PAD], which ends a caption)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[layout.text_offset:layout.special_offset] = True
    mask[list(extra)] = True
    return mask


class _Stream:
    """One sequence batch being extended: the conditional prompt, or CFG's unconditional one.

    Holds its tokens and positions [B, P + N] (filled up to `length`) and, when cached, its KV
    cache; `logits()` runs the model on whatever it has not seen yet."""

    def __init__(self, model, prompt, position_ids, num_tokens: int, use_cache: bool):
        b, p = prompt.shape
        self.model = model
        self.tokens = prompt.new_empty(b, p + num_tokens)
        self.positions = position_ids.new_empty(b, p + num_tokens)
        self.tokens[:, :p], self.positions[:, :p] = prompt, position_ids
        self.length = p
        # the last generated token is never fed back, so P + N - 1 keys at most
        self.cache = model.allocate_kv_cache(b, p + max(num_tokens - 1, 0)) if use_cache else None

    def logits(self) -> torch.Tensor:
        """-> float32 [B, V] logits of the token after the current sequence (all TP ranks)."""
        seen = self.cache.length if self.cache is not None else 0
        out = self.model(self.tokens[:, seen:self.length], self.positions[:, seen:self.length],
                         kv_cache=self.cache, gather_logits=True)
        return out[:, -1].float()

    def append(self, token: torch.Tensor, position: torch.Tensor) -> None:
        self.tokens[:, self.length] = token
        self.positions[:, self.length] = position
        self.length += 1


def _positions_of_new_tokens(next_positions, position_ids, num_tokens: int) -> torch.Tensor:
    """The position ids of the N generated tokens as [B, N]: by default continuing after the
    prompt's last position; else from a tensor [N] / [B, N] or a callable step -> [B] or scalar."""
    b = position_ids.shape[0]
    if next_positions is None:
        steps = torch.arange(1, num_tokens + 1, device=position_ids.device)
        return position_ids[:, -1:] + steps
    if callable(next_positions):
        columns = [torch.as_tensor(next_positions(i), device=position_ids.device).expand(b)
                   for i in range(num_tokens)]
        return torch.stack(columns, dim=1) if columns else position_ids.new_empty(b, 0)
    positions = torch.as_tensor(next_positions, device=position_ids.device)
    if positions.shape not in ((num_tokens,), (b, num_tokens)):
        raise ValueError(f"generate: next_positions must be [{num_tokens}] or [{b}, {num_tokens}], "
                         f"got {list(positions.shape)}")
    return positions.expand(b, num_tokens)


def _check_positions(model, *positions: torch.Tensor, what: str = "generate") -> None:
    limit = model.config.max_position_embeddings
    for p in positions:
        if p.numel() and (p.min() < 0 or p.max() >= limit):
            raise ValueError(f"{what}: position ids {p.min().item()}..{p.max().item()} fall outside "
                             f"the model's {limit} positions (a sequence too long, or a task the "
                             f"model was not trained for: its positions come from pretrain.py "
                             f"--tasks)")


@torch.no_grad()
def generate(model, prompt: torch.Tensor, position_ids: torch.Tensor, num_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), allowed: Allowed = None,
             generators: list[torch.Generator] | None = None, use_cache: bool = True,
             uncond_prompt: torch.Tensor | None = None,
             uncond_position_ids: torch.Tensor | None = None, cfg_scale: float = 0.0,
             next_positions=None, progress: bool | str = False, return_logits: bool = False,
             vocab_size: int | None = None):
    """Sample `num_tokens` tokens after `prompt` [B, P] (positions [B, P]) -> LongTensor [B, N].

    vocab_size: the ids in use (layout.vocab_size). Pass it: the embedding's padding rows beyond
        are then never drawn, and the random streams (one uniform per id and step) do not depend
        on the padding, which grows with the tensor-parallel size. None: every row of the logits.

    allowed: bool [V] mask of the tokens that may be drawn, or a callable step -> [V] (e.g. image
        codes inside an image, text after it); None allows every id.
    generators: one torch.Generator per row (per-sample seeds; on the model's device), the same
        on every TP rank; None uses the default generator.
    uncond_prompt [B, P'] (+ uncond_position_ids): with cfg_scale > 0, the unconditional stream
        for classifier-free guidance; it receives the same sampled tokens and always continues its
        own positions.
    next_positions: position ids of the generated tokens (see _positions_of_new_tokens); default
        continuing after the prompt.
    progress: show a tqdm bar over the tokens (a string is its description).
    return_logits: also return the logits each token was drawn from, float32 [B, N, V] (after
        guidance and the allowed mask, before temperature and filtering; V = vocab_size).
    """
    if prompt.dim() != 2 or prompt.shape != position_ids.shape or prompt.shape[1] == 0:
        raise ValueError(f"generate: prompt and position_ids must both be [batch, length > 0], got "
                         f"{list(prompt.shape)} and {list(position_ids.shape)}")
    guided = cfg_scale != 0.0
    if guided and (uncond_prompt is None or uncond_position_ids is None):
        raise ValueError("generate: cfg_scale needs uncond_prompt and uncond_position_ids")
    new_positions = _positions_of_new_tokens(next_positions, position_ids, num_tokens)
    streams = [_Stream(model, prompt, position_ids, num_tokens, use_cache)]
    if guided:
        uncond_new = _positions_of_new_tokens(None, uncond_position_ids, num_tokens)
        _check_positions(model, uncond_position_ids, uncond_new[:, :-1])
        streams.append(_Stream(model, uncond_prompt, uncond_position_ids, num_tokens, use_cache))
    _check_positions(model, position_ids, new_positions[:, :-1])  # the last is never fed

    tokens = prompt.new_empty(prompt.shape[0], num_tokens)
    seen_logits = []
    for step in tqdm(range(num_tokens), desc=progress if isinstance(progress, str) else None,
                     unit="tok", disable=not progress, leave=False):
        logits = streams[0].logits()[:, :vocab_size]
        if guided:
            logits = classifier_free_guidance(logits, streams[1].logits()[:, :vocab_size],
                                              cfg_scale)
        mask = allowed(step) if callable(allowed) else allowed
        if mask is not None:
            mask = mask[:logits.shape[-1]].to(logits.device)
            logits = logits.masked_fill(~mask, float("-inf"))
        if return_logits:
            seen_logits.append(logits)
        tokens[:, step] = sample(logits, sampling, generators)
        if step + 1 < num_tokens:
            streams[0].append(tokens[:, step], new_positions[:, step])
            if guided:
                streams[1].append(tokens[:, step], uncond_new[:, step])
    if return_logits:
        return tokens, (torch.stack(seen_logits, 1) if seen_logits
                        else prompt.new_empty(prompt.shape[0], 0, 0, dtype=torch.float32))
    return tokens


@torch.no_grad()
def score_sequences(model, seqs, targets, allowed: torch.Tensor, vocab_size: int,
                    batch_size: int = 8) -> torch.Tensor:
    """score() over training-template sequences of one padded length (layout templates with
    pad=True), in rounds of batch_size -> float32 [N] (CPU). targets(tokens [b, L], loss_mask
    [b, L]) -> bool [b, L] marks what is scored; each round drops the columns after its last
    target (trailing pads, which nothing before them attends to)."""
    device = model.word_embeddings.weight.device
    allowed = allowed.to(device)
    out = []
    for start in range(0, len(seqs), batch_size):
        part = seqs[start:start + batch_size]
        tokens = torch.stack([s.tokens for s in part])                # [b, L]
        positions = torch.stack([s.position_ids for s in part])
        mask = targets(tokens, torch.stack([s.loss_mask for s in part]))
        length = target_length(mask)
        out.append(score(model, tokens[:, :length].to(device), positions[:, :length].to(device),
                         mask[:, :length].to(device), allowed, vocab_size=vocab_size).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def score(model, tokens: torch.Tensor, position_ids: torch.Tensor, target_mask: torch.Tensor,
          allowed: torch.Tensor | None = None, attention_mask=None,
          vocab_size: int | None = None) -> torch.Tensor:
    """Log-likelihood of each sequence: Σ over positions i with target_mask[:, i] of
    log p(tokens[:, i] | tokens[:, :i]) -> float32 [B].

    tokens, position_ids, target_mask [B, L] (target_mask[:, 0] is ignored: nothing predicts the
    first token). allowed: bool [V] over the model's (padded) vocabulary, e.g. text_vocab_mask(
    layout, config.vocab_size); the distribution is renormalised over the allowed ids (e.g.
    text only when scoring a caption). vocab_size: the ids in use (layout.vocab_size); the
    embedding's padding rows beyond are excluded too. Each TP rank keeps its own vocabulary slice:
    the vocab-parallel cross entropy never gathers the full logits.
    """
    _check_positions(model, position_ids, what="score")
    logits = model(tokens[:, :-1], position_ids[:, :-1], attention_mask).float()  # [B, L-1, V/tp]
    rows = logits.shape[-1]
    start = mpu.get_tensor_model_parallel_rank() * rows  # this rank's slice of the vocabulary
    keep = torch.arange(start, start + rows, device=logits.device) < (vocab_size or start + rows)
    if allowed is not None:
        keep &= allowed.to(logits.device)[start:start + rows]
    logits = logits.masked_fill(~keep, float("-inf"))
    nll = mpu.vocab_parallel_cross_entropy(logits, tokens[:, 1:])  # [B, L-1]
    weights = target_mask[:, 1:].to(nll.device, torch.float32)
    # where the weight is 0 the token may be disallowed (nll inf): select instead of multiplying
    return -torch.where(weights > 0, nll * weights, torch.zeros_like(nll)).sum(dim=1)
