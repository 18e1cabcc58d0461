"""Vision towers: shapes, in-model preprocessing, freezing, local weights, offline ImageNet."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dualenc.core.config import VisionConfig
from dualenc.core.errors import DualEncError
from dualenc.models.towers import build_vision_tower
from dualenc.models.towers.vision import BACKBONE_LAYER_NAME, SMALL_CNN_FILTERS

SMALL_SIZE = (64, 32)


def _images(batch: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, *size, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("backbone", "size", "features"),
    [("small_cnn", SMALL_SIZE, SMALL_CNN_FILTERS[-1] * SMALL_SIZE[0] // 16), ("mobilenet_v2", (64, 64), 1280)],
)
def test_tower_maps_uint8_and_float_pixels_to_the_same_features(backbone, size, features):
    tower = build_vision_tower(VisionConfig(backbone=backbone, image_size=size))
    images = _images(3, size)

    from_uint8 = tower(tf.constant(images), training=False)
    from_float = tower(images.astype(np.float32), training=False)

    assert from_uint8.shape == (3, features)
    assert from_uint8.dtype == tf.float32
    np.testing.assert_array_equal(from_uint8.numpy(), from_float.numpy())
    assert np.all(np.isfinite(from_uint8.numpy()))


def test_small_cnn_is_small():
    tower = build_vision_tower(VisionConfig(backbone="small_cnn"))
    assert tower.input_shape == (None, 128, 64, 3)
    assert 50_000 < tower.count_params() < 1_000_000


def test_small_cnn_rescales_pixels_inside_the_model():
    tower = build_vision_tower(VisionConfig(backbone="small_cnn", image_size=SMALL_SIZE))
    rescaled = tower.get_layer("preprocessing")(tf.constant(_images(1, SMALL_SIZE)))
    assert float(tf.reduce_min(rescaled)) >= 0.0 and float(tf.reduce_max(rescaled)) <= 1.0


def _batchnorm_moving_means(tower: keras.Model) -> list[np.ndarray]:
    backbone = tower.get_layer(BACKBONE_LAYER_NAME)
    return [
        layer.moving_mean.numpy().copy()
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


@pytest.mark.parametrize("trainable", [False, True])
def test_frozen_backbone_keeps_batchnorm_statistics(trainable):
    tower = build_vision_tower(VisionConfig(backbone="small_cnn", image_size=SMALL_SIZE, trainable=trainable))
    before = _batchnorm_moving_means(tower)

    tower(_images(4, SMALL_SIZE), training=True)

    changed = [not np.array_equal(old, new) for old, new in zip(before, _batchnorm_moving_means(tower))]
    assert len(changed) == 4
    if trainable:
        assert all(changed)
        assert len(tower.trainable_weights) > 0
    else:
        assert not any(changed)
        assert tower.trainable_weights == []


def test_frozen_tower_output_ignores_training_flag():
    tower = build_vision_tower(VisionConfig(backbone="small_cnn", image_size=SMALL_SIZE, trainable=False))
    images = _images(4, SMALL_SIZE)
    np.testing.assert_allclose(tower(images, training=True).numpy(), tower(images, training=False).numpy())


def test_local_weights_file_round_trip(tmp_path):
    config = VisionConfig(backbone="mobilenet_v2", image_size=(64, 64))
    original = build_vision_tower(config)
    weights_path = tmp_path / "backbone.weights.h5"
    original.get_layer(BACKBONE_LAYER_NAME).save_weights(weights_path)

    reloaded = build_vision_tower(VisionConfig(backbone="mobilenet_v2", image_size=(64, 64), weights=str(weights_path)))
    fresh = build_vision_tower(config)

    images = _images(2, (64, 64))
    expected = original(images, training=False).numpy()
    np.testing.assert_array_equal(reloaded(images, training=False).numpy(), expected)
    # A randomly initialised MobileNetV2 gives tiny features (~1e-12): compare relatively.
    assert not np.allclose(fresh(images, training=False).numpy(), expected, rtol=1e-3, atol=0)


def test_missing_weights_file_is_a_user_error(tmp_path):
    missing = tmp_path / "nowhere.h5"
    with pytest.raises(DualEncError, match="does not exist"):
        build_vision_tower(VisionConfig(backbone="small_cnn", image_size=SMALL_SIZE, weights=str(missing)))


def test_incompatible_weights_file_is_a_user_error(tmp_path):
    small = build_vision_tower(VisionConfig(backbone="small_cnn", image_size=SMALL_SIZE))
    weights_path = tmp_path / "small.weights.h5"
    small.get_layer(BACKBONE_LAYER_NAME).save_weights(weights_path)
    with pytest.raises(DualEncError, match="cannot load vision weights") as error:
        build_vision_tower(VisionConfig(backbone="mobilenet_v2", image_size=(64, 64), weights=str(weights_path)))
    assert "\n" not in str(error.value)


def test_imagenet_download_failure_says_how_to_use_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- [Errno -2] unreachable")

    # keras.applications fetches weights through this function; the network is never touched.
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    with pytest.raises(DualEncError) as error:
        build_vision_tower(VisionConfig(backbone="mobilenet_v2", image_size=(96, 96), weights="imagenet"))
    message = str(error.value)
    assert "\n" not in message
    assert "--vision-weights" in message and "~/.keras/models" in message and "URL fetch failure" in message


def test_backbone_rejecting_the_image_size_is_a_user_error():
    with pytest.raises(DualEncError, match="'xception' for image_size \\(64, 64\\)"):
        build_vision_tower(VisionConfig(backbone="xception", image_size=(64, 64)))


def test_small_cnn_has_no_imagenet_weights():
    with pytest.raises(DualEncError, match="small_cnn"):
        build_vision_tower(VisionConfig(backbone="small_cnn", weights="imagenet"))


def test_unknown_backbone_lists_the_valid_ones():
    config = VisionConfig(backbone="small_cnn")
    object.__setattr__(config, "backbone", "vgg99")  # bypass the config's own check
    with pytest.raises(DualEncError, match="vgg99.*mobilenet_v2"):
        build_vision_tower(config)
