"""Projection head and L2 normalisation against float64 NumPy references; config round-trips."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from dualenc.models.heads import L2Normalize, ProjectionHead, build_encoder

_erf = np.vectorize(math.erf)


def _gelu(values: np.ndarray) -> np.ndarray:
    return 0.5 * values * (1.0 + _erf(values / math.sqrt(2.0)))


def _layer_norm(values: np.ndarray, gamma: np.ndarray, beta: np.ndarray, epsilon: float) -> np.ndarray:
    mean = values.mean(axis=-1, keepdims=True)
    variance = values.var(axis=-1, keepdims=True)
    return (values - mean) / np.sqrt(variance + epsilon) * gamma + beta


def _as64(weight: keras.Variable) -> np.ndarray:
    return np.asarray(weight.numpy(), dtype=np.float64)


def _reference_head(head: ProjectionHead, features: np.ndarray) -> np.ndarray:
    """Seed 003's head in float64 with the layer's own weights, dropout off."""
    projected = features.astype(np.float64) @ _as64(head.projection.kernel) + _as64(head.projection.bias)
    for dense, norm in zip(head.block_dense, head.block_norm):
        update = _gelu(projected) @ _as64(dense.kernel) + _as64(dense.bias)
        projected = _layer_norm(projected + update, _as64(norm.gamma), _as64(norm.beta), norm.epsilon)
    return projected


def _randomise_weights(layer: keras.layers.Layer, seed: int) -> None:
    # Fresh LayerNorm weights are 1 and 0; random ones make the reference test sharper.
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))


@pytest.mark.parametrize("num_layers", [0, 1, 2])
def test_projection_head_matches_float64_reference(num_layers):
    head = ProjectionHead(projection_dim=12, num_layers=num_layers, dropout=0.5)
    features = np.random.default_rng(1).normal(size=(5, 20)).astype("float32")
    head.build(features.shape)
    _randomise_weights(head, seed=2)

    projected = head(features, training=False)

    assert projected.shape == (5, 12)
    np.testing.assert_allclose(projected.numpy(), _reference_head(head, features), rtol=1e-4, atol=1e-4)


def test_projection_head_applies_dropout_only_while_training():
    head = ProjectionHead(projection_dim=16, num_layers=1, dropout=0.5)
    features = np.random.default_rng(3).normal(size=(4, 8)).astype("float32")
    inference = head(features, training=False).numpy()
    np.testing.assert_array_equal(head(features).numpy(), inference)
    assert not np.allclose(head(features, training=True).numpy(), inference)


def test_projection_head_config_round_trips():
    head = ProjectionHead(projection_dim=32, num_layers=2, dropout=0.25, name="image_head")
    config = head.get_config()
    assert {key: config[key] for key in ("projection_dim", "num_layers", "dropout")} == {
        "projection_dim": 32,
        "num_layers": 2,
        "dropout": 0.25,
    }
    rebuilt = ProjectionHead.from_config(config)
    assert rebuilt.get_config() == config

    features = np.random.default_rng(4).normal(size=(3, 10)).astype("float32")
    head.build(features.shape)
    rebuilt.build(features.shape)
    rebuilt.set_weights(head.get_weights())
    np.testing.assert_array_equal(rebuilt(features).numpy(), head(features).numpy())


def test_projection_head_rejects_features_of_the_wrong_rank():
    head = ProjectionHead(projection_dim=8)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        head(np.zeros((2, 3, 4), dtype="float32"))


def test_projection_head_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dropout=1.5"):
        ProjectionHead(projection_dim=8, dropout=1.5)


def test_l2_normalize_gives_unit_vectors_matching_numpy():
    vectors = np.random.default_rng(5).normal(scale=3.0, size=(6, 7)).astype("float32")
    normalised = L2Normalize()(vectors).numpy()
    reference = vectors.astype(np.float64) / np.linalg.norm(vectors.astype(np.float64), axis=-1, keepdims=True)
    np.testing.assert_allclose(normalised, reference, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=-1), 1.0, rtol=1e-6)


def test_l2_normalize_keeps_zero_vectors_finite_and_other_axes():
    normalised = L2Normalize(axis=0)(np.array([[0.0, 3.0], [0.0, 4.0]], dtype="float32")).numpy()
    np.testing.assert_allclose(normalised, [[0.0, 0.6], [0.0, 0.8]], rtol=1e-6)


def test_l2_normalize_config_round_trips_and_computes_in_float32():
    layer = L2Normalize(axis=1, epsilon=1e-6)
    rebuilt = L2Normalize.from_config(layer.get_config())
    assert rebuilt.get_config() == layer.get_config()
    assert (rebuilt.axis, rebuilt.epsilon) == (1, 1e-6)
    assert rebuilt(tf.ones([2, 3], dtype=tf.float16)).dtype == tf.float32


def test_build_encoder_maps_raw_input_to_unit_embeddings():
    tower_input = keras.Input(shape=(5,), name="features")
    tower = keras.Model(tower_input, keras.layers.Dense(9)(tower_input), name="toy_tower")
    encoder = build_encoder(tower, ProjectionHead(projection_dim=4))
    embeddings = encoder(np.random.default_rng(6).normal(size=(3, 5)).astype("float32")).numpy()
    assert embeddings.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-6)
    assert len(encoder.trainable_weights) == len(tower.trainable_weights) + 6
