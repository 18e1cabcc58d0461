"""`decode_image`'s fast path for large JPEGs (reduced DCT scale, antialiasing only beyond 2x)
against independent references: Pillow's full-resolution decode and antialiased resize."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dualenc.data.images import JPEG_SCALES, decode_image, jpeg_scale

# Mean absolute difference to Pillow, in levels: measured 0.9 on 640x480 photo-like JPEGs and
# 1.6-1.9 on a real photograph (full-resolution decoding with antialiasing: 0.1-0.2).
MAX_MEAN_LEVELS = 2.5


def photo_like_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A smooth colour field with hard-edged blocks and grain, like bench.datasets' COCO-like images."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    for _ in range(4):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[top : top + height // 4, left : left + width // 4] = rng.integers(0, 256, 3)
    pixels += rng.normal(0.0, 6.0, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("source", "target", "ratio"),
    [((480, 640), (299, 299), 2), ((480, 640), (224, 224), 2), ((3000, 4000), (224, 224), 8),
     ((960, 1280), (224, 224), 4), ((100, 100), (100, 100), 1), ((200, 1000), (299, 299), 1),
     ((480, 640), (600, 800), 1)],
)
def test_jpeg_scale_never_shrinks_below_the_target_on_the_most_shrunk_side(source, target, ratio):
    assert JPEG_SCALES[int(jpeg_scale(tf.constant(source), target))] == ratio


@pytest.mark.parametrize("target", [(299, 299), (224, 224), (120, 90)])
def test_large_jpeg_decodes_close_to_pillow_full_resolution(target):
    data = photo_like_jpeg(640, 480)
    decoded = decode_image(tf.constant(data), target).numpy().astype(np.float64)
    with Image.open(io.BytesIO(data)) as image:
        # Pillow's bilinear resize widens its filter when shrinking: antialiased.
        expected = np.asarray(image.convert("RGB").resize(target[::-1], Image.Resampling.BILINEAR), np.float64)
    assert decoded.shape == (*target, 3)
    assert np.abs(decoded - expected).mean() <= MAX_MEAN_LEVELS


def test_truncated_jpeg_still_fails_at_reduced_scale():
    data = photo_like_jpeg(640, 480)
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode_image(tf.constant(data[: len(data) // 2]), (100, 100))
