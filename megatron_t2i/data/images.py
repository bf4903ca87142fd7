"""Robust image loading: any valid file becomes an 8-bit RGB PIL image, or one clear reason why not.

Pillow's plain `convert("RGB")` is wrong for several valid inputs, so they are handled here:
  - transparency (RGBA, LA, P with a transparent colour): composited on white, instead of the
    hidden colour of transparent pixels showing through (often black);
  - 16-bit and 32-bit grey (I;16, I, F): scaled to 8 bits, instead of clipped at 255 (which turns
    a 16-bit image almost white);
  - CMYK: through the embedded ICC profile when there is one, else Pillow's formula;
  - EXIF orientation: applied, so photos are upright.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageCms, ImageOps

UNREADABLE = "unreadable image"
UNSUPPORTED = "unsupported image mode"


class BadInput(ValueError):
    """An input that cannot be used; `reason` is one of the counted skip categories."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def load_rgb(path: str) -> Image.Image:
    """Decode `path` completely (so truncation is caught here) and convert it to RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, zlib errors...
        raise BadInput(UNREADABLE, f"{type(e).__name__}: {e}") from None
    try:
        return to_rgb(image)
    except Exception as e:
        raise BadInput(UNSUPPORTED, f"mode {image.mode}: {type(e).__name__}: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":  # I;16, I;16B, I (16-bit PNGs in older Pillow), F
        a = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "CMYK" and image.info.get("icc_profile"):
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
            return ImageCms.profileToProfile(image, profile, ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: the formula below is still a fair conversion
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
