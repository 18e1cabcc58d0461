"""The packer's view of `dualenc.images`: validation and the keep-or-re-encode rules; also the
image-file helpers the other packer tests build their fixtures with."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualenc.images import ImageProblem, prepare_images, read_image_file

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


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("kind", ["jpeg", "grey_jpeg", "png", "rgba_png", "palette_png", "png_named_jpg", "bmp"])
def test_tensorflow_decodable_images_are_stored_byte_for_byte(tmp_path, kind):
    path = tmp_path / ("image.jpg" if kind == "png_named_jpg" else f"image.{kind}")
    write_image(path, kind, seed=1)
    assert read_image_file(path) == path.read_bytes()


def test_cmyk_jpeg_is_re_encoded_as_rgb_jpeg_with_the_same_colours(tmp_path):
    expected = write_image(tmp_path / "cmyk.jpg", "cmyk_jpeg", seed=2)
    stored = _decoded(read_image_file(tmp_path / "cmyk.jpg"))
    assert (stored.format, stored.mode) == ("JPEG", "RGB")
    assert np.abs(np.asarray(stored).astype(int) - expected).mean() < 3


def test_palette_bmp_is_re_encoded_losslessly_as_png(tmp_path):
    expected = write_image(tmp_path / "palette.bmp", "palette_bmp", seed=3)
    stored = _decoded(read_image_file(tmp_path / "palette.bmp"))
    assert stored.format == "PNG"
    np.testing.assert_array_equal(np.asarray(stored.convert("RGB")), expected)


def test_resize_bounds_the_longer_side_and_keeps_small_images(tmp_path):
    write_image(tmp_path / "big.png", "png", seed=4)
    resized = _decoded(read_image_file(tmp_path / "big.png", max_side=8))
    assert (resized.format, resized.size) == ("JPEG", (4, 8))  # (width, height): 16x8 → 8x4
    assert read_image_file(tmp_path / "big.png", max_side=16) == (tmp_path / "big.png").read_bytes()


@pytest.mark.parametrize("kind, reason", [("truncated", "truncated"), ("text", "not an image")])
def test_broken_images_raise_with_a_reason(tmp_path, kind, reason):
    write_image(tmp_path / "broken.jpg", kind, seed=5)
    with pytest.raises(ImageProblem, match=reason):
        read_image_file(tmp_path / "broken.jpg")


def test_prepare_images_reports_each_path_in_order(tmp_path):
    write_image(tmp_path / "good.png", "png", seed=6)
    results = prepare_images([str(tmp_path / "missing.jpg"), str(tmp_path / "good.png")], None)
    assert results[0] == (None, "file not found")
    assert results[1] == ((tmp_path / "good.png").read_bytes(), None)
