"""dualenc.data.images: twins of one photo get the same pixels and embeddings on every path.

A twin is one picture stored another way (EXIF-rotated JPEG, 16-bit PNG/TIFF, palette BMP, GIF,
WebP, TIFF, CMYK JPEG, RGBA PNG ...). Its correct pixels are a NumPy array built independently of
the decoder; each twin is checked in the grid (`decode_rgb`), in TensorFlow (`decode_image` of the
canonical bytes), through packing (``python -m tfrecords_tools folder``) and through a folder
gallery indexed with an exported vision encoder. Broken files must be skipped with a reason.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dualenc.data.images import (
    SUPPORTED_SUFFIXES,
    ImageProblem,
    StoreSize,
    canonical_image_bytes,
    decode_image,
    decode_rgb,
    read_image_file,
)

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 48, 40
ENCODER_SIZE = (32, 32)
EMBEDDING_DIMENSION = 32
TWIN_COSINE = 0.999
# JPEG twins (quality 95; the EXIF-rotated ones are encoded twice) against their exact pixels.
# Measured: mean 1.4-1.6, max 18-22 (a wrong orientation or a white-clipped grey: mean > 40).
JPEG_MEAN_ERROR = 2.5
JPEG_MAX_ERROR = 32
# Packed with --resize (Lanczos, then JPEG) against Pillow's Lanczos of the correct pixels:
# measured mean 0.6-3.3 (JPEG on the palette pictures' sharp edges is the worst).
RESIZED_MEAN_ERROR = 4
ORIENTATION = 0x0112


def smooth_pixels(seed: int, channels: int = 3) -> np.ndarray:
    """An asymmetric, smooth random picture, uint8 [HEIGHT, WIDTH, channels] (JPEG keeps it close)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (HEIGHT // 12 + 1, WIDTH // 12 + 1, channels))
    rows = np.linspace(0, coarse.shape[0] - 1, HEIGHT)
    columns = np.linspace(0, coarse.shape[1] - 1, WIDTH)
    # Bilinear interpolation in NumPy, so the reference owes nothing to an image library.
    top, left = np.floor(rows).astype(int), np.floor(columns).astype(int)
    bottom, right = np.minimum(top + 1, coarse.shape[0] - 1), np.minimum(left + 1, coarse.shape[1] - 1)
    down, across = (rows - top)[:, None, None], (columns - left)[None, :, None]
    upper = coarse[top][:, left] * (1 - across) + coarse[top][:, right] * across
    lower = coarse[bottom][:, left] * (1 - across) + coarse[bottom][:, right] * across
    return np.round(upper * (1 - down) + lower * down).astype(np.uint8)


def encoded(pixels: np.ndarray, image_format: str, **options) -> bytes:
    """`pixels` ([H, W] grey, [H, W, 2] grey + alpha, [H, W, 3] RGB or [H, W, 4] RGBA) as a file."""
    return saved(Image.fromarray(pixels), image_format, **options)


def saved(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def tiff_bytes(samples: np.ndarray, extra_samples: tuple[int, ...] = ()) -> bytes:
    """An uncompressed little-endian TIFF of uint16 `samples` [H, W, C], written by hand:
    Pillow writes neither 16-bit colour nor five-channel TIFFs."""
    height, width, channels = samples.shape
    pixel_data = samples.astype("<u2").tobytes()
    tags = [  # (tag, type: 3 short / 4 long, values)
        (256, 4, [width]), (257, 4, [height]), (258, 3, [16] * channels), (259, 3, [1]),
        (262, 3, [2 if channels >= 3 else 1]), (273, 4, [0]), (277, 3, [channels]), (278, 4, [height]),
        (279, 4, [len(pixel_data)]), (284, 3, [1]),
    ] + ([(338, 3, list(extra_samples))] if extra_samples else [])
    directory_size = 2 + 12 * len(tags) + 4
    overflow = bytearray()  # values longer than 4 bytes live after the directory
    overflow_start = 8 + directory_size
    pixel_start = overflow_start + sum(2 * len(values) for _, kind, values in tags if kind == 3 and len(values) > 2)
    entries = []
    for tag, kind, values in tags:
        values = [pixel_start] if tag == 273 else values
        packed = struct.pack(f"<{len(values)}{'H' if kind == 3 else 'I'}", *values)
        if len(packed) > 4:
            entries.append(struct.pack("<HHII", tag, kind, len(values), overflow_start + len(overflow)))
            overflow += packed
        else:
            entries.append(struct.pack("<HHI", tag, kind, len(values)) + packed.ljust(4, b"\0"))
    directory = struct.pack("<H", len(tags)) + b"".join(entries) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + directory + bytes(overflow) + pixel_data


def with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    """A JPEG of `pixels` tagged with EXIF `orientation`."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encoded(pixels, "JPEG", quality=95, exif=exif)


def palette_picture(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices [H, W] uint8, palette [64, 3] uint8): `pixels` quantised to 4 levels per channel."""
    levels = pixels // 64
    indices = (levels[..., 0] * 16 + levels[..., 1] * 4 + levels[..., 2]).astype(np.uint8)
    palette = np.array([[(index // 16) * 64 + 32, (index // 4 % 4) * 64 + 32, (index % 4) * 64 + 32]
                        for index in range(64)], np.uint8)
    return indices, palette


def palette_image(indices: np.ndarray, palette: np.ndarray) -> Image.Image:
    image = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.tobytes())
    image.putpalette(palette.flatten().tolist())
    return image


@dataclasses.dataclass(frozen=True)
class Twin:
    """One stored form of a picture: its file `name`, `data`, and correct `pixels` (NumPy)."""

    name: str
    data: bytes
    pixels: np.ndarray
    twin_of: str  # the plainly stored twin it must embed like
    lossy: bool = False


def make_twins() -> dict[str, Twin]:
    photo = smooth_pixels(1)
    grey16 = (smooth_pixels(2, 1)[..., 0].astype(np.int64) * 257
              + np.random.default_rng(3).integers(-128, 129, (HEIGHT, WIDTH))).clip(0, 65535).astype(np.uint16)
    grey = np.round(grey16 / 257.0).astype(np.uint8)  # the documented rule, in float64
    grey_rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb16 = (photo.astype(np.int64) * 257
             + np.random.default_rng(4).integers(-128, 129, photo.shape)).clip(0, 65535).astype(np.uint16)
    rgb16_pixels = (rgb16 >> 8).astype(np.uint8)  # 16-bit colour keeps its high byte (documented)
    indices, palette = palette_picture(smooth_pixels(5))
    palette_pixels = palette[indices]
    second_frame = palette_image(255 - indices, np.concatenate([palette, palette[::-1] // 2]))
    alpha = np.random.default_rng(6).integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    cmyk = np.concatenate([255 - photo, np.zeros((HEIGHT, WIDTH, 1), np.uint8)], axis=-1)
    twins = [
        Twin("plain.png", encoded(photo, "PNG"), photo, "plain.png"),
        Twin("upright.jpg", encoded(photo, "JPEG", quality=95), photo, "plain.png", lossy=True),
        Twin("exif6.jpg", with_orientation(np.rot90(photo, 1), 6), photo, "plain.png", lossy=True),
        Twin("exif3.jpeg", with_orientation(np.rot90(photo, 2), 3), photo, "plain.png", lossy=True),
        Twin("cmyk.jpg", saved(Image.frombytes("CMYK", (WIDTH, HEIGHT), cmyk.tobytes()), "JPEG", quality=95),
             photo, "plain.png", lossy=True),
        Twin("rgba.png", encoded(np.dstack([photo, alpha]), "PNG"), photo, "plain.png"),
        Twin("lossless.webp", encoded(photo, "WEBP", lossless=True), photo, "plain.png"),
        Twin("photo.tif", encoded(photo, "TIFF", compression="tiff_lzw"), photo, "plain.png"),
        Twin("rgb16.png", tf.io.encode_png(rgb16).numpy(), rgb16_pixels, "plain.png"),
        Twin("rgb16.tiff", tiff_bytes(rgb16), rgb16_pixels, "plain.png"),
        Twin("grey8.png", encoded(grey, "PNG"), grey_rgb, "grey8.png"),
        Twin("grey16.png", encoded(grey16, "PNG"), grey_rgb, "grey8.png"),
        Twin("grey16.tif", encoded(grey16, "TIFF"), grey_rgb, "grey8.png"),
        Twin("grey_alpha.png", encoded(np.dstack([grey, alpha]), "PNG"), grey_rgb, "grey8.png"),
        Twin("palette_rgb.png", encoded(palette_pixels, "PNG"), palette_pixels, "palette_rgb.png"),
        Twin("palette.bmp", saved(palette_image(indices, palette), "BMP"), palette_pixels, "palette_rgb.png"),
        Twin("palette.png", saved(palette_image(indices, palette), "PNG"), palette_pixels, "palette_rgb.png"),
        Twin("animated.gif", saved(palette_image(indices, palette), "GIF", save_all=True, optimize=False,
                                   append_images=[second_frame]), palette_pixels, "palette_rgb.png"),
    ]
    return {twin.name: twin for twin in twins}


def broken_files() -> dict[str, tuple[bytes, str]]:
    """File name → (content, a part of the reason it must be skipped with)."""
    png = encoded(smooth_pixels(7), "PNG")
    jpeg = encoded(smooth_pixels(7), "JPEG", quality=95)
    bad_crc = bytearray(png)
    bad_crc[-20] ^= 0xFF  # inside the last IDAT chunk's data; zlib may still inflate it
    five_channels = np.random.default_rng(8).integers(0, 65536, (4, 4, 5)).astype(np.uint16)
    return {
        "empty.png": (b"", "empty file (0 bytes)"),
        "notes.jpg": (b"just some text", "not an image (starts with b'just som')"),
        "half.png": (png[: len(png) // 2], "truncated"),
        "half.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "bad_crc.png": (bytes(bad_crc), "corrupt PNG (chunk IDAT fails its CRC check)"),
        "five.tif": (tiff_bytes(five_channels, extra_samples=(0, 0)), "16-bit TIFF with 5 channel(s) not supported"),
    }


@pytest.fixture(scope="module")
def twins() -> dict[str, Twin]:
    return make_twins()


def tensorflow_pixels(data: bytes) -> np.ndarray:
    """`decode_image` of `data` at its own size (resizing to the same size changes nothing)."""
    with Image.open(io.BytesIO(data)) as image:
        height, width = image.height, image.width
    return decode_image(tf.constant(data), (height, width)).numpy()


def check_pixels(twin: Twin, pixels: np.ndarray) -> None:
    assert pixels.shape == twin.pixels.shape, twin.name  # an orientation left undone fails here (6)
    error = np.abs(pixels.astype(int) - twin.pixels)
    if twin.lossy:
        assert error.mean() < JPEG_MEAN_ERROR and error.max() <= JPEG_MAX_ERROR, (twin.name, error.mean(), error.max())
    else:
        assert error.max() == 0, (twin.name, error.max())


def test_the_pillow_half_does_not_import_tensorflow():
    completed = subprocess.run(
        [sys.executable, "-c", "import sys, dualenc.data.images; print('tensorflow' in sys.modules)"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
    )
    assert completed.stdout.strip() == "False"


def test_every_twin_is_a_supported_file_name(twins):
    assert all(name.lower().endswith(SUPPORTED_SUFFIXES) for name in [*twins, *broken_files()])
    assert {".webp", ".tif", ".tiff", ".gif", ".bmp"} <= set(SUPPORTED_SUFFIXES)


def test_grid_pixels_are_the_correct_pixels(twins):
    for twin in twins.values():
        check_pixels(twin, decode_rgb(twin.data))


def test_tensorflow_decodes_canonical_bytes_to_the_grid_pixels(twins):
    for twin in twins.values():
        canonical = canonical_image_bytes(twin.data)
        np.testing.assert_array_equal(tensorflow_pixels(canonical), decode_rgb(twin.data), err_msg=twin.name)


@pytest.mark.parametrize("image_format, options", [
    ("JPEG", {"quality": 75}),  # 4:2:0 chroma
    ("JPEG", {"quality": 90, "progressive": True}),
    ("JPEG", {"quality": 95, "subsampling": 0}),
    ("WEBP", {"quality": 80}),
])
def test_lossy_files_kept_as_is_decode_alike_in_tensorflow_and_pillow(image_format, options):
    """JPEG: TensorFlow's default fast DCT is off by up to ~5 levels; with the accurate DCT that
    `decode_image` asks for, measured 0 on these files (bound: 1 level)."""
    data = encoded(smooth_pixels(9), image_format, **options)
    assert canonical_image_bytes(data) == data
    error = np.abs(tensorflow_pixels(data).astype(int) - decode_rgb(data))
    assert error.max() <= (1 if image_format == "JPEG" else 0)


def test_tensorflow_alone_gets_the_rewritten_kinds_wrong(twins):
    """Why they are rewritten: raw bytes through TensorFlow's decoder miss the correct pixels."""
    for name in ("exif6.jpg", "exif3.jpeg", "grey16.png", "palette.bmp"):
        twin = twins[name]
        assert canonical_image_bytes(twin.data) != twin.data
        raw = tf.io.decode_image(twin.data, channels=3, expand_animations=False).numpy()
        if raw.shape == twin.pixels.shape:
            error = np.abs(raw.astype(int) - twin.pixels)
            assert error.mean() > JPEG_MEAN_ERROR if twin.lossy else error.max() > 0, name


@pytest.mark.parametrize("name", ["plain.png", "upright.jpg", "rgba.png", "grey8.png", "grey_alpha.png",
                                  "palette.png", "palette_rgb.png"])
def test_files_tensorflow_decodes_right_are_kept_byte_for_byte(twins, name):
    assert canonical_image_bytes(twins[name].data) == twins[name].data


def test_sixteen_bit_grey_is_scaled_by_257_and_colour_keeps_its_high_byte():
    values = np.array([[0, 128, 129, 257, 32767, 32896, 65406, 65535]], np.uint16)
    grey = decode_rgb(encoded(values, "PNG"))[..., 0]
    np.testing.assert_array_equal(grey, np.round(values / 257.0))
    assert grey.tolist() == [[0, 0, 1, 1, 127, 128, 254, 255]]
    colour = np.random.default_rng(10).integers(0, 65536, (6, 5, 3)).astype(np.uint16)
    decoded = decode_rgb(tf.io.encode_png(colour).numpy()).astype(int)
    np.testing.assert_array_equal(decoded, colour >> 8)
    assert np.abs(decoded - np.round(colour / 257.0)).max() == 1


def test_resizing_keeps_sixteen_bit_grey_grey_and_rotations_upright(twins):
    for name in ("grey16.png", "exif6.jpg"):
        twin = twins[name]
        resized = decode_rgb(canonical_image_bytes(twin.data, StoreSize(max_side=24)))
        expected = np.asarray(Image.fromarray(twin.pixels).resize((20, 24), Image.Resampling.LANCZOS))
        assert resized.shape == expected.shape
        assert np.abs(resized.astype(int) - expected).mean() < RESIZED_MEAN_ERROR, name


@pytest.mark.parametrize("name", list(broken_files()))
def test_broken_files_raise_a_short_reason(name):
    data, reason = broken_files()[name]
    with pytest.raises(ImageProblem) as raised:
        canonical_image_bytes(data)
    assert reason in str(raised.value) and "\n" not in str(raised.value)


def test_unreadable_paths_and_oversized_images(tmp_path):
    with pytest.raises(ImageProblem, match="^file not found$"):
        read_image_file(tmp_path / "missing.png")
    with pytest.raises(ImageProblem, match="^cannot read file: Is a directory$"):
        read_image_file(tmp_path)
    tall = encoded(np.zeros((1_000_001, 1), np.uint8), "PNG")
    with pytest.raises(ImageProblem, match="1x1000001 pixels: sides longer than 1,000,000"):
        canonical_image_bytes(tall)


# Through packing and through a folder gallery, with an exported encoder.


def layout_encoder() -> keras.Model:
    """uint8 ``[N, 32, 32, 3]`` → a fixed random projection of the centred 8×8 thumbnail.

    Unlike a mean-colour encoder it sees layout and brightness: a twin left unrotated, or a grey
    picture clipped to white, scores far below `TWIN_COSINE` (checked below).
    """
    pixels = keras.Input(shape=(*ENCODER_SIZE, 3), dtype="uint8")
    centred = keras.layers.Rescaling(1.0 / 255.0, offset=-0.5)(pixels)
    thumbnail = keras.layers.Flatten()(keras.layers.AveragePooling2D(4)(centred))
    projection = keras.layers.Dense(EMBEDDING_DIMENSION, use_bias=False,
                                    kernel_initializer=keras.initializers.RandomNormal(seed=0))
    return keras.Model(pixels, projection(thumbnail))


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory) -> Path:
    """A run directory holding only an exported vision encoder (the one place that exports)."""
    from dualenc.export.encoders import VISION_ENCODER_DIR, export_vision_encoder

    run_dir = tmp_path_factory.mktemp("run")
    export_vision_encoder(layout_encoder(), ENCODER_SIZE, run_dir / VISION_ENCODER_DIR)
    return run_dir


@pytest.fixture(scope="module")
def twin_folder(tmp_path_factory, twins) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for twin in twins.values():
        (folder / "twins" / twin.name).parent.mkdir(exist_ok=True)
        (folder / "twins" / twin.name).write_bytes(twin.data)
    for name, (data, _) in broken_files().items():
        (folder / "broken" / name).parent.mkdir(exist_ok=True)
        (folder / "broken" / name).write_bytes(data)
    return folder


def embed(run_dir: Path, blobs: list[bytes]) -> np.ndarray:
    from dualenc.export.encoders import VISION_ENCODER_DIR, load_encoder

    return load_encoder(run_dir / VISION_ENCODER_DIR)(blobs)


def check_twin_cosines(twins: dict[str, Twin], embeddings: dict[str, np.ndarray]) -> None:
    for twin in twins.values():
        cosine = float(embeddings[twin.name] @ embeddings[twin.twin_of])
        assert cosine >= TWIN_COSINE, (twin.name, cosine)


def test_the_encoder_tells_wrong_decodings_apart(vision_run, twins):
    """The control: the mistakes this module fixes would fail the twin checks below."""
    photo, grey = twins["plain.png"].pixels, twins["grey8.png"].pixels
    unrotated, white = np.ascontiguousarray(np.rot90(photo, 2)), np.full_like(grey, 255)
    rows = embed(vision_run, [encoded(photo, "PNG"), encoded(unrotated, "PNG"), encoded(grey, "PNG"), encoded(white, "PNG")])
    assert rows[0] @ rows[1] < 0.9 and rows[2] @ rows[3] < 0.9


def pack(folder: Path, out: Path, twins: dict[str, Twin], *options: str) -> dict:
    from tfrecords_tools.__main__ import main

    table = folder / "captions.csv"
    with open(table, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "caption"])
        writer.writerows([f"twins/{name}", f"picture {name}"] for name in twins)
        writer.writerows([f"broken/{name}", f"broken {name}"] for name in broken_files())
    assert main(["folder", "--captions", str(table), "--images", str(folder), "--out", str(out),
                 "--workers", "1", *options]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    from dualenc.data.records import parse_example

    shards = [str(out / name) for name in manifest["splits"]["train"]["shards"]]
    stored = {}
    for serialized in tf.data.TFRecordDataset(shards):
        features = parse_example(serialized)
        stored[features["image_id"].numpy().decode().removeprefix("twins/")] = features["image"].numpy()
    return {"manifest": manifest, "images": stored}


def check_skipped(skipped: dict[str, str]) -> None:
    """`skipped`: file name → reason; every broken file, each with its own reason."""
    expected = broken_files()
    assert sorted(skipped) == sorted(expected)
    for name, reason in skipped.items():
        assert expected[name][1] in reason and "Graph execution" not in reason, (name, reason)


def test_twins_through_packing(twin_folder, vision_run, twins, tmp_path):
    packed = pack(twin_folder, tmp_path / "packed", twins)
    check_skipped({Path(entry["path"]).name: entry["reason"] for entry in packed["manifest"]["skipped"]})
    assert sorted(packed["images"]) == sorted(twins)
    for name, data in packed["images"].items():
        check_pixels(twins[name], tensorflow_pixels(data))
    names = list(packed["images"])
    check_twin_cosines(twins, dict(zip(names, embed(vision_run, [packed["images"][name] for name in names]))))

    resized = pack(twin_folder, tmp_path / "resized", twins, "--resize", "24")["images"]
    for name, data in resized.items():
        expected = np.asarray(Image.fromarray(twins[name].pixels).resize((20, 24), Image.Resampling.LANCZOS))
        pixels = tensorflow_pixels(data)
        assert pixels.shape == expected.shape and np.abs(pixels.astype(int) - expected).mean() < RESIZED_MEAN_ERROR, name


def test_twins_through_a_folder_gallery(twin_folder, vision_run, twins):
    from dualenc.retrieval.gallery import FolderGallery
    from dualenc.retrieval.index import open_index

    log = io.StringIO()
    index = open_index(vision_run, FolderGallery(twin_folder), log=log)
    assert sorted(index.image_ids) == sorted(f"twins/{name}" for name in twins)
    check_skipped({Path(entry["path"]).name: entry["reason"] for entry in index.skipped})
    assert "broken/five.tif: 16-bit TIFF with 5 channel(s) not supported" in log.getvalue()
    embeddings = {image_id.removeprefix("twins/"): row for image_id, row in zip(index.image_ids, index.embeddings)}
    check_twin_cosines(twins, embeddings)
    # The gallery embeds what training sees: the same rows as the packed bytes would give.
    canonical = [canonical_image_bytes(twins[name].data) for name in embeddings]
    np.testing.assert_allclose(np.stack(list(embeddings.values())), embed(vision_run, canonical), atol=1e-6)
