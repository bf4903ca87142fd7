"""Robust image loading: any valid file becomes an 8-bit RGB PIL image, or one clear reason why not.

Pillow's plain `convert("RGB")` is wrong for several valid inputs, so they are handled here:
  - transparency (RGBA, LA, P with a transparent colour): composited on white, instead of the
    hidden colour of transparent pixels showing through (often black);
  - 16-bit and 32-bit grey (I;16, I, F): scaled to 8 bits, instead of clipped at 255 (which turns
    a 16-bit image almost white);
  - CMYK: through the embedded ICC profile when there is one, else Pillow's formula;
  - EXIF orientation: applied, so photos are upright.

Before decoding, the header's size is checked: more than `max_pixels` (a decompression bomb, or
just too big to be worth it) or a shorter side below `min_side` is a counted skip.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageCms, ImageOps

UNREADABLE = "unreadable image"
UNSUPPORTED = "unsupported image mode"
TOO_LARGE = "image too large"
TOO_SMALL = "image too small"
MAX_PIXELS = 64_000_000  # default limit: 8000 x 8000


class BadInput(ValueError):
    """An input that cannot be used; `reason` is one of the counted skip categories."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def load_rgb(path: str | bytes, max_pixels: int = MAX_PIXELS, min_side: int = 0) -> Image.Image:
    """Decode an image file (a path, or its bytes) completely, so truncation is caught here, and
    convert it to RGB."""
    try:
        with Image.open(path if isinstance(path, str) else io.BytesIO(path)) as image:
            w, h = image.size
            if w * h > max_pixels:
                raise BadInput(TOO_LARGE, f"{w}x{h} pixels, more than --max-image-pixels "
                                          f"{max_pixels}")
            if min(w, h) < min_side:
                raise BadInput(TOO_SMALL, f"{w}x{h} pixels, a side below --min-image-side "
                                          f"{min_side}")
            image.load()
            image = ImageOps.exif_transpose(image)
    except BadInput:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit, met before ours is checked
        raise BadInput(TOO_LARGE, str(e)) from None
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
