"""Beam search (captions). The N live hypotheses are one batch; after each step the state's rows
(tokens, positions, KV cache) follow their hypotheses, so no prefix is ever recomputed. Each step
ranks every one-token extension by log-likelihood: those among the best N that end with the end
token finish, the best N that do not stay live. Finished hypotheses are ranked by log-likelihood
per token (end token included), so a caption does not win merely by being short. The search stops
at the length limit, when a step's best N all end (so beam 1 is exactly greedy), or once N have
finished that no live hypothesis can still overtake (its sum only falls, so its per-token score
ends at most at sum / limit)."""
from __future__ import annotations

import torch

from megatron_t2i.generation.state import Decoding, DecodingState, Prompt


@torch.no_grad()
def beam_search(model, prompt: Prompt, num_tokens: int, beam_size: int, allowed: torch.Tensor,
                end_token: int, decoding: Decoding = Decoding()) -> list[tuple[torch.Tensor, float]]:
    """Finished hypotheses after `prompt` (one row) -> [(tokens [n] ending with end_token,
    log-likelihood)], best first by log-likelihood / n.

    allowed: bool [V], the vocabulary each step is normalised over (it must contain end_token).
    num_tokens: the most tokens a hypothesis has, its end included; at the last step only the
    end may follow and adds 0 (the template's limit ends the caption). decoding.use_cache=False
    recomputes every hypothesis at each step: the reference the cached path is tested against.
    """
    if beam_size < 1 or num_tokens < 1:
        raise ValueError(f"beam_search: beam_size and num_tokens must be >= 1, got {beam_size}, "
                         f"{num_tokens}")
    state = DecodingState(model, prompt, num_tokens, decoding.use_cache)
    p, last_position = prompt.tokens.shape[1], prompt.positions[0, -1]
    device = prompt.tokens.device
    sums = torch.zeros(1, device=device)  # [k] log-likelihood of each live hypothesis
    finished = []
    for step in range(num_tokens):
        logits = state.logits()[:, -1, :decoding.vocab_size]                # [k, V]
        logp = logits.masked_fill(~allowed[:logits.shape[-1]].to(logits.device),
                                  float("-inf")).log_softmax(dim=-1)
        if step == num_tokens - 1:  # the length limit ends every hypothesis
            logp = torch.full_like(logp, float("-inf"))
            logp[:, end_token] = 0.0
        vocab = logp.shape[-1]
        candidates = (sums[:, None] + logp).flatten()                       # [k * V]
        values, indices = candidates.topk(min(2 * beam_size, candidates.numel()))
        rows, tokens, kept, first_live = [], [], [], None
        for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist())):
            if value == float("-inf"):
                break
            row, token = divmod(index, vocab)
            if token != end_token:
                first_live = rank if first_live is None else first_live
                rows.append(row)
                tokens.append(token)
                kept.append(value)
                if len(rows) == beam_size:
                    break
            elif rank < beam_size:  # an end outside the step's best k is not a best continuation
                ended = torch.cat([state.tokens[row, p:state.length],
                                   prompt.tokens.new_tensor([token])])
                finished.append((ended, value))
        # stop when the step's best k all ended (beam 1: greedy's end), or nothing live can win
        if first_live is None or first_live >= beam_size \
                or _settled(finished, beam_size, max(kept) / num_tokens):
            break
        state.select(torch.tensor(rows, device=device))  # the kept hypotheses, in their new order
        sums = torch.tensor(kept, device=device)
        state.append(torch.tensor(tokens, device=device), last_position + step + 1)
    return sorted(finished, key=lambda f: f[1] / f[0].numel(), reverse=True)


def _settled(finished, beam_size: int, bound: float) -> bool:
    """Whether beam_size hypotheses have finished and no live one can overtake the worst of
    the best beam_size: log-probabilities are <= 0, so a live hypothesis with sum s ends with a
    per-token score of at most s / (longest length), the `bound` of the best live one."""
    if len(finished) < beam_size:
        return False
    scores = sorted((ll / tokens.numel() for tokens, ll in finished), reverse=True)
    return scores[beam_size - 1] >= bound
