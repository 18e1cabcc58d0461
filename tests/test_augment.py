"""Training augmentation (`dualenc.data.augment`): each transform against a loop-based NumPy
reference, the draws' bounds and rates, determinism and resumption, and the guards."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dualenc.core.config import AugmentConfig, ModelConfig, TextConfig, TrainConfig
from dualenc.core.errors import DualEncError
from dualenc.data.augment import (
    TOKENS_KEY,
    augment_batch,
    augment_batches,
    draw_image_parameters,
    drop_tokens,
    erase_images,
    flip_images,
    sides_named,
    translate_images,
)
from dualenc.data.records import CAPTION, IMAGE, IMAGE_ID, LABEL

EVERYTHING = AugmentConfig(flip=True, translate=0.2, erase=0.5, token_dropout=0.3)
# The erase box the config promises (fraction of the image; aspect h/w), written out rather
# than imported, so a changed constant in the module fails here.
ERASE_AREA = (0.02, 0.2)
ERASE_ASPECT = (0.3, 3.3)


def _images(rng: np.random.Generator, batch: int = 6, height: int = 9, width: int = 7) -> np.ndarray:
    return rng.integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8)


def _tokens(rng: np.random.Generator, batch: int = 8, length: int = 12, dtype=np.int32) -> np.ndarray:
    """Rows of [START] pieces [END] (ids >= 1) followed by 0 padding, of random lengths >= 2."""
    tokens = np.zeros((batch, length), dtype=dtype)
    for row in range(batch):
        used = rng.integers(2, length + 1)
        tokens[row, :used] = rng.integers(1, 100, size=used)
    return tokens


def _seed(a: int, b: int = 0) -> tf.Tensor:
    return tf.constant([a, b], tf.int64)


# ---- the transforms against NumPy ----


def test_flip_matches_numpy():
    rng = np.random.default_rng(0)
    images = _images(rng)
    flags = rng.random(len(images)) < 0.5
    expected = np.stack([image[:, ::-1] if flag else image for image, flag in zip(images, flags)])
    np.testing.assert_array_equal(flip_images(tf.constant(images), tf.constant(flags)).numpy(), expected)


def test_translate_matches_numpy_edge_padding():
    rng = np.random.default_rng(1)
    images = _images(rng, batch=10)
    _, height, width, _ = images.shape
    dy = rng.integers(-height, height + 1, size=len(images))
    dx = rng.integers(-width, width + 1, size=len(images))
    expected = []
    for image, down, right in zip(images, dy, dx):
        padded = np.pad(image, ((height, height), (width, width), (0, 0)), mode="edge")
        expected.append(padded[height - down : 2 * height - down, width - right : 2 * width - right])
    out = translate_images(tf.constant(images), tf.constant(dy, tf.int32), tf.constant(dx, tf.int32)).numpy()
    np.testing.assert_array_equal(out, np.stack(expected))


def test_zero_translate_is_identity():
    images = _images(np.random.default_rng(2))
    zeros = tf.zeros([len(images)], tf.int32)
    np.testing.assert_array_equal(translate_images(tf.constant(images), zeros, zeros).numpy(), images)


def test_erase_matches_numpy():
    rng = np.random.default_rng(3)
    images = _images(rng, batch=10)
    _, height, width, _ = images.shape
    noise = _images(rng, batch=10)
    top = rng.integers(0, height, size=10)
    left = rng.integers(0, width, size=10)
    boxes = np.stack([top, left, rng.integers(1, height - top + 1), rng.integers(1, width - left + 1)], axis=1)
    active = rng.random(10) < 0.6
    expected = images.copy()
    for b, (y, x, h, w) in enumerate(boxes):
        if active[b]:
            expected[b, y : y + h, x : x + w] = noise[b, y : y + h, x : x + w]
    out = erase_images(tf.constant(images), tf.constant(boxes, tf.int32), tf.constant(active), tf.constant(noise))
    np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_drop_tokens_matches_numpy(dtype):
    rng = np.random.default_rng(4)
    tokens = _tokens(rng, batch=20, dtype=dtype)
    drop = rng.random(tokens.shape) < 0.5
    expected = tokens.copy()
    for row in range(len(tokens)):
        present = np.flatnonzero(tokens[row])
        for position in present[1:-1]:
            if drop[row, position]:
                expected[row, position] = 0
    out = drop_tokens(tf.constant(tokens), tf.constant(drop))
    assert out.dtype == tf.as_dtype(dtype)
    np.testing.assert_array_equal(out.numpy(), expected)


# ---- the draws ----


@pytest.mark.parametrize("translate, height, width", [(0.25, 12, 8), (0.1, 25, 35), (0.15, 10, 10)])
def test_translate_offsets_cover_their_bounds(translate, height, width):
    config = AugmentConfig(translate=translate)
    offsets = np.concatenate(
        [draw_image_parameters(_seed(s), 400, height, width, config).offsets.numpy() for s in range(3)]
    )
    for axis, size in enumerate((height, width)):
        reach = round(translate * size)
        assert set(offsets[:, axis]) == set(range(-reach, reach + 1))


def test_flip_draws_about_half():
    flips = draw_image_parameters(_seed(5), 2000, 8, 8, AugmentConfig(flip=True)).flip.numpy()
    assert 0.45 < flips.mean() < 0.55


def test_erase_boxes_within_area_and_aspect_bounds():
    height, width = 64, 48
    parameters = draw_image_parameters(_seed(6), 2000, height, width, AugmentConfig(erase=0.5))
    top, left, box_height, box_width = parameters.boxes.numpy().T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + box_height <= height).all() and (left + box_width <= width).all()
    # Rounding each side to whole pixels moves the area by at most (h + w) / 2 + 1/4 pixels.
    slack = ((box_height + box_width) / 2 + 0.25) / (height * width)
    fraction = box_height * box_width / (height * width)
    assert (fraction >= ERASE_AREA[0] - slack).all() and (fraction <= ERASE_AREA[1] + slack).all()
    assert fraction.min() < 0.03 and fraction.max() > 0.18
    aspect = box_height / box_width
    assert aspect.min() > ERASE_ASPECT[0] * 0.8 and aspect.max() < ERASE_ASPECT[1] * 1.25
    assert 0.45 < parameters.erase.numpy().mean() < 0.55


# ---- augment_batch ----


def test_translate_only_copies_pixels_of_the_same_image():
    rng = np.random.default_rng(7)
    images = _images(rng, batch=8, height=10, width=10)
    config = AugmentConfig(translate=0.3)
    for seed in range(5):
        out = augment_batch({IMAGE: tf.constant(images)}, config, _seed(seed))[IMAGE].numpy()
        for image, shifted in zip(images, out):
            colours = {tuple(pixel) for pixel in image.reshape(-1, 3)}
            assert {tuple(pixel) for pixel in shifted.reshape(-1, 3)} <= colours


def test_erase_fills_one_box_and_leaves_the_rest():
    height, width = 40, 40
    images = np.zeros((200, height, width, 3), np.uint8)
    out = augment_batch({IMAGE: tf.constant(images)}, AugmentConfig(erase=0.5), _seed(8))[IMAGE].numpy()
    changed = (out != 0).any(axis=-1)
    erased = changed.any(axis=(1, 2))
    assert 0.35 < erased.mean() < 0.65
    for mask in changed[erased]:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = np.zeros_like(mask)
        box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
        # Noise equal to the image (0, 0, 0) in all channels has chance 2**-24 per pixel.
        np.testing.assert_array_equal(mask, box)
        slack = ((len(rows) + len(cols)) / 2 + 0.25) / (height * width)
        assert ERASE_AREA[0] - slack <= mask.mean() <= ERASE_AREA[1] + slack


def test_no_erase_and_no_translate_leave_images():
    images = _images(np.random.default_rng(9))
    tokens = _tokens(np.random.default_rng(9))
    batch = {IMAGE: tf.constant(images), TOKENS_KEY: tf.constant(tokens)}
    out = augment_batch(batch, AugmentConfig(token_dropout=0.5), _seed(9))
    np.testing.assert_array_equal(out[IMAGE].numpy(), images)
    assert (out[TOKENS_KEY].numpy() != tokens).any()


def test_token_dropout_spares_padding_and_ends_at_its_rate():
    rng = np.random.default_rng(10)
    tokens = _tokens(rng, batch=400, length=20, dtype=np.int64)
    out = augment_batch({TOKENS_KEY: tf.constant(tokens)}, AugmentConfig(token_dropout=0.3), _seed(10))[TOKENS_KEY]
    assert out.dtype == tf.int64 and out.shape == tokens.shape
    out = out.numpy()
    assert ((out == tokens) | (out == 0)).all()
    lengths = (tokens != 0).sum(axis=1)
    middle = np.zeros(tokens.shape, bool)
    for row, length in enumerate(lengths):
        middle[row, 1 : length - 1] = True
    np.testing.assert_array_equal(out[~middle], tokens[~middle])
    rate = (out[middle] == 0).mean()
    # About 3,600 middle tokens: the standard error of the rate is under 0.01.
    assert abs(rate - 0.3) < 0.04


def test_same_seed_same_output_other_seed_other_output():
    rng = np.random.default_rng(11)
    batch = {
        IMAGE: tf.constant(_images(rng, batch=16, height=16, width=16)),
        TOKENS_KEY: tf.constant(_tokens(rng, batch=16)),
    }
    first = augment_batch(batch, EVERYTHING, _seed(2**32 - 1, 3))
    again = augment_batch(batch, EVERYTHING, _seed(2**32 - 1, 3))
    other = augment_batch(batch, EVERYTHING, _seed(2**32 - 1, 4))
    for key in (IMAGE, TOKENS_KEY):
        assert first[key].dtype == batch[key].dtype and first[key].shape == batch[key].shape
        np.testing.assert_array_equal(first[key].numpy(), again[key].numpy())
        assert (first[key].numpy() != other[key].numpy()).any()


def test_other_keys_pass_through_and_cached_features_replace_images():
    rng = np.random.default_rng(12)
    batch = {
        TOKENS_KEY: tf.constant(_tokens(rng, batch=4)),
        LABEL: tf.constant([3, 1, 4, 1], tf.int64),
        CAPTION: tf.constant(["a", "b", "c", "d"]),
        IMAGE_ID: tf.constant(["w.jpg", "x.jpg", "y.jpg", "z.jpg"]),
        "image_features": tf.constant(rng.random((4, 5)), tf.float32),
    }
    out = augment_batch(batch, EVERYTHING, _seed(12))
    assert set(out) == set(batch) and IMAGE not in out
    for key in (LABEL, CAPTION, IMAGE_ID, "image_features"):
        assert out[key] is batch[key]


# ---- augment_batches ----


def _epoch(batches: int = 3) -> tf.data.Dataset:
    rng = np.random.default_rng(13)
    return tf.data.Dataset.from_tensor_slices(
        {
            IMAGE: _images(rng, batch=batches * 4, height=12, width=12).reshape(batches, 4, 12, 12, 3),
            TOKENS_KEY: _tokens(rng, batch=batches * 4).reshape(batches, 4, -1),
            LABEL: np.arange(batches * 4).reshape(batches, 4),
        }
    )


def test_a_resumed_stream_augments_each_epoch_as_the_whole_run():
    seeds = [2**32 - 1, 17, 99]
    whole = list(augment_batches(_epoch().repeat(3), EVERYTHING, seeds).as_numpy_iterator())
    resumed = list(augment_batches(_epoch().repeat(2), EVERYTHING, seeds[1:]).as_numpy_iterator())
    assert len(whole) == 9 and len(resumed) == 6
    for index, batch in enumerate(resumed):
        for key in (IMAGE, TOKENS_KEY, LABEL):
            np.testing.assert_array_equal(batch[key], whole[3 + index][key])
    # The same batch in two epochs is augmented differently.
    assert (whole[0][IMAGE] != whole[3][IMAGE]).any()
    np.testing.assert_array_equal(whole[0][LABEL], whole[3][LABEL])


def test_augment_batches_keeps_cardinality_and_skips_a_config_that_does_nothing():
    stream = _epoch().repeat(2)
    assert augment_batches(stream, AugmentConfig(), [1, 2]) is stream
    assert int(augment_batches(stream, EVERYTHING, [1, 2]).cardinality()) == 6
    # Token dropout alone is something to do.
    dropped = augment_batches(stream, AugmentConfig(token_dropout=0.5), [1, 2])
    assert int(dropped.cardinality()) == 6
    first, original = next(iter(dropped)), next(iter(stream))
    assert (first[TOKENS_KEY].numpy() != original[TOKENS_KEY].numpy()).any()
    np.testing.assert_array_equal(first[IMAGE].numpy(), original[IMAGE].numpy())


# ---- guards ----


@pytest.mark.parametrize(
    "captions, named",
    [
        (["a bag on her left shoulder"], True),
        (["a man in black", "Right hand holds a cup"], True),
        (["LEFTHAND pocket"], True),
        (["a left-handed player"], True),
        (["a woman in a red coat", "bright light, leftover cake", "copyright"], False),
        ([], False),
    ],
)
def test_sides_named(captions, named):
    assert sides_named(captions) is named


def test_a_config_refuses_token_dropout_without_token_ids():
    model = ModelConfig(text=TextConfig(tower="bert"))
    TrainConfig(augment=AugmentConfig(token_dropout=0.2))
    TrainConfig(model=model, augment=AugmentConfig(flip=True))
    with pytest.raises(DualEncError, match="--token-dropout") as raised:
        TrainConfig(model=model, augment=AugmentConfig(token_dropout=0.2))
    assert "\n" not in str(raised.value) and "bert" in str(raised.value)


def test_a_run_leaves_flips_off_when_its_training_captions_name_a_side(tmp_path, capsys):
    from dualenc.training.loop import training_augment
    from tests.support.images import write_image
    from tfrecords_tools.writer import ImageEntry, pack

    def packed(name: str, caption: str):
        image = tmp_path / f"{name}.png"
        write_image(image, "png", seed=0)
        pack({"train": [ImageEntry("a.png", str(image), ((caption, 0), ("a man in a coat", 0)))]}, tmp_path / name,
             {"format": "test"}, workers=1)
        return tmp_path / name

    config = TrainConfig(augment=AugmentConfig(flip=True, translate=0.1))
    sided = packed("sided", "a woman with a bag on her left shoulder")
    assert training_augment(config, sided, verbose=1) == AugmentConfig(flip=False, translate=0.1)
    assert "name left or right" in capsys.readouterr().out
    plain = packed("plain", "a woman with a bag")
    assert training_augment(config, plain, verbose=1) == config.augment
    assert capsys.readouterr().out == ""
