"""What every image tokenizer and the CLIP do to a picture before they read it."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def crop_square(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> uint8 [3, size, size]: RGB, the short side resized to `size` (antialiased
    bicubic), centre crop."""
    image = image.convert("RGB")
    w, h = image.size
    if min(w, h) != size:
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                             Image.Resampling.BICUBIC, reducing_gap=3.0)
        w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
