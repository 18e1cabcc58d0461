"""The one image decoder: every path that reads an image (packing, training, the vision export,
folder galleries, the result grid) sees the same RGB pixels.

Two halves share one rule. `canonical_image_bytes` (Pillow only, no TensorFlow import, so packer
worker processes stay light) fully decodes an image, catches anything broken, and returns bytes
that TensorFlow's decoder turns into the right pixels; `decode_image` is that TensorFlow decoder,
run inside `tf.data` and the exported vision model; `decode_rgb` decodes canonical bytes with
Pillow for display, to the same pixels.

What "the right pixels" are:

- EXIF orientation is applied (a phone photo shot upright is upright);
- 16-bit greyscale becomes 8-bit as round(value / 257) (never clipped to white); 16-bit colour
  keeps its high byte, floor(value / 256), as Pillow reads it: at most one level below that;
- palette images map through their palette, CMYK/YCCK through Pillow's conversion;
- alpha is dropped, not composited: the colour stored under a transparent pixel is kept, which is
  what TensorFlow does with an RGBA PNG, so those bytes need no re-encoding;
- GIF, animated PNG/WebP and multi-page TIFF: the first frame.

The original bytes are kept whenever TensorFlow already decodes them to those pixels: JPEG in
greyscale or RGB without an EXIF rotation, PNG of 8 bits or fewer per sample (any colour type,
whatever the file is called), uncompressed 24-bit BMP, and single-frame RGB WebP. Anything else is
re-encoded: a JPEG source (CMYK, rotated) as an RGB or grey JPEG of quality 95 with full-resolution
colour, any other source as a lossless PNG. With ``max_side`` set, an image whose longer side
exceeds it is resized with a Lanczos filter and stored as a JPEG of quality 95.

TensorFlow's JPEG decoder defaults to libjpeg's fast integer DCT, which is off by up to ~5 levels
from Pillow's accurate one; `decode_image` asks for the accurate DCT, so both agree on JPEGs too.

Pillow and TensorFlow still differ on some damaged files (a JPEG whose entropy-coded data runs on
past a destroyed end marker: Pillow pads it, TensorFlow refuses it), so whatever is stored for
training is finally decoded by TensorFlow itself: `tensorflow_problems`. A packer (or a Beam
pipeline) validates an image with ``canonical_image_bytes(data, max_side)``, then a batch of the
results with ``tensorflow_problems(images)``; both are pure functions of the bytes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

if TYPE_CHECKING:
    import tensorflow as tf

SUPPORTED_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
JPEG_QUALITY = 95
JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera's multi-picture JPEG; its first picture is a plain JPEG
BMP_INFO_OFFSET = 14  # the BITMAPINFOHEADER follows the 14-byte file header
PNG_BIT_DEPTH_OFFSET = 24  # signature (8), IHDR length and type (8), width and height (8)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHUNK_OVERHEAD = 12  # length, type and CRC around each chunk's data
PNG_END = b"\0\0\0\0IEND\xaeB`\x82"  # the empty IEND chunk and its CRC
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
MAX_SIXTEEN_BIT = 65535
MAX_SIDE = 1_000_000  # libpng's default limit, which TensorFlow keeps
BYTES_SHOWN = 8
SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (PNG_SIGNATURE, "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
              (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"))
READS_IN_FLIGHT_PER_WORKER = 4  # bounds the image bytes waiting in memory
# From this many images on, `tensorflow_problems` decodes in parallel: one by one costs ~0.6 ms
# of overhead per image, a tf.data map ~0.2 s per call (measured on 2 busy cores).
PARALLEL_DECODE_MIN = 256
# TensorFlow's error text around the kernel's own message: "{{function_node ...}} " before it,
# " [Op:DecodeJpeg] name: " after it.
TENSORFLOW_NOISE = re.compile(r"^\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$", re.S)


class ImageProblem(Exception):
    """Why an image cannot be used, as a short reason (``"truncated or corrupt JPEG (...)"``)."""


def _signature_format(data: bytes) -> str | None:
    """The image format whose file signature `data` starts with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for signature, name in SIGNATURES if data.startswith(signature)), None)


def _unknown_format_reason(data: bytes) -> str:
    """Why Pillow did not recognise `data`: empty, cut short, a TIFF layout it lacks, or not an image."""
    if not data:
        return "empty file (0 bytes)"
    image_format = _signature_format(data)
    if image_format == "TIFF":
        return _tiff_layout_reason(data)
    if image_format is not None:
        return f"truncated or corrupt {image_format} (its header cannot be read)"
    return f"not an image (starts with {data[:BYTES_SHOWN]!r})"


def _tiff_layout_reason(data: bytes) -> str:
    """A TIFF that Pillow cannot open, described by its first directory's sample layout."""
    try:
        directory = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        stream = io.BytesIO(data)
        stream.seek(directory.next)
        directory.load(stream)
        bits = directory.get(TiffImagePlugin.BITSPERSAMPLE, (1,))
        channels = directory.get(TiffImagePlugin.SAMPLESPERPIXEL, 1)
    except (OSError, SyntaxError, ValueError, KeyError, struct.error):
        return "truncated or corrupt TIFF (its header cannot be read)"
    bits = bits[0] if isinstance(bits, tuple) else bits
    return f"{bits}-bit TIFF with {channels} channel(s) not supported"


def _check_png_chunks(data: bytes) -> None:
    """Raise `ImageProblem` for a PNG chunk that is cut short or fails its CRC check, up to IEND.

    Pillow does not check the CRC of the pixel data (IDAT) chunks; TensorFlow's libpng refuses
    the file, so such a PNG would pass validation and then fail in training.
    """
    view = memoryview(data)
    position = len(PNG_SIGNATURE)
    while position + PNG_CHUNK_OVERHEAD <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + PNG_CHUNK_OVERHEAD + length
        name = kind.decode("latin-1")
        if end > len(data):
            raise ImageProblem(f"truncated PNG (chunk {name} cut short)")
        if zlib.crc32(view[position + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            raise ImageProblem(f"corrupt PNG (chunk {name} fails its CRC check)")
        if kind == b"IEND":
            return
        position = end


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = upright); a damaged EXIF block counts as upright, not broken."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except (OSError, SyntaxError, ValueError, TypeError, struct.error):
        return 1


def _bmp_is_plain_rgb(data: bytes) -> bool:
    """True for an uncompressed 24-bit BMP, the only BMP kind TensorFlow decodes faithfully
    (it reads 8-bit BMPs as grey levels, ignoring their palette)."""
    if len(data) < BMP_INFO_OFFSET + 20:
        return False
    bits_per_pixel, compression = struct.unpack_from("<HI", data, BMP_INFO_OFFSET + 14)
    return bits_per_pixel == 24 and compression == 0


def _tensorflow_decodes_as_is(image: Image.Image, data: bytes) -> bool:
    """Whether `decode_image` turns `data` into the canonical pixels of `image` unchanged
    (checked format by format in tests/test_images.py)."""
    if image.format in JPEG_FORMATS:
        return image.mode in ("L", "RGB")
    if image.format == "PNG":
        # TensorFlow keeps the high byte of 16-bit samples, where the canonical rule rounds, and
        # refuses a PNG cut short after its pixel data, which Pillow accepts.
        return data[PNG_BIT_DEPTH_OFFSET] <= 8 and data.endswith(PNG_END)
    if image.format == "BMP":
        return _bmp_is_plain_rgb(data)
    if image.format == "WEBP":
        # With channels=3 TensorFlow refuses a WebP that has alpha.
        return image.mode == "RGB" and getattr(image, "n_frames", 1) == 1
    return False


def _eight_bit(image: Image.Image) -> Image.Image:
    """`image` as 8-bit grey ("L") or RGB, by the rules of the module docstring."""
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        samples = np.asarray(image).astype(np.int64)
        if samples.min() < 0 or samples.max() > MAX_SIXTEEN_BIT:
            raise ImageProblem(f"{image.format} with integer samples outside 0..65535 not supported")
        # value / 257 maps 0..65535 onto 0..255 (65535 = 255 · 257); (2v + 257) // 514 is
        # floor(v / 257 + ½), i.e. rounding, and 257 being odd there are no ties.
        return Image.fromarray(((samples * 2 + 257) // 514).astype(np.uint8))
    if image.mode == "F":
        raise ImageProblem(f"floating-point {image.format} not supported")
    try:
        return image.convert("L" if image.mode in ("1", "LA", "La") else "RGB")
    except ValueError:  # e.g. a LAB TIFF: Pillow converts it only through a colour profile
        raise ImageProblem(f"{image.format} in colour mode {image.mode} not supported") from None


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "JPEG":
        # 4:4:4 chroma: at quality 95 halving the colour resolution would cost more than it saves.
        image.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def _resized(image: Image.Image, max_side: int) -> Image.Image:
    """`image` with its longer side scaled down to `max_side`, aspect ratio kept."""
    scale = max_side / max(image.size)
    new_size = tuple(max(1, round(side * scale)) for side in image.size)
    return image.resize(new_size, Image.Resampling.LANCZOS)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageProblem(_unknown_format_reason(data)) from None
    except Image.DecompressionBombError as error:
        raise ImageProblem(f"image too large ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageProblem(f"truncated or corrupt {_signature_format(data) or 'image'} ({error})") from None


def canonical_image_bytes(data: bytes, max_side: int | None = None) -> bytes:
    """Bytes that `decode_image` decodes to the correct RGB pixels of the image `data` holds.

    `data` itself when TensorFlow already decodes it right, else a re-encoding (see the module
    docstring); with `max_side`, an image whose longer side exceeds it is scaled down to it.
    Raises `ImageProblem` with a short reason when `data` is empty, truncated, corrupt, not an
    image, or a layout the decoder does not support.
    """
    image = _open(data)
    if max(image.size) > MAX_SIDE:
        raise ImageProblem(f"{image.width}x{image.height} pixels: sides longer than {MAX_SIDE:,} are not supported")
    orientation = _orientation(image)
    too_large = max_side is not None and max(image.size) > max_side
    as_is = not too_large and orientation == 1 and _tensorflow_decodes_as_is(image, data)
    name = image.format or "image"
    try:
        if too_large and image.format in JPEG_FORMATS:
            # Let libjpeg decode at a reduced scale (never below the target size): much faster.
            image.draft(image.mode, (max_side, max_side))
        elif as_is and image.format in JPEG_FORMATS:
            # Kept as is, so decoding only checks the file: libjpeg's 1/8 scale still reads every
            # entropy-coded block (truncation is caught) at a fraction of the cost.
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageProblem(f"image too large ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageProblem(f"truncated or corrupt {name} ({error})") from None
    if image.format == "PNG":
        _check_png_chunks(data)
    if as_is:
        return data
    pixels = _eight_bit(ImageOps.exif_transpose(image) if orientation != 1 else image)
    if too_large:
        return _encode(_resized(pixels, max_side), "JPEG")
    return _encode(pixels, "JPEG" if image.format in JPEG_FORMATS else "PNG")


def read_image_file(path: str | Path, max_side: int | None = None) -> bytes:
    """`canonical_image_bytes` of the file at `path`; `ImageProblem` also when it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageProblem("file not found") from None
    except OSError as error:
        raise ImageProblem(f"cannot read file: {error.strerror or error}") from None
    return canonical_image_bytes(data, max_side)


def _bytes_or_reason(path: str | Path, max_side: int | None) -> tuple[bytes | None, str | None]:
    try:
        return read_image_file(path, max_side), None
    except ImageProblem as problem:
        return None, str(problem)


def prepare_images(paths: list[str], max_side: int | None) -> list[tuple[bytes | None, str | None]]:
    """`read_image_file` over a chunk of paths, for a process pool: per path (bytes, None) on
    success or (None, reason) when the image must be skipped."""
    return [_bytes_or_reason(path, max_side) for path in paths]


def read_image_files(paths: Sequence[str | Path], max_side: int | None = None,
                     workers: int | None = None) -> Iterator[tuple[bytes | None, str | None]]:
    """`prepare_images` in a thread pool (Pillow decodes without holding the GIL), yielded in
    the order of `paths` with a few reads per thread in flight, so memory stays bounded."""
    workers = workers or os.cpu_count() or 1
    pending: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for path in paths:
            pending.append(pool.submit(_bytes_or_reason, path, max_side))
            if len(pending) >= workers * READS_IN_FLIGHT_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def decode_rgb(data: bytes) -> np.ndarray:
    """Any image's bytes → its canonical RGB pixels, uint8 ``[H, W, 3]``, decoded by Pillow.

    The pixels `decode_image` gives for ``canonical_image_bytes(data)`` before resizing (tested);
    for drawing without TensorFlow. Raises `ImageProblem` like `canonical_image_bytes`.
    """
    with Image.open(io.BytesIO(canonical_image_bytes(data))) as image:
        return np.asarray(image.convert("RGB"))


def decode_image(image_bytes: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Decode one image's canonical bytes (scalar string) to uint8 ``[height, width, 3]``,
    resized to `image_size` = (height, width) with antialiasing.

    Pure TensorFlow ops, so `tf.data` and the exported vision model run it. Greyscale is repeated
    to three channels, alpha dropped, an animated GIF's first frame used; JPEGs use the accurate
    integer DCT, as Pillow does (`decode_rgb`).
    """
    import tensorflow as tf  # here, so the Pillow half of this module never loads TensorFlow

    image = _decode_pixels(image_bytes)
    resized = tf.image.resize(image, image_size, method="bilinear", antialias=True)
    # +0.5 then truncation rounds half up: the same pixels as tf.round but far cheaper per image.
    return tf.cast(tf.clip_by_value(resized + 0.5, 0.0, 255.0), tf.uint8)


def _decode_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
    """`decode_image` before resizing: uint8 ``[height, width, 3]`` at the image's own size."""
    import tensorflow as tf

    image = tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return image


def tensorflow_problems(images: Sequence[bytes]) -> list[str | None]:
    """Per image, None when the decoder training runs (`decode_image`) decodes it, else why not.

    A few images are decoded one by one; more in parallel in a `tf.data` map that drops
    failures (building it costs a fixed ~0.2 s), and only the failed ones again, for their reason.
    The reason names the format and quotes the kernel's own message, never TensorFlow's "Graph
    execution error" preamble.
    """
    import tensorflow as tf

    if len(images) < PARALLEL_DECODE_MIN:
        return [_tensorflow_problem(data) for data in images]
    decoded = (
        tf.data.Dataset.from_tensor_slices(tf.constant(list(images), tf.string))
        .enumerate()
        .map(lambda position, data: (position, tf.shape(_decode_pixels(data))[0]),
             num_parallel_calls=tf.data.AUTOTUNE)
        .ignore_errors()
    )
    decodable = {int(position) for position, _ in decoded.as_numpy_iterator()}
    return [None if position in decodable else _tensorflow_problem(data) for position, data in enumerate(images)]


def _tensorflow_problem(data: bytes) -> str | None:
    """None when TensorFlow decodes `data`, else its kernel's message without the node names."""
    import tensorflow as tf

    try:
        _decode_pixels(tf.constant(data))
    except tf.errors.OpError as error:
        message = TENSORFLOW_NOISE.sub("", error.message.strip()) or type(error).__name__
        return f"corrupt {_signature_format(data) or 'image'}: TensorFlow's decoder refuses it ({message})"
    return None
