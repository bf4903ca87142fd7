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


def pad_square(image: Image.Image, size: int, fill: int = 255) -> torch.Tensor:
    """PIL image -> uint8 [3, size, size]: RGB, the long side resized to `size`, centred on a
    square of grey level `fill` (white by default, as transparency is composited): nothing of
    the picture is cut off."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / max(w, h)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                         Image.Resampling.BICUBIC, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return torch.from_numpy(np.array(canvas, dtype=np.uint8)).permute(2, 0, 1)


FITS = {"crop": crop_square, "pad": pad_square}  # --image-fit
