"""Fill decoding: complete a sequence of which some entries are given (super-resolution windows
whose overlap with earlier windows is already drawn): given tokens are fed as they are, the others
sampled in order."""
from __future__ import annotations

import torch

from megatron_t2i.generation.sampling import sample
from megatron_t2i.generation.state import Decoding, DecodingState, Prompt, check_positions


@torch.no_grad()
def fill(model, prompt: Prompt, given: torch.Tensor, decoding: Decoding = Decoding(),
         allowed: torch.Tensor | None = None,
         generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Complete `given` [B, N] after `prompt` (the N tokens continue its positions) -> [B, N]:
    entries >= 0 are kept and fed to the model as they are, entries -1 are sampled in order.
    Which entries are given must be the same in every row. A run of given tokens goes through the
    model in one read when the next token is to be sampled; only sampled tokens draw from the
    generators."""
    known = given[0] >= 0                                                     # [N]
    if not torch.equal(given >= 0, known.expand_as(given)):
        raise ValueError("fill: the given positions must be the same in every row")
    known = known.tolist()  # read on the host once, not one device sync per token
    n, last = given.shape[1], prompt.positions[:, -1]
    check_positions(model, prompt.positions, last[:, None] + torch.arange(1, n, device=last.device),
                    what="fill")  # the last token is never fed
    state = DecodingState(model, prompt, n, decoding.use_cache)
    out = given.clone()
    for step in range(n):
        if not known[step]:
            logits = state.logits()[:, -1, :decoding.vocab_size]
            if allowed is not None:
                logits = logits.masked_fill(~allowed[:logits.shape[-1]].to(logits.device),
                                            float("-inf"))
            out[:, step] = sample(logits, decoding.sampling, generators)
        if step + 1 < n:
            state.append(out[:, step], last + step + 1)
    return out
