"""Test image files of every kind the packers meet, and the pixels a faithful decoder returns."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 16, 8


def random_pixels(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Smooth-ish random RGB pixels (JPEG keeps them close), uint8 [height, width, 3]."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))


def write_image(path: Path, kind: str, seed: int) -> np.ndarray:
    """Write a test image of `kind` to `path`; returns the RGB pixels a faithful decoder sees.

    Kinds: jpeg, grey_jpeg, cmyk_jpeg, png, rgba_png, palette_png, png_named_jpg (PNG bytes,
    whatever the name), bmp (24-bit), palette_bmp, truncated (half a JPEG), text (not an image).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(random_pixels(seed))
    if kind == "jpeg":
        image.save(path, "JPEG", quality=95)
    elif kind == "grey_jpeg":
        image.convert("L").save(path, "JPEG", quality=95)
    elif kind == "cmyk_jpeg":
        image.convert("CMYK").save(path, "JPEG", quality=95)
    elif kind in ("png", "png_named_jpg"):
        image.save(path, "PNG")
    elif kind == "rgba_png":
        image.convert("RGBA").save(path, "PNG")
    elif kind == "palette_png":
        image.convert("P").save(path, "PNG")
    elif kind == "bmp":
        image.save(path, "BMP")
    elif kind == "palette_bmp":
        image.convert("P").save(path, "BMP")
    elif kind == "truncated":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        return np.asarray(image)
    elif kind == "text":
        path.write_text("not an image")
        return np.asarray(image)
    else:
        raise ValueError(kind)
    return np.asarray(Image.open(path).convert("RGB"))
