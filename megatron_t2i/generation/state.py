"""The state every decoding strategy works on: a batch of sequences being extended.

Tokens, position ids and block ids [B, capacity], of which the first `length` are filled. With a
KV cache the model reads each token once: `logits()` feeds only what it has not read, and the keys
and values of everything before come from the cache. Without one (use_cache=False) it recomputes
the whole sequence at every call: the slow reference the cached path is tested against.

Attention follows the block ids: position i sees position j iff block[j] <= block[i]. By default a
token is a block of its own after all before it, which is plain causal attention; a strategy that
writes several tokens at once (block-parallel decoding) appends them with one block id and reads
them in one step. A step of several new tokens after cached ones always passes its mask.

Tensor parallelism: logits are gathered from every TP rank, so all ranks see the same [B, V] rows
and, with generators seeded alike, sample the same tokens; no broadcast is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_t2i.generation.sampling import SamplingConfig


@dataclass(frozen=True)
class Decoding:
    """How to decode, the same for every prompt of a run."""
    sampling: SamplingConfig = SamplingConfig()
    cfg_scale: float = 0.0          # classifier-free guidance (0: none)
    use_cache: bool = True
    vocab_size: int | None = None   # ids in use (layout.vocab_size): padding rows are never drawn,
    #                                 and random streams do not depend on the TP padding


@dataclass(frozen=True)
class Prompt:
    tokens: torch.Tensor     # [B, P]
    positions: torch.Tensor  # [B, P]
    # of a conditioned model: the vectors [B, D] its slot placeholders read, and which rows have
    # one (False: the null embedding, e.g. classifier-free guidance's unconditional branch)
    condition: torch.Tensor | None = None
    condition_mask: torch.Tensor | None = None
    # of a CVAE model: the latent z [B, d] its context slot reads (GPT.prior_latent)
    latent: torch.Tensor | None = None

    def __post_init__(self):
        if self.tokens.dim() != 2 or self.tokens.shape != self.positions.shape \
                or self.tokens.shape[1] == 0:
            raise ValueError(f"prompt: tokens and positions must both be [batch, length > 0], got "
                             f"{list(self.tokens.shape)} and {list(self.positions.shape)}")

    @classmethod
    def of(cls, sequence, rows: int, device) -> "Prompt":
        """A layout Sequence (one prompt, with its condition if any) repeated for `rows` samples,
        on `device`."""
        condition = mask = None
        if sequence.condition is not None:
            condition = sequence.condition.to(device).expand(rows, -1)
            mask = torch.full((rows,), sequence.condition_present, device=device)
        return cls(sequence.tokens.to(device).expand(rows, -1),
                   sequence.position_ids.to(device).expand(rows, -1), condition, mask)

    def rows(self, index) -> "Prompt":
        """The prompt of some of the rows."""
        pick = (lambda t: t[index] if t is not None else None)
        return Prompt(self.tokens[index], self.positions[index], pick(self.condition),
                      pick(self.condition_mask), pick(self.latent))

    def conditions(self) -> dict:
        """The keywords the model reads with the prompt (GPT.forward)."""
        out = {"condition": self.condition, "condition_mask": self.condition_mask} \
            if self.condition is not None else {}
        return {**out, "latent": self.latent} if self.latent is not None else out

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]


def check_positions(model, *positions: torch.Tensor, what: str = "generate") -> None:
    """One line when position ids fall outside the model's table."""
    limit = model.config.max_position_embeddings
    for p in positions:
        if p.numel() and (p.min() < 0 or p.max() >= limit):
            raise ValueError(f"{what}: position ids {p.min().item()}..{p.max().item()} fall outside "
                             f"the model's {limit} positions (a sequence too long, or a task the "
                             f"model was not trained for: its positions come from pretrain.py "
                             f"--tasks)")


class DecodingState:
    def __init__(self, model, prompt: Prompt, new_tokens: int, use_cache: bool = True):
        """Room for the prompt and `new_tokens` more; a KV cache of that length when use_cache."""
        b, p = prompt.tokens.shape
        capacity = p + new_tokens
        device = prompt.tokens.device
        self.model = model
        self.tokens = prompt.tokens.new_empty(b, capacity)
        self.positions = prompt.positions.new_empty(b, capacity)
        self.blocks = torch.empty(b, capacity, dtype=torch.long, device=device)
        self.tokens[:, :p], self.positions[:, :p] = prompt.tokens, prompt.positions
        self.blocks[:, :p] = torch.arange(p, device=device)
        self.length, self.next_block, self.causal = p, p, True
        self.cache = model.allocate_kv_cache(b, capacity) if use_cache else None
        self.conditions = prompt.conditions()  # read with the prompt, where its slots are

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def append(self, tokens: torch.Tensor, positions: torch.Tensor, block: bool = False) -> None:
        """Add tokens [B] or [B, S] with positions of the same shape (or [S]), not read yet.
        block=True: the S tokens form one block (they see each other), after everything before."""
        tokens = tokens.reshape(self.batch, -1)
        s, end = tokens.shape[1], self.length + tokens.shape[1]
        if end > self.tokens.shape[1]:
            raise ValueError(f"decoding state: {end} tokens exceed its capacity "
                             f"{self.tokens.shape[1]}")
        self.tokens[:, self.length:end] = tokens
        self.positions[:, self.length:end] = torch.as_tensor(positions).reshape(-1, s) \
            .to(self.positions.device).expand(self.batch, s)
        if block:
            self.blocks[:, self.length:end] = self.next_block
            self.next_block += 1
            self.causal = self.causal and s == 1
        else:
            self.blocks[:, self.length:end] = self.next_block + torch.arange(s, device=tokens.device)
            self.next_block += s
        self.length = end

    def logits(self, last: int = 1) -> torch.Tensor:
        """Run the model over what it has not read -> float32 logits [B, last, V] (all TP ranks)
        of the last `last` positions, each predicting the token after it."""
        start = self.cache.length if self.cache is not None else 0
        if start >= self.length:
            raise ValueError("decoding state: nothing new to read (append tokens first)")
        out = self.model(self.tokens[:, start:self.length], self.positions[:, start:self.length],
                         attention_mask=self._mask(start, self.length), kv_cache=self.cache,
                         gather_logits=True, **(self.conditions if start == 0 else {}))
        return out[:, -last:].float()

    def _mask(self, start: int, end: int) -> torch.Tensor | None:
        """bool [B, 1, end - start, end] of the queries start..end over the keys 0..end, or None
        where the model's default is exact: a causal read from the start, or one new token."""
        if self.causal and (start == 0 or end - start == 1):
            return None
        keys, queries = self.blocks[:, :end], self.blocks[:, start:end]
        return keys[:, None, None, :] <= queries[:, None, :, None]

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` tokens, their keys and values included
        (e.g. to redraw from a given point)."""
        if not 0 < length <= self.length:
            raise ValueError(f"decoding state: cannot truncate {self.length} tokens to {length}")
        self.length = length
        self.next_block = int(self.blocks[:, :length].max()) + 1
        if self.cache is not None and self.cache.length > length:
            self.cache.truncate(length)

    def select(self, rows: torch.Tensor) -> None:
        """Keep the batch rows `rows` [B'] (they may repeat or reorder, e.g. beam search)."""
        self.tokens, self.positions, self.blocks = (self.tokens[rows], self.positions[rows],
                                                    self.blocks[rows])
        self.conditions = {k: v[rows] for k, v in self.conditions.items()}
        if self.cache is not None:
            self.cache.select(rows)
