"""Which ids may be drawn where: bool masks over the model's (padded) vocabulary."""
from __future__ import annotations

import torch


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


def caption_vocab_mask(layout, vocab_size: int) -> torch.Tensor:
    """bool [vocab_size]: what a caption is made of, the text ids and its end token [PAD]."""
    return text_vocab_mask(layout, vocab_size, extra=(layout["[PAD]"],))
