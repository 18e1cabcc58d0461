"""The packer's view of `dualenc.data.images`: validation and the keep-or-re-encode rules."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dualenc.data.images import ImageProblem, prepare_images, read_image_file
from tests.support.images import write_image


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
