"""Input pipeline, TFRecords → batches of decoded images: seed 003's `get_dataset` vs training's own.

``seed``: list_files → TFRecordDataset → map(parse, decode_jpeg, resize to the image size;
AUTOTUNE, deterministic=False) → shuffle(batch × 10) of *decoded* float32 images → prefetch →
batch. It reads our packed shards, parsing our ``image`` key where the seed's shards say
``raw_image`` (the only difference). ``ours``: exactly what ``train.py`` fits on —
`dualenc.data.pipeline.pair_batches` with the arguments training gives it
(`dualenc.training.loop.pipeline_arguments`) for the demo preset at the bench's batch and
image size, its augmentation off (the seed has none): one epoch shuffled by its seed, parse +
decode in parallel (deterministic order, so a resumed run sees the same batches), the last
partial batch dropped, and the captions tokenised by the demo's BiLSTM vocabulary (learnt from
the split before the clock starts; the seed tokenises inside its model, so this is work ours
does and the seed's pipeline does not).

Each is compared at its natural output: float32 [B, H, W, 3] for the seed (what
`tf.image.resize` returns), uint8 for ours (the towers cast and preprocess in-graph; uint8
batches are 4× smaller to move). Ours decodes a JPEG at least twice the target at libjpeg's
reduced DCT scale and antialiases only what still shrinks by more than 2×
(`dualenc.data.images.decode_image`). Time covers one full pass including the first batch's
latency (shuffle-buffer fill); CPU seconds (all threads) are reported too, steadier than wall
time on a shared machine.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from bench.common import Stopwatch


def seed_dataset(data_dir: Path, batch_size: int, image_size: tuple[int, int]):
    """The seed's `get_dataset` over our shards."""
    import tensorflow as tf

    feature_description = {
        "caption": tf.io.FixedLenFeature([], tf.string),
        "image": tf.io.FixedLenFeature([], tf.string),
    }

    def read_example(example):
        features = tf.io.parse_single_example(example, feature_description)
        raw_image = features.pop("image")
        features["image"] = tf.image.resize(tf.image.decode_jpeg(raw_image, channels=3), size=image_size)
        return features

    return (
        tf.data.TFRecordDataset(tf.data.Dataset.list_files(str(data_dir / "train-*.tfrecord")))
        .map(read_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .shuffle(batch_size * 10)
        .prefetch(buffer_size=tf.data.AUTOTUNE)
        .batch(batch_size)
    )


def training_dataset(data_dir: Path, batch_size: int, image_size: tuple[int, int], scratch: Path):
    """The batches ``train.py`` fits on for the demo preset with this batch and image size,
    unaugmented."""
    from dualenc.core.config import AugmentConfig
    from dualenc.data.pipeline import pair_batches
    from dualenc.models.preprocessing import build_text_preprocessor
    from dualenc.training.loop import learn_vocabulary, pipeline_arguments
    from dualenc.training.presets import preset

    demo = preset("demo")
    model = dataclasses.replace(
        demo.model,
        vision=dataclasses.replace(demo.model.vision, image_size=image_size),
        text=dataclasses.replace(demo.model.text, vocabulary=str(scratch / "vocabulary.txt")),
    )
    # Without the preset's random flips and shifts: the seed augments nothing, and their cost is
    # the recipe's (at 299x299 they take a quarter of the pipeline's CPU), not reading the data.
    config = dataclasses.replace(demo, data=str(data_dir), batch_size=batch_size, model=model, augment=AugmentConfig())
    learn_vocabulary(data_dir, config.model.text)
    text_preprocessor = build_text_preprocessor(config.model.text)
    return pair_batches(data_dir, "train", **pipeline_arguments(config, text_preprocessor, {}, training=True))


def stored_pixel_error(full_dir: Path, stored_dir: Path, image_size: tuple[int, int]) -> float:
    """Mean absolute difference, in levels of 255, between the training decode (`decode_image`
    at `image_size`) of each train image stored at size and of its full-size original."""
    import numpy as np
    import tensorflow as tf

    from dualenc.data.images import decode_image
    from dualenc.data.manifest import load_manifest
    from dualenc.data.records import IMAGE, IMAGE_ID, parse_example

    def images(data_dir: Path) -> dict[bytes, tf.Tensor]:
        shards = [str(data_dir / name) for name in load_manifest(data_dir).splits["train"].shards]
        return {record[IMAGE_ID].numpy(): record[IMAGE] for record in tf.data.TFRecordDataset(shards).map(parse_example)}

    full, stored = images(full_dir), images(stored_dir)
    errors = [np.abs(decode_image(full[key], image_size).numpy().astype(int)
                     - decode_image(stored[key], image_size).numpy().astype(int)).mean() for key in full]
    return float(np.mean(errors))


def measure(variant: str, params: dict) -> dict:
    """One pass over the packed split in `params["data_dir"]` (``stored``: training's pipeline
    over `params["stored_dir"]`, the same source stored at the image size); pairs/s."""
    import tensorflow as tf

    data_dir = Path(params["stored_dir" if variant == "stored" else "data_dir"])
    batch_size = params["batch_size"]
    image_size = tuple(params["image_size"])
    with tempfile.TemporaryDirectory() as scratch:
        if variant == "seed":
            batches = seed_dataset(data_dir, batch_size, image_size)
        else:
            batches = training_dataset(data_dir, batch_size, image_size, Path(scratch))
        tf.constant(0)  # runtime started outside the clock
        pairs = 0
        with Stopwatch() as clock:
            for batch in batches:
                pairs += int(batch["image"].shape[0])
    result = {"seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds, "pairs": pairs,
              "pairs_per_s": pairs / clock.seconds, "pairs_per_cpu_s": pairs / clock.cpu_seconds,
              "dtype": batch["image"].dtype.name}
    if variant == "stored":
        result["pixel_error"] = stored_pixel_error(Path(params["data_dir"]), data_dir, image_size)
    return result
