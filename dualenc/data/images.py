"""The one image decoder: every path that reads an image (packing, training, the vision export,
folder galleries, the result grid) sees the same RGB pixels.

Two halves share one rule. `canonical_image_bytes` (Pillow only, no TensorFlow import, so Beam
workers stay light) fully decodes an image, catches anything broken, and returns bytes
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
colour, any other source as a lossless PNG. An image larger than a packer's `StoreSize` (a
longer side above ``--max-side``, or more than it takes to cover a preset's model input) is
scaled down with a Lanczos filter and stored as a JPEG of quality 95.

TensorFlow's JPEG decoder defaults to libjpeg's fast integer DCT, which is off by up to ~5 levels
from Pillow's accurate one; `decode_image` asks for the accurate DCT, so both agree on JPEGs too.

Pillow and TensorFlow still differ on some damaged files (a JPEG whose entropy-coded data runs on
past a destroyed end marker: Pillow pads it, TensorFlow refuses it), so whatever is stored for
training is finally decoded by TensorFlow itself: `tensorflow_problems`. A packer (or a Beam
pipeline) validates an image with ``canonical_image_bytes(data, size)``, then a batch of the
results with ``tensorflow_problems(images)``; both are pure functions of the bytes. A packer that
does run `tensorflow_problems` on everything it stores passes ``check_pixels=False``: a JPEG or
PNG kept as is is then not decoded by Pillow too (a JPEG's header is read, for mode, size and EXIF
orientation; a PNG's chunks are CRC-checked), since TensorFlow's decode reads the same compressed
data and refuses what Pillow refuses there (truncation, corrupt headers, tables and streams;
tests/test_pack_bad_input.py), and more.
`pillow_reason` turns such a refusal back into Pillow's wording where Pillow refuses it too.

Resizing to a smaller model input is where the time goes, so `decode_image` lets libjpeg decode a
JPEG much larger than the target at 1/2, 1/4 or 1/8 scale (`jpeg_scale`), and antialiases only
what still shrinks by more than `ANTIALIAS_ABOVE`. At a JPEG's own size nothing changes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import math
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from dualenc.core.files import UnreadableFile, read_regular_file

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
# The PNG chunks Pillow finds EXIF in: eXIf, or ImageMagick's "Raw profile type exif" text.
PNG_EXIF_CHUNKS = frozenset((b"eXIf", b"tEXt", b"zTXt", b"iTXt"))
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
MAX_SIXTEEN_BIT = 65535
MAX_SIDE = 1_000_000  # libpng's default limit, which TensorFlow keeps
BYTES_SHOWN = 8
SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (PNG_SIGNATURE, "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
              (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"))
# The largest image file read (a packer's --max-image-bytes overrides it): far above any photo a
# dataset holds (a 50-megapixel JPEG is ~25 MB), far below what a worker thread could hold several of.
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20
READS_IN_FLIGHT_PER_WORKER = 4  # bounds the image bytes waiting in memory
# From this many images on, `tensorflow_problems` decodes them in one traced function (a
# parallel map, traced once per process, ~0.3 ms less CPU per image than eager one-by-one calls).
PARALLEL_DECODE_MIN = 256
CHECK_ITERATIONS_IN_FLIGHT = 16  # the traced map's parallel decodes
# TensorFlow's error text around the kernel's own message: "{{function_node ...}} " before it,
# " [Op:DecodeJpeg] name: " after it.
TENSORFLOW_NOISE = re.compile(r"^\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$", re.S)
# Shrinking by up to 2x, bilinear resizing still reads every source pixel; beyond it, it skips
# some (aliasing), so only then is the (costly) antialiasing filter worth it.
ANTIALIAS_ABOVE = 2.0
JPEG_SCALES = (1, 2, 4, 8)  # the denominators of libjpeg's reduced DCT scales TensorFlow offers
# The target `tensorflow_problems` decodes to: any JPEG then decodes at 1/8 scale, which still
# reads every entropy-coded block (truncation and corrupt data fail as at full size), ~40 % cheaper.
CHECK_SIZE = (1, 1)
# The EXIF orientations that turn the image a quarter (width and height swap when applied).
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


@dataclasses.dataclass(frozen=True)
class StoreSize:
    """How large a packer stores an image: never enlarged, scaled down (aspect kept) only when
    its longer side exceeds `max_side`, or when it is larger than it takes to cover `cover`.

    `cover` is a model input ``(height, width)``: training resizes every image to it without
    keeping the aspect, so an image scaled by ``max(height / h, width / w)`` still has at least as
    many rows and columns as the input reads, while its decode costs only what training needs
    (a 640x480 photo for a 224x224 input: 299x224, 4.6x fewer pixels). None: no such limit.
    """

    max_side: int | None = None
    cover: tuple[int, int] | None = None

    def longest_side(self, width: int, height: int) -> int:
        """The longer side a `width` x `height` image is stored with (its own when it fits)."""
        side = max(width, height)
        if self.max_side is not None:
            side = min(side, self.max_side)
        if self.cover is not None:
            scale = max(self.cover[0] / height, self.cover[1] / width)
            # Rounded up, so the scaled image never falls a pixel short of the input.
            side = min(side, math.ceil(max(width, height) * scale - 1e-9))
        return side


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


def _check_png_chunks(data: bytes) -> set[bytes]:
    """Raise `ImageProblem` for a PNG chunk that is cut short or fails its CRC check, up to IEND;
    returns the types of the chunks read.

    Pillow does not check the CRC of the pixel data (IDAT) chunks; TensorFlow's libpng refuses
    the file, so such a PNG would pass validation and then fail in training.
    """
    view = memoryview(data)
    position = len(PNG_SIGNATURE)
    kinds = set()
    while position + PNG_CHUNK_OVERHEAD <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + PNG_CHUNK_OVERHEAD + length
        name = kind.decode("latin-1")
        if end > len(data):
            raise ImageProblem(f"truncated PNG (chunk {name} cut short)")
        if zlib.crc32(view[position + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            raise ImageProblem(f"corrupt PNG (chunk {name} fails its CRC check)")
        kinds.add(kind)
        if kind == b"IEND":
            break
        position = end
    return kinds


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


def _stored_size(size: tuple[int, int], store: StoreSize) -> tuple[int, int]:
    """The (width, height) an upright `size` image is stored at: scaled to the longer side
    `store` allows, aspect kept. Rounding the shorter side keeps a cover: the longer side was
    rounded up, so the exact shorter side is already at least the cover's."""
    longest_side = store.longest_side(*size)
    scale = longest_side / max(size)
    return tuple(longest_side if side == max(size) else max(1, round(side * scale)) for side in size)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageProblem(_unknown_format_reason(data)) from None
    except Image.DecompressionBombError as error:
        raise ImageProblem(f"image too large ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageProblem(f"truncated or corrupt {_signature_format(data) or 'image'} ({error})") from None


def canonical_image_bytes(data: bytes, size: StoreSize = StoreSize(), check_pixels: bool = True) -> bytes:
    """Bytes that `decode_image` decodes to the correct RGB pixels of the image `data` holds.

    `data` itself when TensorFlow already decodes it right, else a re-encoding (see the module
    docstring); an image larger than `size` allows is scaled down to it.
    Raises `ImageProblem` with a short reason when `data` is empty, truncated, corrupt, not an
    image, or a layout the decoder does not support. With `check_pixels` False, a JPEG kept as
    is is returned after reading its header only, a PNG kept as is (no chunk that may hold
    EXIF) after its chunks' CRC check: the caller must check those with `tensorflow_problems`
    (which decodes them anyway) before storing them.
    """
    image = _open(data)
    if max(image.size) > MAX_SIDE:
        raise ImageProblem(f"{image.width}x{image.height} pixels: sides longer than {MAX_SIDE:,} are not supported")
    if (not check_pixels and _stored_size(image.size, size) == image.size and image.format == "PNG"
            and _tensorflow_decodes_as_is(image, data) and not _check_png_chunks(data) & PNG_EXIF_CHUNKS):
        return data  # intact chunks and no EXIF: Pillow would load the pixels only to look for one
    orientation = _orientation(image)
    # The size limits apply to the image as training sees it: upright.
    upright = image.size[::-1] if orientation in TRANSPOSING_ORIENTATIONS else image.size
    stored_size = _stored_size(upright, size)
    too_large = stored_size != upright
    as_is = not too_large and orientation == 1 and _tensorflow_decodes_as_is(image, data)
    name = image.format or "image"
    if as_is and not check_pixels and image.format in JPEG_FORMATS:
        return data
    try:
        if too_large and image.format in JPEG_FORMATS:
            # Let libjpeg decode at a reduced scale (never below the target size): much faster.
            image.draft(image.mode, stored_size if upright == image.size else stored_size[::-1])
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
        return _encode(pixels.resize(stored_size, Image.Resampling.LANCZOS), "JPEG")
    return _encode(pixels, "JPEG" if image.format in JPEG_FORMATS else "PNG")


def read_image_bytes(path: str | Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the regular file at `path` (`dualenc.core.files.read_regular_file`);
    `ImageProblem` (the skip reason) when it is missing, unreadable, not a regular file (never
    waiting on a FIFO) or over `max_bytes`."""
    try:
        return read_regular_file(path, max_bytes)
    except UnreadableFile as refused:
        raise ImageProblem({
            "missing": "file not found",
            "directory": "cannot read file: Is a directory",
            "special": "not a regular file (a directory, device, FIFO or socket)",
            "too large": f"{refused.size:,} bytes, more than --max-image-bytes {max_bytes:,}" if refused.size
            else f"more than --max-image-bytes {max_bytes:,} bytes",
            "error": f"cannot read file: {refused.reason}",
        }[refused.kind]) from None


def read_image_file(path: str | Path, size: StoreSize = StoreSize(), check_pixels: bool = True,
                    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """`canonical_image_bytes` of the file at `path` (read by `read_image_bytes`: a regular file
    of bounded size, never a FIFO or device); `ImageProblem` also when it cannot be read."""
    return canonical_image_bytes(read_image_bytes(path, max_bytes), size, check_pixels)


def _bytes_or_reason(path: str | Path, size: StoreSize, check_pixels: bool = True,
                     max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> tuple[bytes | None, str | None]:
    try:
        return read_image_file(path, size, check_pixels, max_bytes), None
    except ImageProblem as problem:
        return None, str(problem)


def prepare_images(paths: list[str], size: StoreSize, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                   check_pixels: bool = True) -> list[tuple[bytes | None, str | None]]:
    """`read_image_file` over a chunk of paths, for a pool (the local and the Beam packer): per
    path (bytes, None) on success or (None, reason) when the image must be skipped."""
    return [_bytes_or_reason(path, size, check_pixels, max_bytes) for path in paths]


def pillow_reason(data: bytes) -> str | None:
    """Why Pillow's full check (`canonical_image_bytes`) refuses `data`, or None when it accepts
    it: the clearer reason for an image `tensorflow_problems` refused after
    ``check_pixels=False`` left its pixels to TensorFlow ("truncated or corrupt JPEG (image
    file is truncated ...)" rather than libjpeg's "Invalid JPEG data or size")."""
    try:
        canonical_image_bytes(data)
    except ImageProblem as problem:
        return str(problem)
    return None


def read_image_files(paths: Sequence[str | Path], size: StoreSize = StoreSize(), workers: int | None = None,
                     check_pixels: bool = True) -> Iterator[tuple[bytes | None, str | None]]:
    """`prepare_images` in a thread pool (Pillow decodes without holding the GIL), yielded in
    the order of `paths` with a few reads per thread in flight, so memory stays bounded."""
    workers = workers or os.cpu_count() or 1
    pending: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for path in paths:
            pending.append(pool.submit(_bytes_or_reason, path, size, check_pixels))
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
    resized to `image_size` = (height, width), antialiased when shrinking by more than
    `ANTIALIAS_ABOVE`.

    Pure TensorFlow ops, so `tf.data` and the exported vision model run it. Greyscale is repeated
    to three channels, alpha dropped, an animated GIF's first frame used; JPEGs use the accurate
    integer DCT, as Pillow does (`decode_rgb`), at the reduced scale `jpeg_scale` picks.
    """
    import tensorflow as tf  # here, so the Pillow half of this module never loads TensorFlow

    image = _decode_pixels(image_bytes, image_size)
    shrink = tf.reduce_max(tf.cast(tf.shape(image)[:2], tf.float32) / tf.constant(image_size, tf.float32))
    resized = tf.cond(
        shrink > ANTIALIAS_ABOVE,
        lambda: tf.image.resize(image, image_size, method="bilinear", antialias=True),
        lambda: tf.image.resize(image, image_size, method="bilinear"),
    )
    # Bilinear weights (antialiased or not) are non-negative and sum to 1, so values stay within
    # 0..255 and +0.5 then truncation rounds half up: tf.round's pixels, far cheaper per image.
    return tf.cast(resized + 0.5, tf.uint8)


def _decode_pixels(image_bytes: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """`decode_image` before resizing: uint8 ``[height, width, 3]``, a JPEG at the reduced scale
    `jpeg_scale` picks for `image_size`, anything else at its own size."""
    import tensorflow as tf

    image = tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: _decode_jpeg_scaled(image_bytes, image_size),
        lambda: tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return image


def tensorflow_problems(images: Sequence[bytes]) -> list[str | None]:
    """Per image, None when the decoder training runs (`decode_image`) decodes it, else why not.

    A few images are decoded one by one; more together in one call of a traced parallel map
    (`_all_decode`); a call that fails is split in halves until the failing images are alone,
    and those are decoded again one by one for their reason. The reason names the format and
    quotes the kernel's own message, never TensorFlow's "Graph execution error" preamble.
    """
    if len(images) < PARALLEL_DECODE_MIN:
        return [_tensorflow_problem(data) for data in images]
    return _problems_by_halves(list(images))


def _problems_by_halves(images: list[bytes]) -> list[str | None]:
    """`tensorflow_problems` of `images` (not empty): all at once when all decode, else each
    half by itself, down to single images."""
    if len(images) == 1:
        return [_tensorflow_problem(images[0])]
    if _all_decode(images):
        return [None] * len(images)
    middle = len(images) // 2
    return _problems_by_halves(images[:middle]) + _problems_by_halves(images[middle:])


def _all_decode(images: list[bytes]) -> bool:
    """Whether TensorFlow decodes every one of `images`, in one call of `_check_function`."""
    import tensorflow as tf

    try:
        _check_function()(tf.constant(images, tf.string))
    except tf.errors.OpError:
        return False
    return True


@functools.cache
def _check_function() -> Callable:
    """A traced function decoding a batch of image bytes as `tensorflow_problems` does (built
    once per process; its input shape is open, so it is traced once; without autograph, which
    it does not need, tracing costs ~0.13 s of CPU instead of ~0.29 s)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
    def decode_all(images: tf.Tensor) -> tf.Tensor:
        return tf.map_fn(lambda data: tf.shape(_decode_pixels(data, CHECK_SIZE))[0], images,
                         fn_output_signature=tf.int32, parallel_iterations=CHECK_ITERATIONS_IN_FLIGHT)

    return decode_all


def _tensorflow_problem(data: bytes) -> str | None:
    """None when TensorFlow decodes `data`, else its kernel's message without the node names."""
    import tensorflow as tf

    try:
        _decode_pixels(tf.constant(data), CHECK_SIZE)
    except tf.errors.OpError as error:
        message = TENSORFLOW_NOISE.sub("", error.message.strip()) or type(error).__name__
        return f"corrupt {_signature_format(data) or 'image'}: TensorFlow's decoder refuses it ({message})"
    return None


def jpeg_scale(source_size: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Index into `JPEG_SCALES` of the scale 1/r to decode a JPEG of `source_size` (height, width)
    at, for resizing to `image_size`: the largest r up to the larger shrink factor (the side that
    shrinks most still decodes to at least its target) and up to twice the smaller one (the other
    side decodes to at least half its target, so little is lost where it is stretched).

    E.g. 640x480 -> 299x299 decodes at 1/2 (320x240), 4000x3000 -> 224x224 at 1/8.
    """
    import tensorflow as tf

    shrink = tf.cast(source_size, tf.float32) / tf.constant(image_size, tf.float32)
    limit = tf.minimum(tf.reduce_max(shrink), 2.0 * tf.reduce_min(shrink))
    return tf.reduce_sum(tf.cast(limit >= tf.constant(JPEG_SCALES[1:], tf.float32), tf.int32))


def _decode_jpeg_scaled(image_bytes: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """libjpeg decodes at a reduced DCT scale: it still reads every entropy-coded block (a
    truncated file fails as at full scale) but skips most of the inverse DCT and colour work."""
    import tensorflow as tf

    scale = jpeg_scale(tf.io.extract_jpeg_shape(image_bytes)[:2], image_size)
    return tf.switch_case(scale, [
        lambda ratio=ratio: tf.io.decode_jpeg(image_bytes, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")
        for ratio in JPEG_SCALES
    ])
