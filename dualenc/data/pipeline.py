"""Training input: a packed split as batches of decoded image-caption pairs, plus the checks a run makes first.

`pair_batches` is the one input pipeline: training fits and validates on it, and
``bench/pipeline.py`` times it with the arguments training gives it for the demo preset.
Training batches: `dualenc.data.packed.record_dataset` (shard names shuffled -> interleaved
reading -> shuffle of the *serialised* records) -> parse + decode (parallel) -> batch ->
prefetch, last. Shuffling before decoding keeps the buffer holding compressed bytes rather than
decoded pixels (a 299x299 image is ~268 kB decoded, ~30 kB as JPEG).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from dualenc.core.config import AugmentConfig
from dualenc.core.errors import DualEncError
from dualenc.data.augment import augment_batches
from dualenc.core.files import sha256_of_file
from dualenc.data.images import decode_image
from dualenc.data.manifest import load_manifest, manifest_path
# Still imported from here by search.py and dualenc/api.py until they call `default_split`.
from dualenc.data.packed import distinct_images, record_dataset
from dualenc.data.records import CAPTION, FEATURE_SPEC, IMAGE, IMAGE_ID, LABEL, parse_example
from dualenc.data.sampling import identity_batches

# A parsed record (`parse_example`) -> the model's image inputs, in place of decoded pixels.
ImageInputs = Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]
# A batch -> the batch with more inputs (e.g. the captions' tokens).
BatchInputs = Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]


def verify_checksums(data_dir: str | Path, split: str) -> None:
    """Check every shard of `split` against the manifest's sha256; `DualEncError` names the
    first shard whose content differs."""
    data_dir = Path(data_dir)
    summary = load_manifest(data_dir).split(split, data_dir)
    for name in summary.shards:
        if sha256_of_file(data_dir / name) != summary.sha256[name]:
            raise DualEncError(
                f"shard {data_dir / name} does not match its sha256 in {manifest_path(data_dir)} "
                "(corrupted or modified); re-pack the dataset"
            )


@dataclasses.dataclass(frozen=True)
class Holdout:
    """Training labels set aside for validation: `kind` is "identities", or "images" when every
    image has its own label; `pairs` of the `total` training pairs carry them."""

    labels: tuple[int, ...]
    pairs: int
    total: int
    kind: str

    @property
    def description(self) -> str:
        return f"{len(self.labels)} training {self.kind} ({self.pairs} of {self.total} pairs) held out"


def _holdout_filter(holdout: Holdout, held_out: bool) -> Callable[[tf.Tensor], tf.Tensor]:
    """Serialised record -> whether its label is (`held_out`) or is not among the held-out labels."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(holdout.labels, tf.int64), tf.ones(len(holdout.labels), tf.int64)),
        default_value=0,
    )

    def keep(record: tf.Tensor) -> tf.Tensor:
        label = tf.io.parse_single_example(record, {LABEL: FEATURE_SPEC[LABEL]})[LABEL]
        return tf.equal(table.lookup(label), 1 if held_out else 0)

    return keep


# Decoded pixels of a run's splits are kept in memory up to this size (`decoded_pixels`): the
# demo's 64x32 crops take 94 MB for train and validation, CUHK-PEDES at 384x128 would take ~6 GB.
PIXEL_CACHE_BYTES = 1 << 30
DECODE_BATCH = 256


def decoded_pixels(data_dir: str | Path, splits: Sequence[str], image_size: tuple[int, int]
                   ) -> tuple[list[str], np.ndarray] | None:
    """Each distinct image of `splits` decoded once, as (image ids, uint8 pixels (N, H, W, 3)),
    or None when they would take more than `PIXEL_CACHE_BYTES`.

    Training then looks images up by id instead of decoding every pair's image every epoch:
    each image has several captions, and the decode competes with the model for the CPU.
    """
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    count = sum(manifest.split(split, data_dir).images for split in splits)
    if count * image_size[0] * image_size[1] * 3 > PIXEL_CACHE_BYTES:
        return None
    ids, parts, seen = [], [], set()
    decode = lambda images: tf.map_fn(lambda image: decode_image(image, image_size), images,  # noqa: E731
                                      fn_output_signature=tf.uint8)
    for split in splits:
        batches = distinct_images(data_dir, split, DECODE_BATCH).map(
            lambda batch: (batch[IMAGE_ID], decode(batch[IMAGE])), num_parallel_calls=tf.data.AUTOTUNE)
        for batch_ids, pixels in batches.as_numpy_iterator():
            keep = [row for row, image_id in enumerate(batch_ids.tolist()) if image_id not in seen]
            seen.update(batch_ids[keep].tolist())
            ids += [image_id.decode("utf-8") for image_id in batch_ids[keep]]
            parts.append(pixels[keep])
    return ids, np.concatenate(parts)


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch: a function of the run's seed and the epoch alone, so a
    run resumed at `epoch` shuffles it as the uninterrupted run did."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _known_length(batches: tf.data.Dataset, count: int) -> tf.data.Dataset:
    """`batches` with its length stated: Keras averages an epoch of unknown length over one step too many."""
    return batches.apply(tf.data.experimental.assert_cardinality(count))


def _pair_parser(image_size: tuple[int, int], image_inputs: ImageInputs | None, decode: bool):
    """Serialised record -> a pair: caption, label, image_id and the image (decoded pixels, its
    encoded bytes when not `decode`, or what `image_inputs` makes of the parsed record)."""

    def parse(record: tf.Tensor) -> dict[str, tf.Tensor]:
        features = parse_example(record)
        pair = {LABEL: features[LABEL], IMAGE_ID: features[IMAGE_ID], CAPTION: features[CAPTION]}
        if image_inputs is not None:
            return {**pair, **image_inputs(features)}
        return {**pair, IMAGE: decode_image(features[IMAGE], image_size) if decode else features[IMAGE]}

    return parse


def pair_batches(
    data_dir: str | Path,
    split: str,
    *,
    image_size: tuple[int, int],
    batch_size: int,
    training: bool,
    epoch_seeds: Sequence[int] = (0,),
    instances_per_identity: int | None = None,
    holdout: Holdout | None = None,
    image_inputs: ImageInputs | None = None,
    batch_inputs: BatchInputs | None = None,
    augment: AugmentConfig = AugmentConfig(),
) -> tf.data.Dataset:
    """Batches of `split`'s pairs, of known length (Keras' epoch means need it): dicts of
    ``image`` uint8 (B, H, W, 3), ``caption`` string (B,), ``label`` int64 (B,) and ``image_id``
    string (B,). `image_inputs` (parsed record -> dict) replaces decoding the image, e.g. by a
    frozen tower's cached features; `batch_inputs` (batch -> batch) adds to each batch, e.g. the
    captions' tokens.

    Training: one epoch per seed of `epoch_seeds`, one after the other, each shuffled by its
    seed alone and exactly ``len(batches) / len(epoch_seeds)`` batches long. With
    `instances_per_identity` K, each batch is ``batch_size // K`` labels x K pairs
    (`identity_batches`, for losses that learn from identities); otherwise plain shuffled
    batches, the last partial one dropped. Not training: every pair once, in packing order.
    With a `holdout`, training leaves its labels out and evaluation takes only them. Training
    batches are then augmented (`augment`, after `batch_inputs`: images and tokens), each batch
    from its epoch's seed and its place in the epoch (`dualenc.data.augment.augment_batches`).
    """
    data_dir = Path(data_dir)
    pairs = load_manifest(data_dir).split(split, data_dir).pairs
    select = lambda records: records  # noqa: E731
    if holdout is not None:
        keep = _holdout_filter(holdout, held_out=not training)
        select = lambda records: records.filter(keep)  # noqa: E731
        pairs = pairs - holdout.pairs if training else holdout.pairs
    if training and instances_per_identity is None and pairs < batch_size:
        raise DualEncError(f"--batch-size {batch_size} is larger than the {pairs} training pairs left; lower it")
    if training and instances_per_identity is not None:
        # Light elements (encoded bytes) are grouped by identity, then decoded per batch.
        light = select(record_dataset(data_dir, split)).map(
            _pair_parser(image_size, image_inputs, decode=False), num_parallel_calls=tf.data.AUTOTUNE
        )
        batches = identity_batches(light, max(1, batch_size // instances_per_identity), instances_per_identity,
                                   epoch_seeds=list(epoch_seeds))
        if image_inputs is None:
            decode = lambda images: tf.map_fn(  # noqa: E731
                lambda image: decode_image(image, image_size), images, fn_output_signature=tf.uint8
            )
            batches = batches.map(lambda batch: {**batch, IMAGE: decode(batch[IMAGE])}, num_parallel_calls=tf.data.AUTOTUNE)
    elif training:
        parse = _pair_parser(image_size, image_inputs, decode=True)
        one_epoch = [
            _known_length(
                select(record_dataset(data_dir, split, shuffle=True, seed=seed))
                .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch_size, drop_remainder=True),
                pairs // batch_size,
            )
            for seed in epoch_seeds
        ]
        batches = functools.reduce(tf.data.Dataset.concatenate, one_epoch)
    else:
        in_order = select(record_dataset(data_dir, split)).map(
            _pair_parser(image_size, image_inputs, decode=True), num_parallel_calls=tf.data.AUTOTUNE
        )
        batches = _known_length(in_order.batch(batch_size), -(-pairs // batch_size))
    if batch_inputs is not None:
        batches = batches.map(batch_inputs, num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        batches = augment_batches(batches, augment, epoch_seeds)
    return batches.prefetch(tf.data.AUTOTUNE)
