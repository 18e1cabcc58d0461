"""The packer's view of `dualenc.data.images`: validation and the keep-or-re-encode rules."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from dualenc.data.images import ImageProblem, StoreSize, canonical_image_bytes, prepare_images, read_image_file
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
    resized = _decoded(read_image_file(tmp_path / "big.png", StoreSize(max_side=8)))
    assert (resized.format, resized.size) == ("JPEG", (4, 8))  # (width, height): 16x8 → 8x4
    assert read_image_file(tmp_path / "big.png", StoreSize(max_side=16)) == (tmp_path / "big.png").read_bytes()


def _reference_cover(width: int, height: int, cover: tuple[int, int]) -> int:
    """The smallest integer longer side whose exact (unrounded) scaling of the image still has
    at least min(cover, own) rows and columns, by search in exact fractions."""
    longest = max(width, height)
    for side in range(1, longest + 1):
        scale = Fraction(side, longest)
        if scale * height >= min(cover[0], height) and scale * width >= min(cover[1], width):
            return side
    return longest


def test_a_cover_stores_the_smallest_size_that_still_covers_the_model_input():
    rng = np.random.default_rng(3)
    for _ in range(300):
        width, height = (int(side) for side in rng.integers(1, 700, 2))
        cover = tuple(int(side) for side in rng.integers(1, 400, 2))
        longest = StoreSize(cover=cover).longest_side(width, height)
        expected = _reference_cover(width, height, cover)
        assert longest == expected, (width, height, cover)
        # --max-side still caps it, and never enlarges an image.
        assert StoreSize(max_side=50, cover=cover).longest_side(width, height) == min(50, expected)
        assert StoreSize().longest_side(width, height) == max(width, height)


def _jpeg(width: int, height: int, orientation: int = 1) -> bytes:
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("width, height, orientation, cover, stored", [
    (640, 480, 1, (224, 224), (299, 224)),  # a COCO photo for a 224x224 input
    (160, 400, 1, (384, 128), (154, 384)),  # a person crop a little larger than the input
    (100, 300, 1, (384, 128), (100, 300)),  # one smaller than the input: never enlarged
    (200, 600, 1, (384, 128), (128, 384)),  # a person crop of the input's aspect
    (64, 128, 1, (64, 32), (32, 64)),  # the demo's renders for the demo preset
    (640, 480, 6, (128, 64), (96, 128)),  # rotated by EXIF: the cover applies to the upright image
])
def test_cover_sizes_of_typical_images(width, height, orientation, cover, stored):
    data = _jpeg(width, height, orientation)
    image = _decoded(canonical_image_bytes(data, StoreSize(cover=cover)))
    assert image.size == stored


@pytest.mark.parametrize("kind, reason", [("truncated", "truncated"), ("text", "not an image")])
def test_broken_images_raise_with_a_reason(tmp_path, kind, reason):
    write_image(tmp_path / "broken.jpg", kind, seed=5)
    with pytest.raises(ImageProblem, match=reason):
        read_image_file(tmp_path / "broken.jpg")


def test_prepare_images_reports_each_path_in_order(tmp_path):
    write_image(tmp_path / "good.png", "png", seed=6)
    results = prepare_images([str(tmp_path / "missing.jpg"), str(tmp_path / "good.png")], StoreSize())
    assert results[0] == (None, "file not found")
    assert results[1] == ((tmp_path / "good.png").read_bytes(), None)
