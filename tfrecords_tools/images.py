"""Read, validate and (only when needed) re-encode one image file for packing.

Runs in worker processes, so it imports Pillow only, never TensorFlow. Every image is fully
decoded with Pillow, which catches missing, truncated and undecodable files. The original bytes
are stored when TensorFlow's `tf.io.decode_image` decodes them to the same pixels (the fast path):

- JPEG in greyscale or RGB;
- PNG of any colour type (palette, greyscale, RGBA; TensorFlow drops alpha like Pillow's
  ``convert("RGB")`` does), whatever the file is called;
- BMP with 24 bits per pixel and no compression (the VIPeR crops of CUHK-PEDES).

Everything else is re-encoded: CMYK/YCCK JPEG as an RGB JPEG of quality 95 with full-resolution colour (TensorFlow and
Pillow disagree on inverted Adobe CMYK), any other format (palette BMP, GIF, TIFF, WebP ...) as a
lossless PNG. With ``max_side`` set, an image whose longer side exceeds it is resized with a
Lanczos filter and stored as an RGB JPEG of quality 95; alpha is dropped, as the reader drops it
for images that are not resized, so an image looks the same either way.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 95
BMP_INFO_OFFSET = 14  # the BITMAPINFOHEADER follows the 14-byte file header


class ImageProblem(Exception):
    """Why an image cannot be packed (missing, unreadable, truncated, not an image)."""


def _bmp_is_plain_rgb(data: bytes) -> bool:
    """True for an uncompressed 24-bit BMP, the only BMP kind TensorFlow decodes faithfully
    (it reads 8-bit BMPs as grey levels, ignoring their palette)."""
    if len(data) < BMP_INFO_OFFSET + 20:
        return False
    bits_per_pixel, compression = struct.unpack_from("<HI", data, BMP_INFO_OFFSET + 14)
    return bits_per_pixel == 24 and compression == 0


def _tensorflow_decodes_as_is(image: Image.Image, data: bytes) -> bool:
    if image.format == "JPEG":
        return image.mode in ("L", "RGB")
    if image.format == "PNG":
        return True
    if image.format == "BMP":
        return _bmp_is_plain_rgb(data)
    return False


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "JPEG":
        # 4:4:4 chroma: at quality 95 halving the colour resolution would cost more than it saves.
        image.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def _as_rgb_or_grey(image: Image.Image) -> Image.Image:
    if image.mode in ("L", "RGB"):
        return image
    return image.convert("L" if image.mode == "LA" else "RGB")


def _resized(image: Image.Image, max_side: int) -> Image.Image:
    """`image` as RGB with its longer side scaled down to `max_side`, aspect ratio kept."""
    scale = max_side / max(image.size)
    new_size = tuple(max(1, round(side * scale)) for side in image.size)
    return image.convert("RGB").resize(new_size, Image.Resampling.LANCZOS)


def prepare_image(path: str, max_side: int | None = None) -> bytes:
    """The bytes to store for the image at `path` (see the module docstring for the rules).

    Raises `ImageProblem` with a short reason when the file is missing, unreadable, truncated or
    not an image Pillow can decode.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageProblem("file not found") from None
    except OSError as error:
        raise ImageProblem(f"cannot read file: {error.strerror or error}") from None
    try:
        image = Image.open(io.BytesIO(data))
        too_large = max_side is not None and max(image.size) > max_side
        if too_large and image.format == "JPEG":
            # Let libjpeg decode at a reduced scale (never below the target size): much faster.
            image.draft(image.mode, (max_side, max_side))
        elif image.format == "JPEG" and image.mode in ("L", "RGB"):
            # Stored as is, so decoding only checks the file: libjpeg's 1/8 scale still reads
            # every entropy-coded block (truncation is caught) at a fraction of the cost.
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
    except UnidentifiedImageError:
        raise ImageProblem("not an image in a format Pillow knows") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageProblem(f"truncated or corrupt image ({error})") from None
    if too_large:
        return _encode(_resized(image, max_side), "JPEG")
    if _tensorflow_decodes_as_is(image, data):
        return data
    return _encode(_as_rgb_or_grey(image), "JPEG" if image.format == "JPEG" else "PNG")


def prepare_images(paths: list[str], max_side: int | None) -> list[tuple[bytes | None, str | None]]:
    """`prepare_image` over a chunk of paths, for a process pool: per path (bytes, None) on
    success or (None, reason) when the image must be skipped."""
    results = []
    for path in paths:
        try:
            results.append((prepare_image(path, max_side), None))
        except ImageProblem as problem:
            results.append((None, str(problem)))
    return results
