"""DualEncoder: shapes, train/test steps, feature cache, temperature and its bound, CMPC weights, errors.

Stand-in towers (`tests.support.stand_ins`: a Dense vision tower on 8x8 float images, a hashed
bag-of-words text tower) keep these tests independent of `dualenc.models.towers`.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from dualenc.core.config import ModelConfig
from dualenc.core.errors import DualEncError
from dualenc.models.model import MODEL_FORMAT_VERSION, DualEncoder, build_dual_encoder, in_batch_recall_at_1
from dualenc.models.preprocessing import build_text_preprocessor
from tests.support.stand_ins import IMAGE_SIZE, NUM_CLASSES, factory_config, matching_batch, stand_in_towers


def make_model(seed: int = 0, **overrides) -> DualEncoder:
    config = dataclasses.replace(ModelConfig(projection_dim=8, projection_layers=1, dropout=0.0), **overrides)
    vision_tower, text_tower = stand_in_towers(seed)
    model = DualEncoder(config, vision_tower, text_tower)
    model(matching_batch(np.arange(4)))
    return model


def dataset(batches: int, seed: int = 0) -> tf.data.Dataset:
    """`batches` batches, each holding every class once in a shuffled order."""
    rng = np.random.default_rng(seed)
    parts = [matching_batch(rng.permutation(NUM_CLASSES), seed=seed + b) for b in range(batches)]
    width = max(part["tokens"].shape[1] for part in parts)
    for part in parts:
        part["tokens"] = tf.pad(part["tokens"], [[0, 0], [0, width - part["tokens"].shape[1]]])
    merged = {key: tf.concat([part[key] for part in parts], axis=0) for key in parts[0]}
    return tf.data.Dataset.from_tensor_slices(merged).batch(NUM_CLASSES)


def test_forward_gives_unit_float32_embeddings_and_encoders_agree():
    model = make_model()
    batch = matching_batch(np.arange(5))
    caption_embeddings, image_embeddings = model(batch, training=False)
    for embeddings in (caption_embeddings, image_embeddings):
        assert embeddings.shape == (5, 8) and embeddings.dtype == tf.float32
        np.testing.assert_allclose(np.linalg.norm(embeddings.numpy(), axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model.encode_images(batch["image"]).numpy(), image_embeddings.numpy(), rtol=1e-6)
    np.testing.assert_allclose(model.encode_texts(batch["tokens"]).numpy(), caption_embeddings.numpy(), rtol=1e-6)


def test_in_batch_recall_matches_numpy_with_repeated_labels():
    rng = np.random.default_rng(0)
    queries, gallery = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))
    labels = rng.integers(0, 4, size=12)
    best = np.argmax(queries @ gallery.T, axis=1)
    expected = 100.0 * np.mean(labels[best] == labels)
    recall = in_batch_recall_at_1(tf.constant(queries), tf.constant(gallery), tf.constant(labels), tf.constant(labels))
    assert recall.numpy() == pytest.approx(expected)
    assert 0 < expected < 100  # a mix of hits and misses, so the check means something


def test_training_lowers_loss_and_recall_beats_chance():
    model = make_model(loss="clip", temperature=0.1)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    train = dataset(8).repeat()
    before = model.evaluate(dataset(2, seed=99), return_dict=True, verbose=0)
    history = model.fit(train, epochs=4, steps_per_epoch=25, verbose=0, shuffle=False)
    after = model.evaluate(dataset(2, seed=99), return_dict=True, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert after["loss"] < 0.5 * before["loss"]
    # 16 classes once per batch: chance is 1/16 = 6.25 %.
    assert after["r1_t2i"] >= 80 and after["r1_i2t"] >= 80
    assert set(after) == {"loss", "r1_t2i", "r1_i2t"}


def test_metrics_reset_between_evaluations():
    model = make_model()
    model.compile(optimizer="sgd")
    first = model.evaluate(dataset(1), return_dict=True, verbose=0)
    second = model.evaluate(dataset(1, seed=5), return_dict=True, verbose=0)
    third = model.evaluate(dataset(1), return_dict=True, verbose=0)
    assert first == pytest.approx(third) and first["loss"] != pytest.approx(second["loss"])


def test_cached_features_give_the_same_loss_as_raw_inputs():
    model = make_model(loss="soft_target")
    model.compile(optimizer="sgd")
    batch = matching_batch(np.arange(NUM_CLASSES))
    cached = {
        "image_features": model.vision_tower(batch["image"]),
        "caption_features": model.text_tower(batch["tokens"]),
        "label": batch["label"],
    }
    raw_logs = model.evaluate(tf.data.Dataset.from_tensors(batch), return_dict=True, verbose=0)
    cached_logs = model.evaluate(tf.data.Dataset.from_tensors(cached), return_dict=True, verbose=0)
    assert cached_logs == pytest.approx(raw_logs, rel=1e-6)
    np.testing.assert_allclose(model.encode_images(cached["image_features"]), model.encode_images(batch["image"]), rtol=1e-6)
    np.testing.assert_allclose(model.encode_texts(cached["caption_features"]), model.encode_texts(batch["tokens"]), rtol=1e-6)


def test_training_on_cached_features_leaves_skipped_towers_alone():
    model = make_model()
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    batch = matching_batch(np.arange(NUM_CLASSES))
    cached = {"image_features": model.vision_tower(batch["image"]), "tokens": batch["tokens"]}
    vision_before = [weight.numpy() for weight in model.vision_tower.weights]
    head_before = model.image_head.weights[0].numpy()
    model.fit(tf.data.Dataset.from_tensors(cached), epochs=2, verbose=0, shuffle=False)
    for before, after in zip(vision_before, model.vision_tower.weights):
        np.testing.assert_array_equal(before, after.numpy())
    assert not np.allclose(head_before, model.image_head.weights[0].numpy())


def test_learned_temperature_moves_and_stays_positive():
    fixed = make_model(temperature=0.07)
    assert fixed.log_temperature is None and fixed.temperature.numpy() == pytest.approx(0.07)
    model = make_model(loss="clip", temperature=0.07, learn_temperature=True)
    assert any(weight is model.log_temperature for weight in model.trainable_weights)
    assert model.temperature.numpy() == pytest.approx(0.07, rel=1e-6)
    model.compile(optimizer=keras.optimizers.AdamW(0.5, weight_decay=0.1))
    model.fit(dataset(2), epochs=5, verbose=0, shuffle=False)
    temperature = model.temperature.numpy()
    assert temperature > 0 and abs(temperature - 0.07) > 1e-3


def test_class_weights_exist_only_for_cmpc_losses():
    assert make_model(loss="clip").class_weights is None
    assert make_model(loss="cmpm").class_weights is None
    model = make_model(loss="cmpm+cmpc", num_classes=NUM_CLASSES)
    weights = model.class_weights.numpy()
    assert weights.shape == (8, NUM_CLASSES) and model.class_weights.trainable
    glorot_limit = np.sqrt(6 / (8 + NUM_CLASSES))
    assert np.abs(weights).max() <= glorot_limit and np.abs(weights).max() > 0.5 * glorot_limit
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    model.fit(dataset(1), epochs=1, verbose=0, shuffle=False)
    assert not np.allclose(weights, model.class_weights.numpy())


def test_learned_temperature_stops_at_clips_bound_and_can_move_back():
    model = make_model(loss="clip", temperature=0.0105, learn_temperature=True)
    model.compile(optimizer=keras.optimizers.SGD(1.0))
    # One step of -1 in log T would give 0.0105 / e = 0.0039; the optimiser applies the bound after it.
    model.optimizer.apply_gradients([(tf.constant(1.0), model.log_temperature)])
    assert model.temperature.numpy() == pytest.approx(1 / 100, rel=1e-6)
    # At the bound the gradient still reaches it (CLIP clamps the weight, not its use).
    with tf.GradientTape() as tape:
        temperature = model.temperature
    assert tape.gradient(temperature, model.log_temperature).numpy() == pytest.approx(1 / 100, rel=1e-6)


def test_a_fixed_temperature_below_the_bound_is_a_one_line_error():
    with pytest.raises(DualEncError, match="temperature 0.005 is below 0.01") as error:
        make_model(temperature=0.005)
    assert "\n" not in str(error.value)


def test_mixed_precision_keeps_embeddings_and_loss_in_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = make_model()
        assert model.image_head.compute_dtype == "float16"
        caption_embeddings, image_embeddings = model(matching_batch(np.arange(4)))
        model.compile(optimizer="sgd")
        logs = model.fit(dataset(1), epochs=1, verbose=0, shuffle=False).history
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert caption_embeddings.dtype == tf.float32 and image_embeddings.dtype == tf.float32
    assert np.isfinite(logs["loss"][0])


@pytest.mark.parametrize(
    "inputs, words",
    [
        ({"image": tf.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3))}, ["'tokens'", "'caption_features'"]),
        ({"tokens": tf.ones((2, 3), tf.int32)}, ["'image'", "'image_features'"]),
        (tf.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3)), ["dict"]),
    ],
)
def test_bad_inputs_raise_one_line_errors(inputs, words):
    model = make_model()
    with pytest.raises(DualEncError) as info:
        model(inputs)
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words)


def test_fit_on_a_batch_without_captions_raises_the_one_line_error():
    batch = matching_batch(np.arange(4))
    del batch["tokens"]
    model = make_model()
    model.compile(optimizer="sgd")
    with pytest.raises(DualEncError) as info:
        model.fit(tf.data.Dataset.from_tensors(batch), verbose=0, shuffle=False)
    assert "'tokens'" in str(info.value) and "\n" not in str(info.value)


def test_label_free_batches_fail_only_for_identity_losses():
    batch = matching_batch(np.arange(4))
    del batch["label"]
    model = make_model(loss="cmpm")
    model.compile(optimizer="sgd")
    with pytest.raises(DualEncError, match="'label'"):
        model.evaluate(tf.data.Dataset.from_tensors(batch), verbose=0)
    model = make_model(loss="clip")
    model.compile(optimizer="sgd")
    assert np.isfinite(model.evaluate(tf.data.Dataset.from_tensors(batch), return_dict=True, verbose=0)["loss"])


def test_encoders_reject_wrong_shapes():
    model = make_model()
    with pytest.raises(DualEncError, match="encode_images"):
        model.encode_images(tf.zeros((2,)))
    with pytest.raises(DualEncError, match="encode_texts"):
        model.encode_texts(tf.constant(["a strings batch is not preprocessed"]))


def test_factory_builds_both_towers_and_every_variable(tmp_path):
    model = build_dual_encoder(factory_config(tmp_path))
    assert model.built and model.vision_tower.built and model.text_tower.built
    images = tf.random.uniform((3, 32, 32, 3), maxval=255, dtype=tf.int32)
    tokens = build_text_preprocessor(model.config.text)(tf.constant(["a", "b c", ""]))
    caption_embeddings, image_embeddings = model({"image": tf.cast(images, tf.uint8), "tokens": tokens})
    assert caption_embeddings.shape == (3, 8) and image_embeddings.shape == (3, 8)


def test_factory_rejects_an_unpooled_tower(tmp_path, monkeypatch):
    import dualenc.models.towers

    def unpooled_tower(config, projection="heads"):
        images = keras.Input((*config.image_size, 3))
        return keras.Model(images, keras.layers.Conv2D(4, 3)(images))

    monkeypatch.setattr(dualenc.models.towers, "build_vision_tower", unpooled_tower)
    with pytest.raises(DualEncError, match=r"vision tower returns shape \[2, 30, 30, 4\].*\(B, F\)"):
        build_dual_encoder(factory_config(tmp_path))


def test_weights_round_trip_through_a_weights_file(tmp_path):
    model = make_model(seed=1, loss="cmpc", num_classes=4, learn_temperature=True)
    model.save_weights(tmp_path / "dual_encoder.weights.h5")
    restored = make_model(seed=2, loss="cmpc", num_classes=4, learn_temperature=True)
    restored.load_weights(tmp_path / "dual_encoder.weights.h5")
    batch = matching_batch(np.arange(4))
    for saved, loaded in zip(model(batch), restored(batch)):
        np.testing.assert_array_equal(saved.numpy(), loaded.numpy())
    np.testing.assert_array_equal(model.class_weights.numpy(), restored.class_weights.numpy())


def test_saves_and_loads_as_a_keras_file(tmp_path):
    model = build_dual_encoder(dataclasses.replace(factory_config(tmp_path), loss="cmpc", num_classes=3, learn_temperature=True))
    model.compile(optimizer="adamw")
    path = tmp_path / "dual_encoder.keras"
    model.save(path)
    restored = keras.saving.load_model(path, compile=False)
    assert isinstance(restored, DualEncoder) and restored.config == model.config
    pixels = tf.cast(tf.random.uniform((3, 32, 32, 3), maxval=255, dtype=tf.int32), tf.uint8)
    tokens = build_text_preprocessor(model.config.text)(tf.constant(["a red coat", "a dog", ""]))
    for saved, loaded in zip(model({"image": pixels, "tokens": tokens}), restored({"image": pixels, "tokens": tokens})):
        np.testing.assert_allclose(saved.numpy(), loaded.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(model.class_weights.numpy(), restored.class_weights.numpy())
    assert restored.temperature.numpy() == pytest.approx(model.temperature.numpy())


def test_a_keras_file_of_another_format_is_refused_in_one_line(tmp_path):
    config = DualEncoder.from_config  # the check sits in from_config, which load_model calls
    serialised = build_dual_encoder(factory_config(tmp_path)).get_config()
    with pytest.raises(DualEncError) as info:
        config({**serialised, "format_version": MODEL_FORMAT_VERSION + 1})
    message = str(info.value)
    assert "\n" not in message and f"format {MODEL_FORMAT_VERSION + 1}" in message and f"format {MODEL_FORMAT_VERSION}" in message
