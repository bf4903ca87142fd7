"""One vocabulary and the sequence templates of every task.

Token ids, in order (the same order as the original CogView, so its preset is exact):

    [0, C)            image codes of the VQ-VAE codebook (C = num_image_codes)
    [C, C + T)        text ids: SentencePiece id + C (T = num_text_tokens)
    [C + T, C + T + 27)  special tokens, in the order of SPECIALS
    [..., padded)     unused rows so the embedding splits evenly over tensor-parallel ranks

A template turns (text ids, image codes) into a `Sequence`: the token ids, their position ids and a
loss mask. `loss_mask[i] == 1` means token i is a training target predicted from tokens[:i]; the
trainer feeds tokens[:-1] and scores tokens[1:] with loss_mask[1:].

The layout is saved as JSON beside every data set and checkpoint; `check_compatible` turns any
difference into one clear error instead of a model silently reading the wrong ids.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields

import torch

from megatron_t2i.io_utils import read_json, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT = "megatron_t2i.token_layout/1"

SPECIALS = (
    ["[PAD]", "[BOI1]", "[BOI2]", "[BOI3]", "[EOI1]", "[EOI2]", "[EOI3]", "[ROI1]", "[ROI2]", "[ROI3]",
     "[SEP]", "[MASK]", "[CLS]", "[ENC]", "[TINY]", "[SMALL]", "[BASE]", "[BIG]"]
    + [f"[POS{i}]" for i in range(9)]
)
# The size token names the side of the code grid being generated; a grid between two of these
# sides (e.g. 12x12 codes of 48-pixel images) takes the token of the next larger one.
SIZE_TOKENS = {8: "[TINY]", 16: "[SMALL]", 32: "[BASE]", 64: "[BIG]"}
# The templates a task's sequences can follow (megatron_t2i/tasks.py says which task uses which).
TEMPLATES = ("text_to_image", "image_to_text", "super_resolution", "condition_to_image")
IMAGE_POSITIONS = ("after_text", "fixed")
# The order in which an image to generate is laid out: raster (row by row, one code per step) or
# lshape (Lformer: h L-shaped blocks of a grid of side h, each drawn in one step, see lshape_rank)
IMAGE_ORDERS = ("raster", "lshape")


def lshape_rank(side: int) -> torch.Tensor:
    """[side^2]: the place in L order of each cell, in raster order. Block t holds the cells
    (r, c) with max(r, c) = t, 2t + 1 of them: down the right column (0, t) ... (t, t), then
    right to left along the bottom row (t, t-1) ... (t, 0). Block t starts at t^2."""
    r, c = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    t = torch.maximum(r, c)
    return t * t + torch.where(c == t, r, 2 * t - c)


def lshape_order(side: int) -> torch.Tensor:
    """[side^2]: the raster index of the k-th cell in L order (the inverse of lshape_rank):
    codes_in_l_order = raster_codes[..., lshape_order(side)]."""
    return torch.argsort(lshape_rank(side))


def lshape_blocks(side: int) -> torch.Tensor:
    """[side^2]: the block of each place in L order (floor of its square root)."""
    return torch.arange(side).repeat_interleave(2 * torch.arange(side) + 1)


def lshape_inputs(codes: torch.Tensor, pad: int) -> torch.Tensor:
    """codes [..., side^2] in L order -> the inputs [..., side^2] of the L-shape slots that predict
    them: slot k reads the code of its target cell's up-left diagonal neighbour, `pad` where there
    is none. For block t >= 1 that is [pad, block t-1 (2t-1 codes), pad]; slot 0 (block 0) has no
    neighbour (the caller puts its context token there)."""
    n = codes.shape[-1]
    side = math.isqrt(n)
    t = lshape_blocks(side)
    offset = torch.arange(n) - t * t
    source = ((t - 1).clamp(min=0) ** 2 + offset - 1).clamp(0, n - 1)
    none = (offset == 0) | (offset == 2 * t)
    return torch.where(none, torch.full_like(codes, pad), codes[..., source])


def block_ids(kind: str, length: int, prefix: int = 0, real: int | None = None) -> torch.Tensor:
    """[length] block ids of one sequence for an attention kind (megatron_t2i/tasks.py):
    causal (each token its own block), prefix-visible (the first `prefix` tokens one block),
    bidirectional (one block). Positions from `real` on (trailing padding) get blocks after all
    others, so no real token sees them and cutting them off changes nothing. block-causal ids
    come from the template itself (e.g. L-shape blocks)."""
    real = length if real is None else real
    if kind == "causal":
        ids = torch.arange(real)
    elif kind == "prefix-visible":
        ids = torch.cat([torch.zeros(min(prefix, real), dtype=torch.long),
                         torch.arange(1, real - min(prefix, real) + 1)])
    elif kind == "bidirectional":
        ids = torch.zeros(real, dtype=torch.long)
    else:
        raise ValueError(f"attention kind {kind!r}: its block ids come from the template "
                         f"(known kinds here: causal, prefix-visible, bidirectional)")
    after = int(ids.max()) + 1 if real else 0
    return torch.cat([ids, torch.arange(after, after + length - real)])


def real_length(tokens: torch.Tensor, pad: int) -> int:
    """Tokens [L] before the trailing pads (the first pad after a caption is its end target, an
    input to nothing, so it counts as padding too)."""
    real = (tokens != pad).nonzero()
    return int(real.max()) + 1 if real.numel() else 0


class LayoutMismatchError(ValueError):
    """Data, tokenizers and checkpoint disagree about token ids."""


@dataclass
class Sequence:
    tokens: torch.Tensor        # [L] int64
    position_ids: torch.Tensor  # [L] int64
    loss_mask: torch.Tensor     # [L] float32, 1 where tokens[i] is a target
    image_start: int            # index of the first code of the image to generate (-1: none)
    # [L] int64: position i attends to j iff block_ids[j] <= block_ids[i]; None is causal
    # (block_ids() below for the attention kinds of megatron_t2i/tasks.py)
    block_ids: torch.Tensor | None = None
    # [L] int64: what position i-1 predicts at position i where that is not tokens[i] (L-shape:
    # slots read a neighbour's code and predict their own cell); None means tokens itself
    targets: torch.Tensor | None = None
    # [D] float: the vector the [MASK] slots of condition_to_image read (model/conditioning.py);
    # condition_present False: dropped for guidance, the model's null embedding instead
    condition: torch.Tensor | None = None
    condition_present: bool = True
    # of a CVAE model (model/cvae.py): the [D] vector its posterior reads (the image's CLIP
    # embedding) and the [d] standard-normal noise of its reparameterised z
    latent_source: torch.Tensor | None = None
    latent_noise: torch.Tensor | None = None
    # of a denoiser (model/diffusion.py): the clean latent patches [N, d] of the image, their
    # noised values at the [ENC] placeholders and the noise level sigma
    x0: torch.Tensor | None = None
    noisy_latents: torch.Tensor | None = None
    noise_level: float = 0.0
    # of masked training (model/masked.py): [N] bool, the patches the trunk reads
    visible: torch.Tensor | None = None
    # of a denoiser with an inpainting channel: [N] bool, the patches given (their x0)
    known_mask: torch.Tensor | None = None


@dataclass
class TokenLayout:
    num_image_codes: int = 1024     # VQ-VAE codebook size (C)
    num_text_tokens: int = 4000     # SentencePiece vocabulary size (T)
    image_grid: int = 16            # side of the code grid of one image (grid**2 codes)
    max_text_tokens: int = 28       # text ids kept in a text->image sequence
    # Position ids of what follows the text (the image of text->image): "after_text" numbers them
    # on from the text, as CogView does, so an image code's position id depends on the caption's
    # length; "fixed" numbers them as if the text had max_text_tokens ids, and starts the caption
    # direction (image first) at the same ids, so every code of the grid has one position id in
    # every task and a small model learns where things are much sooner.
    image_positions: str = "fixed"
    # the order of an image to generate in text->image sequences (IMAGE_ORDERS): raster, or
    # Lformer's L-shaped blocks (an h x h grid in h steps, see lshape_sequence). Records always
    # store codes in raster order; the decoder always receives them so.
    image_order: str = "raster"
    name: str = "custom"
    stats: dict = field(default_factory=lambda: {"truncated_text": 0}, compare=False, repr=False)

    def __post_init__(self):
        for f in ("num_image_codes", "num_text_tokens", "image_grid", "max_text_tokens"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ValueError(f"token layout: {f} must be a positive integer, got {getattr(self, f)!r}")
        if self.image_positions not in IMAGE_POSITIONS:
            raise ValueError(f"token layout: image_positions must be one of "
                             f"{', '.join(IMAGE_POSITIONS)}, got {self.image_positions!r}")
        if self.image_order not in IMAGE_ORDERS:
            raise ValueError(f"token layout: image_order must be one of {', '.join(IMAGE_ORDERS)}, "
                             f"got {self.image_order!r}")
        if not 1 <= self.image_grid <= max(SIZE_TOKENS):
            raise ValueError(f"token layout: image_grid must be between 1 and {max(SIZE_TOKENS)}, "
                             f"got {self.image_grid}")

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def cogview(cls) -> "TokenLayout":
        """Exactly the ids of the released CogView models (58,219 ids, 58,240 rows at TP=1)."""
        return cls(num_image_codes=8192, num_text_tokens=50000, image_grid=32, max_text_tokens=61,
                   image_positions="after_text", name="cogview")

    # ---- vocabulary ----------------------------------------------------------------------------
    @property
    def text_offset(self) -> int:
        return self.num_image_codes

    @property
    def special_offset(self) -> int:
        return self.num_image_codes + self.num_text_tokens

    @property
    def vocab_size(self) -> int:
        """Ids in use, before padding."""
        return self.special_offset + len(SPECIALS)

    def padded_vocab_size(self, tensor_parallel_size: int = 1, multiple: int = 128) -> int:
        step = multiple * tensor_parallel_size
        return int(math.ceil(self.vocab_size / step) * step)

    def special(self, name: str) -> int:
        try:
            return self.special_offset + SPECIALS.index(name)
        except ValueError:
            raise KeyError(f"unknown special token {name!r}; known: {' '.join(SPECIALS)}") from None

    def __getitem__(self, name: str) -> int:
        return self.special(name)

    @property
    def size_token(self) -> int:
        return self.special(SIZE_TOKENS[min(g for g in SIZE_TOKENS if g >= self.image_grid)])

    @property
    def image_tokens(self) -> int:
        return self.image_grid ** 2

    def text_tokens(self, text_ids) -> torch.Tensor:
        ids = torch.as_tensor(text_ids, dtype=torch.long).reshape(-1)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_text_tokens):
            raise ValueError(f"text id out of range [0, {self.num_text_tokens}): "
                             f"{ids.min().item()}..{ids.max().item()}")
        return ids + self.text_offset

    def image_codes(self, codes, count: int | None = None) -> torch.Tensor:
        ids = torch.as_tensor(codes, dtype=torch.long).reshape(-1)
        if count is not None and ids.numel() != count:
            raise ValueError(f"expected {count} image codes, got {ids.numel()}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_image_codes):
            raise ValueError(f"image code out of range [0, {self.num_image_codes}): "
                             f"{ids.min().item()}..{ids.max().item()}")
        return ids

    def is_image(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens < self.num_image_codes

    def is_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens >= self.text_offset) & (tokens < self.special_offset)

    def decode_text_ids(self, tokens) -> list[int]:
        """Text ids (SentencePiece ids) of the text tokens in `tokens`, others dropped."""
        t = torch.as_tensor(tokens, dtype=torch.long)
        return (t[self.is_text(t)] - self.text_offset).tolist()

    # ---- sequence lengths ----------------------------------------------------------------------
    def seq_length(self, template: str) -> int:
        """Fixed training length of a template's sequence (tokens incl. the last target)."""
        g2, t = self.image_tokens, self.max_text_tokens
        if template in ("text_to_image", "image_to_text", "condition_to_image"):
            return t + g2 + 4   # [ROI1] text [size] [BOI1] codes [EOI1] | [size] [BOI1] codes [EOI1] [ROI1] text
        if template == "super_resolution":
            return t + g2 // 4 + 4 + 4 + g2         # low-res prefix, [ROI2] [POS0] [size] [BOI2] codes
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")

    def max_positions(self, template: str) -> int:
        if template == "super_resolution":  # position ids restart at 0 at [ROI2]
            return max(self.max_text_tokens + self.image_tokens // 4 + 4, 4 + self.image_tokens)
        return self.seq_length(template) + (
            self._image_first_shift() if template == "image_to_text" else 0)

    def _image_first_shift(self) -> int:
        """Added to the position ids of `[size] [BOI1] codes ...` when the image comes first:
        with fixed positions its codes then have the ids they have after a caption."""
        return self.max_text_tokens + 1 if self.image_positions == "fixed" else 0

    # ---- templates -----------------------------------------------------------------------------
    def _text(self, text_ids, limit: int) -> torch.Tensor:
        ids = self.text_tokens(text_ids)
        if ids.numel() > limit:
            self.stats["truncated_text"] += 1
            n = self.stats["truncated_text"]
            if n & (n - 1) == 0:  # warn on the 1st, 2nd, 4th, 8th... so long runs stay readable
                logger.warning("text of %d tokens truncated to %d (%d captions truncated so far)",
                               ids.numel(), limit, n)
            ids = ids[:limit]
        return ids

    def _after_text(self, n: int, text: torch.Tensor) -> torch.Tensor:
        """Position ids of a sequence of n tokens `[ROI1] text ...` (see image_positions)."""
        positions = torch.arange(n)
        if self.image_positions == "fixed":
            positions[1 + text.numel():] += self.max_text_tokens - text.numel()
        return positions

    def _finish(self, parts, pad_to, image_start, positions=None, loss_from=1, eos_target=False,
                template="text_to_image"):
        tokens = torch.cat([torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in parts])
        n = tokens.numel()
        position_ids = torch.arange(n) if positions is None else positions
        loss_mask = torch.ones(n)
        loss_mask[:loss_from] = 0
        if pad_to is not None:
            if n > pad_to:
                raise ValueError(f"sequence of {n} tokens exceeds the padded length {pad_to}")
            extra = pad_to - n
            tokens = torch.cat([tokens, torch.full((extra,), self["[PAD]"], dtype=torch.long)])
            last = position_ids[-1].item() if n else -1
            # pads are never attended to by real tokens (causal, at the end); clamp their
            # positions so they stay inside the position table
            pad_pos = torch.arange(last + 1, last + 1 + extra).clamp_(max=self.max_positions(template) - 1)
            position_ids = torch.cat([position_ids, pad_pos])
            pad_mask = torch.zeros(extra)
            if eos_target and extra:
                pad_mask[0] = 1  # the first [PAD] after a caption is its end-of-text target
            loss_mask = torch.cat([loss_mask, pad_mask])
        return Sequence(tokens, position_ids, loss_mask, image_start)

    def text_to_image(self, text_ids, image_codes=None, pad: bool = True) -> Sequence:
        """`[ROI1] text [size] [BOI1] codes [EOI1] [PAD]...`; without codes, the generation prompt
        `[ROI1] text [size] [BOI1]`."""
        return self._image_after(self._text(text_ids, self.max_text_tokens), image_codes, pad)

    def condition_to_image(self, slots: int, image_codes=None, pad: bool = True) -> Sequence:
        """`[ROI1] [MASK] x slots [size] [BOI1] codes [EOI1] [PAD]...`: text->image with the caption
        replaced by `slots` placeholders whose inputs are embedding slots (a projected CLIP
        embedding, model/conditioning.py). The image has the position ids it has after a caption
        (with fixed image positions), and the length of text->image, padding included."""
        if not 0 < slots <= self.max_text_tokens:
            raise ValueError(f"condition slots must be 1..{self.max_text_tokens} (the caption's "
                             f"room), got {slots}")
        seq = self._image_after(torch.full((slots,), self["[MASK]"], dtype=torch.long),
                                image_codes, pad)
        seq.loss_mask[1:1 + slots] = 0  # the placeholders are given, not something to predict
        return seq

    def _image_after(self, text: torch.Tensor, image_codes, pad: bool) -> Sequence:
        head = [[self["[ROI1]"]], text, [self.size_token, self["[BOI1]"]]]
        start = 3 + text.numel()
        if image_codes is None:
            return self._finish(head, None, start, self._after_text(start, text))
        codes = self.image_codes(image_codes, self.image_tokens)
        n = start + codes.numel() + 1
        seq = self._finish(head + [codes, [self["[EOI1]"]]],
                           self.seq_length("text_to_image") if pad else None, start,
                           self._after_text(n, text))
        return self.lshape_sequence(seq) if self.image_order == "lshape" else seq

    def lshape_sequence(self, seq: Sequence) -> Sequence:
        """The raster sequence `... [BOI1] codes [EOI1] [PAD]...` as Lformer trains it: [BOI1] is
        the context slot predicting block 0, then the h^2 - 1 slots of blocks 1..h-1, each reading
        its cell's up-left neighbour (lshape_inputs) and predicting its cell (`targets`), at the
        position id its cell has in raster order. Block-causal: a slot sees the caption, every
        earlier block and its whole own block. No end token is predicted; the sequence is one
        token shorter and keeps the raster length with one more [PAD]."""
        s, n, side = seq.image_start, self.image_tokens, self.image_grid
        order = lshape_order(side)
        codes = seq.tokens[s:s + n][order]                                   # L order
        tokens, positions = seq.tokens.clone(), seq.position_ids.clone()
        tokens[s:s + n - 1] = lshape_inputs(codes, self["[PAD]"])[1:]
        tokens[s + n - 1], tokens[s + n] = self["[EOI1]"], self["[PAD]"]
        positions[s:s + n - 1] = positions[s - 1] + order[1:]
        targets = tokens.clone()
        targets[s:s + n] = codes
        loss_mask = seq.loss_mask.clone()
        loss_mask[s + n] = 0
        length = tokens.numel()
        blocks = torch.arange(length)
        blocks[s - 1:s - 1 + n] = s - 1 + lshape_blocks(side)
        blocks[s - 1 + n:] = s - 1 + side + torch.arange(length - (s - 1 + n))
        return Sequence(tokens, positions, loss_mask, s, block_ids=blocks, targets=targets)

    def to_lshape(self, codes: torch.Tensor) -> torch.Tensor:
        """Raster codes [..., grid^2] -> L order."""
        return codes[..., lshape_order(self.image_grid).to(codes.device)]

    def from_lshape(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [..., grid^2] in L order -> raster order (what the decoder reads)."""
        return codes[..., lshape_rank(self.image_grid).to(codes.device)]

    def text_to_latents(self, text_ids) -> Sequence:
        """A denoiser's sequence: text->image's, padded, with its codes replaced by [ENC]
        placeholders (each the input slot of one noisy latent patch, model/diffusion.py) and
        [BOI1] the noise level's slot. Training and sampling read the same one."""
        return self._latents(self.text_to_image(text_ids, self._no_codes()))

    def condition_to_latents(self, slots: int) -> Sequence:
        """A language-free denoiser's sequence: condition_to_image's with [ENC] placeholders."""
        return self._latents(self.condition_to_image(slots, self._no_codes()))

    def _no_codes(self) -> torch.Tensor:
        if self.image_order != "raster":
            raise ValueError(f"a denoiser's latents are laid out in raster order; this token "
                             f"layout's image_order is {self.image_order}")
        return torch.zeros(self.image_tokens, dtype=torch.long)

    def _latents(self, seq: Sequence) -> Sequence:
        seq.tokens[seq.image_start:seq.image_start + self.image_tokens] = self["[ENC]"]
        return seq

    def completion(self, text_ids, prefix_codes) -> Sequence:
        """Prompt for "text and part of an image": the t2i prompt followed by the first codes."""
        prompt = self.text_to_image(text_ids)
        codes = self.image_codes(prefix_codes)
        if codes.numel() >= self.image_tokens:
            raise ValueError(f"completion keeps {codes.numel()} codes but the image has only "
                             f"{self.image_tokens}")
        positions = torch.cat([prompt.position_ids,
                               prompt.position_ids[-1] + 1 + torch.arange(codes.numel())])
        return self._finish([prompt.tokens, codes], None, prompt.image_start, positions)

    def image_to_text(self, image_codes, text_ids=None, pad: bool = True) -> Sequence:
        """`[size] [BOI1] codes [EOI1] [ROI1] text [PAD]...` (the caption direction); without text,
        the captioning prompt ending in [ROI1]."""
        codes = self.image_codes(image_codes, self.image_tokens)
        head = [[self.size_token, self["[BOI1]"]], codes, [self["[EOI1]"], self["[ROI1]"]]]
        text = self._text(text_ids, self.max_text_tokens) if text_ids is not None else None
        n = codes.numel() + 4 + (text.numel() if text is not None else 0)
        positions = torch.arange(n) + self._image_first_shift()
        if text is None:
            return self._finish(head, None, -1, positions)
        return self._finish(head + [text], self.seq_length("image_to_text") if pad else None, -1,
                            positions, eos_target=True, template="image_to_text")

    def super_resolution(self, text_ids, low_codes, high_codes=None, pad: bool = True) -> Sequence:
        """`[ROI1] text [size] [BOI1] low [EOI1] [ROI2] [POS0] [size] [BOI2] high`: a (grid/2)^2
        low-resolution window and the grid^2 high-resolution window over the same area. Position
        ids restart at 0 at [ROI2]."""
        text = self._text(text_ids, self.max_text_tokens)
        low = self.image_codes(low_codes, self.image_tokens // 4)
        prefix = [[self["[ROI1]"]], text, [self.size_token, self["[BOI1]"]], low, [self["[EOI1]"]]]
        n_prefix = 4 + text.numel() + low.numel()
        second = [self["[ROI2]"], self["[POS0]"], self.size_token, self["[BOI2]"]]
        parts = prefix + [second]
        if high_codes is not None:
            parts.append(self.image_codes(high_codes, self.image_tokens))
        n = n_prefix + 4 + (self.image_tokens if high_codes is not None else 0)
        positions = torch.cat([self._after_text(n_prefix, text), torch.arange(n - n_prefix)])
        pad_to = self.seq_length("super_resolution") if (pad and high_codes is not None) else None
        return self._finish(parts, pad_to, n_prefix + 4, positions=positions,
                            template="super_resolution")

    def template(self, name: str, text_ids, image_codes, low_codes=None) -> Sequence:
        """The padded training sequence of template `name` (see TEMPLATES) for one record."""
        if name == "text_to_image":
            return self.text_to_image(text_ids, image_codes)
        if name == "image_to_text":
            return self.image_to_text(image_codes, text_ids)
        if name == "super_resolution":
            if low_codes is None:
                raise ValueError("the super_resolution template needs low-resolution codes")
            return self.super_resolution(text_ids, low_codes, image_codes)
        if name == "condition_to_image":
            raise ValueError("the condition_to_image template takes its slot count: call "
                             "condition_to_image(slots, codes)")
        raise ValueError(f"unknown template {name!r}; expected one of {', '.join(TEMPLATES)}")

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.compare}
        d.update(format=FORMAT, vocab_size=self.vocab_size, specials=list(SPECIALS))
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "token layout") -> "TokenLayout":
        if d.get("format") != FORMAT:
            raise LayoutMismatchError(f"{source}: not a token layout of format {FORMAT} "
                                      f"(format field is {d.get('format')!r})")
        if d.get("specials") != list(SPECIALS):
            raise LayoutMismatchError(f"{source}: special tokens differ from this version's")
        known = {f.name for f in fields(cls) if f.compare}
        # files written before these fields existed
        d = {"image_positions": "after_text", "image_order": "raster", **d}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as e:
            raise LayoutMismatchError(f"{source}: {e}") from None

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "TokenLayout":
        try:
            d = read_json(path, f"token layout {path}", expect=dict)
        except ValueError as e:
            raise LayoutMismatchError(str(e)) from None
        return cls.from_dict(d, source=path)

    def check_compatible(self, other: "TokenLayout", what: str) -> None:
        """Raise one clear error if `other` (read from `what`) assigns different ids."""
        for f in fields(self):
            if f.compare and getattr(self, f.name) != getattr(other, f.name) and f.name != "name":
                raise LayoutMismatchError(
                    f"{what}: token layout mismatch in {f.name}: expected {getattr(self, f.name)}, "
                    f"found {getattr(other, f.name)}")

