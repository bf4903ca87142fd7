"""A tiny learnable token data set for training tests: each image's codes are a function of its
caption, so the loss can fall and a model must read the text."""
from __future__ import annotations

import numpy as np

from megatron_t2i.data.lmdb_store import write_token_dataset
from megatron_t2i.tokenizers.layout import TokenLayout

TOY_LAYOUT = TokenLayout(num_image_codes=32, num_text_tokens=40, image_grid=8, max_text_tokens=6,
                         name="toy")


def write_toy_dataset(path: str, count: int = 64, seed: int = 0,
                      layout: TokenLayout = TOY_LAYOUT, clip_dim: int = 0,
                      image_tokenizer: str | None = None) -> str:
    """clip_dim: also a unit 'clip_image' array per record (for --tasks clip2image);
    image_tokenizer: a vqvae.pt recorded as the data set's (a denoiser reads its codebook)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        text = rng.integers(0, layout.num_text_tokens, size=rng.integers(2, layout.max_text_tokens + 1))
        base = (text[0] * 7 + np.arange(layout.image_tokens) * text[1]) % layout.num_image_codes
        records.append((text, base, f"toy/{i:05d}"))
        if clip_dim:
            f = rng.standard_normal(clip_dim)
            records[-1] += (None, {"clip_image": f / np.linalg.norm(f)})
    tokenizer = {}
    if image_tokenizer:
        from megatron_t2i.tokenizers.vqvae import file_sha256
        tokenizer = {"image_tokenizer_sha256": file_sha256(image_tokenizer),
                     "report": {"image_tokenizer_path": image_tokenizer}}
    write_token_dataset(path, records, layout, **tokenizer)
    return path
