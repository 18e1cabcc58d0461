"""Training-only augmentation of batches in the tf.data pipeline (`AugmentConfig`).

Images (uint8, ``(B, H, W, 3)``), each independently, in this order:

- flip: mirror left-right with probability 1/2;
- translate: shift by integer offsets ``dy ∈ [-round(t·H), round(t·H)]``,
  ``dx ∈ [-round(t·W), round(t·W)]``, filling the vacated band by repeating the edge pixels
  (pad with edge mode, crop back): no resize and no new colours, so a garment keeps its length;
- erase: with probability `erase`, one box of ``ERASE_AREA`` of the image with aspect ratio
  (h/w) log-uniform in ``ERASE_ASPECT`` (random erasing, Zhong et al. 2020), filled with noise.

Caption token ids (BiLSTM, ``(B, S)``, 0-padded): each token but padding, [START] and [END]
becomes padding (0) with probability `token_dropout`; the Embedding's ``mask_zero`` skips it.

Every draw is a stateless random op of an explicit seed. `augment_batches` derives batch i's
seed from its epoch's seed and its place in the epoch, so a run resumed at a later epoch
augments each batch as the uninterrupted run did. The math lives in pure functions of explicit
parameters (`flip_images`, `translate_images`, `erase_images`, `drop_tokens`), which the tests
check against NumPy; `draw_image_parameters` and `draw_token_drops` draw those parameters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import tensorflow as tf

from dualenc.core.config import AugmentConfig
from dualenc.data.records import IMAGE

# The model's caption token ids key (`dualenc.models.model.TOKENS`); data may not import models.
TOKENS_KEY = "tokens"
# Random erasing's box: fraction of the image area, and the range of its aspect ratio h/w.
ERASE_AREA = (0.02, 0.2)
ERASE_ASPECT = (0.3, 3.3)
# Token ids of padding (the BiLSTM's Embedding masks them).
PADDING = 0
# Words that name a side of the picture, which a left-right flip would make false.
SIDE_WORDS = re.compile(r"\b(?:left|right|lefthand|righthand)\b", re.IGNORECASE)


class ImageParameters(NamedTuple):
    """One batch's image draws, one row per image.

    flip: (B,) bool. offsets: (B, 2) int32, (dy, dx). erase: (B,) bool, whether the image is
    erased. boxes: (B, 4) int32, (top, left, height, width) inside the image. noise:
    (B, H, W, 3) uint8 erase fill, or None when the config never erases.
    """

    flip: tf.Tensor
    offsets: tf.Tensor
    erase: tf.Tensor
    boxes: tf.Tensor
    noise: tf.Tensor | None


def sides_named(captions: Iterable[str]) -> bool:
    """Whether any caption names a left or right side ("a bag on her left shoulder"): a flip
    would contradict it, so a run leaves flips off for such a caption set."""
    return any(SIDE_WORDS.search(caption) for caption in captions)


def flip_images(images: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """images (B, H, W, C) with the rows where `flip` (B,) is true mirrored left-right."""
    return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)


def translate_images(images: tf.Tensor, dy: tf.Tensor, dx: tf.Tensor) -> tf.Tensor:
    """images (B, H, W, C) shifted down by dy (B,) and right by dx (B,) pixels (negative: up,
    left), the vacated band repeating the nearest edge pixel: ``out[b, y, x] = images[b,
    clip(y - dy[b], 0, H-1), clip(x - dx[b], 0, W-1)]``. Gathers, so no pixel value is new."""
    shape = tf.shape(images)
    rows = tf.clip_by_value(tf.range(shape[1])[None, :] - tf.cast(dy, tf.int32)[:, None], 0, shape[1] - 1)  # (B, H)
    cols = tf.clip_by_value(tf.range(shape[2])[None, :] - tf.cast(dx, tf.int32)[:, None], 0, shape[2] - 1)  # (B, W)
    images = tf.gather(images, rows, axis=1, batch_dims=1)
    return tf.gather(images, cols, axis=2, batch_dims=1)


def erase_images(images: tf.Tensor, boxes: tf.Tensor, erase: tf.Tensor, noise: tf.Tensor) -> tf.Tensor:
    """images (B, H, W, C) with, where `erase` (B,) is true, the box (top, left, height, width)
    of `boxes` (B, 4) replaced by the same pixels of `noise` (B, H, W, C)."""
    shape = tf.shape(images)
    top, left, height, width = tf.unstack(tf.cast(boxes, tf.int32), axis=1)
    rows = tf.range(shape[1])[None, :]
    cols = tf.range(shape[2])[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])  # (B, W)
    inside = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]  # (B, H, W)
    return tf.where(inside[..., None], noise, images)


def drop_tokens(tokens: tf.Tensor, drop: tf.Tensor) -> tf.Tensor:
    """tokens (B, S) with the ids where `drop` (B, S) is true set to padding, except padding
    itself and each row's first and last non-padding token ([START], [END]), which keep
    marking where the caption begins and ends."""
    present = tf.not_equal(tokens, PADDING)
    # Rank of each token among its row's non-padding ones: 1 is [START], the row's count [END].
    rank = tf.cumsum(tf.cast(present, tf.int32), axis=1)
    count = rank[:, -1:]
    droppable = present & (rank > 1) & (rank < count)
    return tf.where(drop & droppable, tf.zeros_like(tokens), tokens)


def draw_image_parameters(
    seed: tf.Tensor, batch_size: tf.Tensor | int, height: tf.Tensor | int, width: tf.Tensor | int, config: AugmentConfig
) -> ImageParameters:
    """Draw every image's flip, shift and erase box from `seed` (shape [2], stateless).

    Each kind of draw has its own seed split from `seed`, so turning one augmentation on or off
    leaves the others' draws as they were.
    """
    flip_seed, shift_seed, erase_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    size = tf.cast(tf.stack([height, width]), tf.int32)

    flip = tf.random.stateless_uniform([batch_size], flip_seed) < 0.5

    # float64, so round(t·H) rounds as Python does (half to even) at exact halves.
    reach = tf.cast(tf.round(config.translate * tf.cast(size, tf.float64)), tf.int32)  # (2,)
    spread = tf.cast(2 * reach + 1, tf.float32)
    uniform = tf.random.stateless_uniform([batch_size, 2], shift_seed)
    offsets = tf.minimum(tf.cast(tf.floor(uniform * spread), tf.int32), 2 * reach) - reach

    draws = tf.random.stateless_uniform([batch_size, 5], erase_seed)
    erase = draws[:, 0] < config.erase
    area = (ERASE_AREA[0] + draws[:, 1] * (ERASE_AREA[1] - ERASE_AREA[0])) * tf.cast(height * width, tf.float32)
    low, high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = tf.exp(low + draws[:, 2] * (high - low))
    box_size = tf.cast(tf.round(tf.stack([tf.sqrt(area * aspect), tf.sqrt(area / aspect)], axis=1)), tf.int32)
    box_size = tf.clip_by_value(box_size, 1, size)  # (B, 2): height, width, inside the image
    room = size - box_size + 1  # places for the box's corner along each axis
    corner = tf.minimum(tf.cast(tf.floor(draws[:, 3:] * tf.cast(room, tf.float32)), tf.int32), room - 1)
    boxes = tf.concat([corner, box_size], axis=1)

    noise = None
    if config.erase > 0:
        fill = tf.random.stateless_uniform(
            tf.stack([batch_size, height, width, 3]), noise_seed, minval=0, maxval=256, dtype=tf.int32
        )
        noise = tf.cast(fill, tf.uint8)
    return ImageParameters(flip, offsets, erase, boxes, noise)


def draw_token_drops(seed: tf.Tensor, shape: tf.Tensor, rate: float) -> tf.Tensor:
    """Bool mask of `shape`: each entry true with probability `rate` (stateless, from `seed`)."""
    return tf.random.stateless_uniform(shape, seed) < rate


def augment_batch(batch: dict, config: AugmentConfig, seed: tf.Tensor) -> dict:
    """`batch` with its images and caption token ids augmented as `config` says, every draw from
    `seed` (shape [2], int32 or int64): equal batches and seeds give equal output. Other keys,
    and images absent because cached features replace them, pass through untouched. Token ids
    must be a (B, S) tensor when `config.token_dropout` > 0 (`TrainConfig` refuses token dropout
    for towers that take a dict of them)."""
    image_seed, token_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    batch = dict(batch)
    if config.images and IMAGE in batch:
        images = batch[IMAGE]
        shape = tf.shape(images)
        parameters = draw_image_parameters(image_seed, shape[0], shape[1], shape[2], config)
        if config.flip:
            images = flip_images(images, parameters.flip)
        if config.translate > 0:
            images = translate_images(images, parameters.offsets[:, 0], parameters.offsets[:, 1])
        if config.erase > 0:
            images = erase_images(images, parameters.boxes, parameters.erase, parameters.noise)
        batch[IMAGE] = images
    if config.token_dropout > 0:
        tokens = batch[TOKENS_KEY]
        batch[TOKENS_KEY] = drop_tokens(tokens, draw_token_drops(token_seed, tf.shape(tokens), config.token_dropout))
    return batch


def augment_batches(batches: tf.data.Dataset, config: AugmentConfig, epoch_seeds: Sequence[int]) -> tf.data.Dataset:
    """Augment the training stream `batches`: ``len(epoch_seeds)`` epochs of n batches each,
    concatenated. Batch i gets the seed ``[epoch_seeds[i // n], i % n]``, a function of its
    epoch and its place in it alone, so a resumed run (whose stream starts at a later epoch, with
    only the remaining epochs' seeds) augments every batch as the uninterrupted run did.
    `batches` itself comes back when `config` changes nothing."""
    if not (config.images or config.token_dropout > 0):
        return batches
    total = int(batches.cardinality())
    if total < 0 or not epoch_seeds or total % len(epoch_seeds):
        raise ValueError(
            f"augment_batches needs a known cardinality split evenly into {len(epoch_seeds)} epochs, got {total}"
        )
    per_epoch = total // len(epoch_seeds)
    # int64: epoch seeds reach 2**32 - 1.
    seeds = tf.constant(list(epoch_seeds), tf.int64)

    def augment(index: tf.Tensor, batch: dict) -> dict:
        seed = tf.stack([seeds[index // per_epoch], index % per_epoch])
        return augment_batch(batch, config, seed)

    return batches.enumerate().map(augment, num_parallel_calls=tf.data.AUTOTUNE)
