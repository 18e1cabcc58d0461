"""The tiny "colour" run that the export, index and search CLI tests share.

A vision tower that maps an image's mean colour to a direction in 3-d space and a text tower
that maps colour words to the same directions, so the query "red" honestly ranks red images
first; plus the noisy single-colour images and packed dataset it is searched over.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from dualenc.core import config as run_config
from dualenc.export.encoders import export_encoders
from dualenc.data.records import MANIFEST_NAME, serialize_example, shard_name

IMAGE_SIZE = (32, 32)

# The corners of the colour cube seen from its centre: mean colour - 0.5, signs only.
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}


def colour_direction(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.array([1.0 if channel > 127 else -1.0 for channel in rgb], np.float32)


def mean_colour_encoder() -> keras.Model:
    """uint8 ``[N, H, W, 3]`` → (mean colour − ½) · A with a trainable 3×3 A (identity at init)."""
    pixels = keras.Input(shape=(*IMAGE_SIZE, 3), dtype="uint8")
    centred = keras.layers.Rescaling(1.0 / 255.0, offset=-0.5)(pixels)
    pooled = keras.layers.GlobalAveragePooling2D()(centred)
    embeddings = keras.layers.Dense(3, use_bias=False, kernel_initializer="identity")(pooled)
    return keras.Model(pixels, embeddings, name="mean_colour")


class ColourWordEncoder(keras.layers.Layer):
    """Captions → sum over words of the word's colour direction (0 for non-colour words).

    Words are looked up with a `StringLookup` (a hash-table resource the export must carry)
    and mapped through a trainable table whose row 0, for unknown words, is zero.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lookup = keras.layers.StringLookup(vocabulary=list(COLOURS), num_oov_indices=1)
        directions = np.stack([np.zeros(3, np.float32)] + [colour_direction(rgb) for rgb in COLOURS.values()])
        self.table = self.add_weight(shape=directions.shape, initializer=keras.initializers.Constant(directions))

    def call(self, captions):
        words = tf.strings.split(tf.strings.lower(captions))
        rows = tf.ragged.map_flat_values(lambda flat: tf.gather(self.table, self.lookup(flat)), words)
        return tf.reduce_sum(rows, axis=1) + 1e-6  # never exactly zero: unknown words still normalise


def colour_word_encoder() -> ColourWordEncoder:
    """A built `ColourWordEncoder` (an export tracks built layers only)."""
    encoder = ColourWordEncoder()
    encoder(tf.constant(["build"]))
    return encoder


def encode_png(pixels: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def solid_image(rgb: tuple[int, int, int], seed: int, size: tuple[int, int] = (40, 24)) -> np.ndarray:
    """A noisy image of one colour: the colour ± 40, so images differ but keep their colour."""
    noise = np.random.default_rng(seed).integers(-40, 41, size=(*size, 3))
    return np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)


def write_packed_dataset(data_dir: Path, splits: dict[str, list[tuple[str, bytes, str, int]]]) -> None:
    """A packed dataset: one shard per split of (caption, image bytes, image_id, label) records."""
    data_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for split, records in splits.items():
        name = shard_name(split, 0, 1)
        with tf.io.TFRecordWriter(str(data_dir / name)) as writer:
            for record in records:
                writer.write(serialize_example(*record))
        summaries[split] = {
            "pairs": len(records),
            "images": len({record[2] for record in records}),
            "ids": len({record[3] for record in records}),
            "shards": [name],
            "sha256": {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest()},
        }
    manifest = {"format_version": 1, "source": {"format": "test"}, "splits": summaries, "skipped": [], "image_size": None}
    (data_dir / MANIFEST_NAME).write_text(json.dumps(manifest))


def colour_records(count_per_colour: int, seed: int) -> list[tuple[str, bytes, str, int]]:
    """Two captions per image (duplicate image_ids, as in COCO); label = the colour's index."""
    records = []
    for label, (word, rgb) in enumerate(COLOURS.items()):
        for copy in range(count_per_colour):
            image = encode_png(solid_image(rgb, seed=seed + 100 * label + copy))
            image_id = f"{word}/{copy:03d}.png"
            records.append((f"a {word} square", image, image_id, label))
            records.append((f"something {word} and noisy", image, image_id, label))
    return records


def make_colour_run(root: Path) -> Path:
    """A run directory with exported colour towers, config.json and a packed dataset (train/test)."""
    data_dir = root / "data"
    write_packed_dataset(data_dir, {"train": colour_records(2, seed=0), "test": colour_records(3, seed=1000)})
    run_dir = root / "runs" / "20250101-000000"
    run_dir.mkdir(parents=True)
    export_encoders(
        run_dir, encode_images=mean_colour_encoder(), encode_texts=colour_word_encoder(), image_size=IMAGE_SIZE
    )
    run_config.save(run_config.TrainConfig(data=str(data_dir)), run_dir / "config.json")
    (root / "runs" / "latest").symlink_to(run_dir.name)
    return run_dir
