"""L-shape block-parallel decoding (Lformer): an h x h grid of codes in h forward steps.

Step t reads the 2t + 1 slots of block t at once, each holding the code of its cell's up-left
neighbour in block t - 1 ([PAD] where there is none; TokenLayout.lshape_sequence is the template
it was trained on), and samples the 2t + 1 codes of block t together, each position from its own
logits with top-k / top-p. Step 0 is the prompt itself: its last token ([BOI1], the context slot)
predicts block 0, the top-left cell. With a KV cache every step appends one block; without one
every step recomputes the whole sequence (the reference the cached path is tested against).

Classifier-free guidance runs a second state over the unconditional prompt, fed the same blocks
(each state its own cache). Completion keeps the first k blocks given (the top-left k x k square)
and draws blocks k..h-1: Lformer's regeneration from block k. Codes come back in raster order.
"""
from __future__ import annotations

import math

import torch

from megatron_t2i.generation.sampling import classifier_free_guidance, sample
from megatron_t2i.generation.state import Decoding, DecodingState, Prompt, check_positions
from megatron_t2i.progress import progress_bar
from megatron_t2i.tokenizers.layout import lshape_order, lshape_rank


def block_inputs(previous: torch.Tensor, pad: int) -> torch.Tensor:
    """Codes [B, 2t - 1] of block t - 1 -> the inputs [B, 2t + 1] of block t's slots."""
    b, n = previous.shape
    padding = previous.new_full((b, 1), pad)
    return torch.cat([padding, previous, padding], dim=1) if n else padding


@torch.no_grad()
def generate_lshape(model, prompt: Prompt, side: int, pad: int, decoding: Decoding = Decoding(),
                    allowed: torch.Tensor | None = None,
                    generators: list[torch.Generator] | None = None,
                    uncond: Prompt | None = None, given: torch.Tensor | None = None,
                    progress: bool | str = False) -> torch.Tensor:
    """Sample a side x side grid after `prompt` (ending in the context slot) -> raster codes
    LongTensor [B, side^2].

    pad: the id of the inputs without a neighbour ([PAD]). allowed: bool [V] of what may be drawn
    (image codes). generators: one per row (per-sample seeds), the same on every TP rank.
    uncond: classifier-free guidance's prompt (with decoding.cfg_scale). given: raster codes
    [B, k^2] of the top-left k x k square (the first k blocks), kept as they are.
    """
    guided = decoding.cfg_scale != 0.0
    if guided and uncond is None:
        raise ValueError("generate_lshape: cfg_scale needs the unconditional prompt (uncond)")
    n, b = side * side, prompt.batch
    device = prompt.tokens.device
    kept = 0
    if given is not None:
        kept = math.isqrt(given.shape[1])
        if kept * kept != given.shape[1] or not 0 < kept < side:
            raise ValueError(f"generate_lshape: the given codes must fill the first k blocks (a "
                             f"k x k square, 0 < k < {side}), got {given.shape[1]} codes")
    # each slot sits at its cell's raster position id, counted from the context slot's
    order = lshape_order(side).to(device)
    prompts = [prompt] + ([uncond] if guided else [])
    states = [DecodingState(model, p, n - 1, decoding.use_cache) for p in prompts]
    for p in prompts:
        check_positions(model, p.positions, p.positions[:, -1:] + n - 1)
    codes = prompt.tokens.new_empty(b, n)                                   # L order
    if kept:
        square = lshape_rank(kept).to(device)
        # raster index inside the k x k square -> L place; the first k^2 L places are that square
        codes[:, square] = given
    vocab = decoding.vocab_size
    desc = progress if isinstance(progress, str) else None
    for t in progress_bar(range(side), desc=desc, unit="block", disable=not progress,
                          leave=False):
        block = slice(t * t, (t + 1) * (t + 1))
        if t:
            inputs = block_inputs(codes[:, (t - 1) ** 2:t * t], pad)
            for p, state in zip(prompts, states):
                state.append(inputs, p.positions[:, -1:] + order[block], block=True)
        if t < kept:
            continue  # given: read with the first block drawn
        logits = states[0].logits(last=2 * t + 1)[..., :vocab]               # [B, 2t+1, V]
        if guided:
            logits = classifier_free_guidance(logits, states[1].logits(last=2 * t + 1)[..., :vocab],
                                              decoding.cfg_scale)
        if allowed is not None:
            logits = logits.masked_fill(~allowed[:logits.shape[-1]].to(device), float("-inf"))
        codes[:, block] = sample(logits, decoding.sampling, generators)
    return codes[:, lshape_rank(side).to(device)]

