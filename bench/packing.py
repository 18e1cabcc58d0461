"""Packing image-caption pairs into TFRecords: seed 003's serial loop vs `tfrecords_tools`.

``seed``: a re-implementation of the seed's approach. Pairs are grouped by image into shards of
2,000 images; for every pair, one after the other in one process, the file is read with
``tf.io.read_file(path).numpy()`` (once per caption, as the seed does), a ``tf.train.Example``
with ``caption`` and ``raw_image`` is built and written with ``tf.io.TFRecordWriter``. Nothing
is checked: a truncated or non-JPEG file is stored as is and fails later, in training.

``ours``: `tfrecords_tools.writer.pack` with one reader thread per core. It does more per
image than the seed: every image is decoded once to validate it (by TensorFlow's own decoder
for JPEGs and PNGs stored as they are, by Pillow too for what it re-encodes when TensorFlow would
decode it differently), each shard is checksummed and journalled for resume, and a manifest is
written. Its time includes tracing the check's function (~0.13 s of CPU, once per process);
neither time includes importing TensorFlow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.common import ChildMemoryMonitor, Stopwatch
from bench.datasets import load_entries

SEED_IMAGES_PER_FILE = 2000


def seed_pairs(source_format: str, annotations: Path, images: Path) -> list[tuple[str, str]]:
    """(image path, caption) in annotation order, parsed the simple way the seed does."""
    if source_format == "cuhk-pedes":
        entries = json.loads(annotations.read_text(encoding="utf-8"))
        return [(str(images / entry["file_path"]), caption) for entry in entries for caption in entry["captions"]]
    rows = [json.loads(line) for line in annotations.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(str(images / row["image"]), row["caption"]) for row in rows]


def seed_pack(pairs: list[tuple[str, str]], out_dir: Path) -> int:
    """Write `pairs` the seed's way; returns the number of records written."""
    import tensorflow as tf

    def bytes_feature(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    image_order: dict[str, list[str]] = {}
    for path, caption in pairs:
        image_order.setdefault(path, []).append(caption)
    paths = list(image_order)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for file_index, start in enumerate(range(0, len(paths), SEED_IMAGES_PER_FILE)):
        with tf.io.TFRecordWriter(str(out_dir / f"train-{file_index:02d}.tfrecord")) as writer:
            for path in paths[start:start + SEED_IMAGES_PER_FILE]:
                for caption in image_order[path]:
                    feature = {
                        "caption": bytes_feature(caption.encode()),
                        "raw_image": bytes_feature(tf.io.read_file(path).numpy()),
                    }
                    example = tf.train.Example(features=tf.train.Features(feature=feature))
                    writer.write(example.SerializeToString())
                    written += 1
    return written


def decode_floor(source_format: str, annotations: Path, images: Path) -> dict:
    """The packing floor: pairs/s when every core does nothing but decode each image once with
    TensorFlow (`tf.io.decode_image`, full size), from the CPU seconds of decoding them one
    after another (files read before the clock starts)."""
    import tensorflow as tf

    splits, _ = load_entries(source_format, annotations, images)
    entries = [entry for split_entries in splits.values() for entry in split_entries]
    blobs = [Path(entry.path).read_bytes() for entry in entries]
    pairs = sum(len(entry.pairs) for entry in entries)
    tf.io.decode_image(blobs[0], channels=3, expand_animations=False)  # the op's first run
    with Stopwatch() as clock:
        for blob in blobs:
            tf.io.decode_image(blob, channels=3, expand_animations=False)
    cores = os.cpu_count() or 1
    seconds_per_image = clock.cpu_seconds / len(blobs)
    return {"decode_ms": 1000 * seconds_per_image, "cores": cores, "pairs": pairs,
            "pairs_per_s": cores / seconds_per_image * pairs / len(blobs), "workers_mb": 0.0}


def measure(variant: str, params: dict) -> dict:
    """Pack the source in `params` (format, annotations, images, out) with `variant`, pairs/s;
    or (``floor``) the pairs/s of decoding every image once on every core."""
    annotations, images, out = Path(params["annotations"]), Path(params["images"]), Path(params["out"])
    # TensorFlow is imported before timing by both: the seed's notebook has it loaded, and the
    # import (~2-3 s) is the same fixed cost for any script that packs with it.
    import tensorflow as tf

    tf.constant(0)
    if variant == "floor":
        return decode_floor(params["format"], annotations, images)
    if variant == "seed":
        with Stopwatch() as clock:
            pairs = seed_pack(seed_pairs(params["format"], annotations, images), out)
        return {"seconds": clock.seconds, "pairs": pairs, "pairs_per_s": pairs / clock.seconds, "workers_mb": 0.0}
    from bench.datasets import pack_with_tools

    load_entries(params["format"], annotations, images)  # warm the imports outside the clock
    workers = os.cpu_count() or 1
    with ChildMemoryMonitor() as monitor, Stopwatch() as clock:
        manifest = pack_with_tools(params["format"], annotations, images, out, workers)
    pairs = sum(split.pairs for split in manifest.splits.values())
    return {"seconds": clock.seconds, "pairs": pairs, "pairs_per_s": pairs / clock.seconds,
            "workers": workers, "workers_mb": monitor.peak_mb}
