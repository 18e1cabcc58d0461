"""Text towers and their preprocessors: the TF-Hub BERT pair on the tiny fixture, hub handles, the WordPiece BiLSTM."""

import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from dualenc.models import hub
from dualenc.core.config import TextConfig
from dualenc.core.errors import DualEncError
from dualenc.models.preprocessing import build_text_preprocessor
from dualenc.models.towers import build_text_tower
from dualenc.models.vocabulary import RESERVED_TOKENS, learn_wordpiece_vocabulary, read_vocabulary
from tests.support.tiny_bert import HIDDEN_SIZE, SEQ_LENGTH

CAPTIONS = [
    "A man in a red shirt is walking a dog.",
    "The woman wears blue jeans and a black jacket.",
    "A young girl carrying a pink backpack.",
    "Two dogs are running on the green grass.",
    "A man riding a bike down the street.",
    "The woman is holding an umbrella in the rain.",
] * 6


@pytest.fixture(scope="module")
def frozen_bert_tower(tiny_bert):
    config = _bert_config(tiny_bert, trainable=False)
    return build_text_preprocessor(config), build_text_tower(config)


@pytest.fixture(scope="module")
def vocabulary_file(tmp_path_factory):
    return learn_wordpiece_vocabulary(CAPTIONS, 120, tmp_path_factory.mktemp("vocab") / "vocab.txt")


def _bert_config(tiny_bert, trainable: bool) -> TextConfig:
    preprocessor, encoder = tiny_bert
    return TextConfig(tower="bert", preprocessor=str(preprocessor), encoder=str(encoder), trainable=trainable)


def _train_steps(model: keras.Model, tokens, steps: int = 3) -> None:
    """A few Adam steps pulling every feature towards 1 (a dummy loss with nonzero gradients)."""
    optimizer = keras.optimizers.Adam(learning_rate=0.05)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(tokens, training=True) - 1.0))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))


def test_fixture_preprocessor_packs_like_tf_hub(tiny_bert):
    preprocessor = tf.saved_model.load(str(tiny_bert[0]))
    packed = preprocessor(tf.constant(["A MAN walking", "", "man " * 40]))
    assert set(packed) == {"input_word_ids", "input_mask", "input_type_ids"}
    word_ids = packed["input_word_ids"].numpy()
    mask = packed["input_mask"].numpy()
    assert word_ids.shape == (3, SEQ_LENGTH) and word_ids.dtype == np.int32
    cls_id, sep_id = 2, 3
    assert word_ids[0, 0] == cls_id and word_ids[0, 4] == sep_id and mask[0].sum() == 5
    assert word_ids[1, :2].tolist() == [cls_id, sep_id] and mask[1].sum() == 2
    assert mask[2].sum() == SEQ_LENGTH and word_ids[2, -1] == sep_id
    assert np.all(packed["input_type_ids"].numpy() == 0)


def test_bert_tower_maps_strings_to_pooled_features(frozen_bert_tower):
    preprocessor, tower = frozen_bert_tower
    features = tower(preprocessor(tf.constant(["a man walking a dog", "", "A Man Walking A Dog"])))
    assert features.shape == (3, HIDDEN_SIZE) and features.dtype == tf.float32
    np.testing.assert_allclose(features[0].numpy(), features[2].numpy())  # lower-cased
    assert not np.allclose(features[0].numpy(), features[1].numpy())


def test_fine_tuned_bert_updates_the_encoder_variables(tiny_bert):
    config = _bert_config(tiny_bert, trainable=True)
    tower = build_text_tower(config)
    encoder = tower.get_layer("bert_encoder")
    # The Keras weights wrap the SavedModel's own variables, so reading them reads the encoder.
    assert len(tower.trainable_weights) == len(encoder.trainable_weights) == 6
    tokens = build_text_preprocessor(config)(tf.constant(["a man walking a dog", "a red car"]))
    before = [weight.numpy().copy() for weight in encoder.weights]
    features_before = tower(tokens).numpy()

    _train_steps(tower, tokens)

    assert all(not np.array_equal(old, weight.numpy()) for old, weight in zip(before, encoder.weights))
    assert not np.allclose(tower(tokens).numpy(), features_before)


def test_frozen_bert_exposes_no_trainable_weights_and_stays_put(frozen_bert_tower):
    preprocessor, tower = frozen_bert_tower
    assert tower.trainable_weights == []
    tokens = preprocessor(tf.constant(["a man walking a dog", "a red car"]))
    features_before = tower(tokens).numpy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tower(tokens, training=True))
    assert tape.gradient(loss, tower.trainable_variables) == []
    np.testing.assert_array_equal(tower(tokens, training=True).numpy(), features_before)


def test_unreachable_hub_url_fails_fast_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(DualEncError) as error:
        hub.resolve_handle("https://tfhub.dev/nonexistent/model/1")
    assert time.monotonic() - started < hub.NETWORK_TIMEOUT_SECONDS + 5
    message = str(error.value)
    assert "\n" not in message
    assert "https://tfhub.dev/nonexistent/model/1" in message and "TFHUB_CACHE_DIR" in message


def test_local_handles_are_used_as_is_or_rejected(tiny_bert, tmp_path):
    assert hub.resolve_handle(str(tiny_bert[1])) == str(tiny_bert[1])
    with pytest.raises(DualEncError, match="no such local directory"):
        hub.resolve_handle(str(tmp_path / "missing"))
    with pytest.raises(DualEncError, match="no saved_model.pb"):
        hub.resolve_handle(str(tmp_path))


def test_learned_vocabulary_holds_reserved_tokens_and_frequent_words(vocabulary_file):
    tokens = read_vocabulary(vocabulary_file)
    assert tuple(tokens[: len(RESERVED_TOKENS)]) == RESERVED_TOKENS
    assert len(tokens) <= 120
    for word in ("man", "woman", "the", "a", "is"):
        assert word in tokens
    assert "Man" not in tokens and "." in tokens
    assert not list(vocabulary_file.parent.glob(".*.tmp"))


def test_vocabulary_needs_captions(tmp_path):
    with pytest.raises(DualEncError, match="no non-empty captions"):
        learn_wordpiece_vocabulary(["", "  "], 100, tmp_path / "vocab.txt")


def _bilstm_config(vocabulary_file, **overrides) -> TextConfig:
    values = dict(tower="bilstm", vocabulary=str(vocabulary_file), max_tokens=8, embedding_dim=16, lstm_units=8)
    return TextConfig(**{**values, **overrides})


def test_bilstm_tower_maps_strings_to_features(vocabulary_file):
    config = _bilstm_config(vocabulary_file)
    tower = build_text_tower(config)
    features = tower(build_text_preprocessor(config)(tf.constant(["a man walking a dog", "", "zzz qqq unknown words"])))
    assert features.shape == (3, 16) and features.dtype == tf.float32
    assert np.all(np.isfinite(features.numpy()))


def test_bilstm_tokens_are_lower_cased_wrapped_and_truncated(vocabulary_file):
    tokens = read_vocabulary(vocabulary_file)
    config = _bilstm_config(vocabulary_file, max_tokens=6)
    tower, tokenizer = build_text_tower(config), build_text_preprocessor(config)
    token_ids = tokenizer(tf.constant(["", "A MAN", "a man is in the rain"])).numpy()
    ids = {token: index for index, token in enumerate(tokens)}
    start, end = ids["[START]"], ids["[END]"]
    assert token_ids.tolist() == [
        [start, end, 0, 0, 0, 0],
        [start, ids["a"], ids["man"], end, 0, 0],
        [start, ids["a"], ids["man"], ids["is"], ids["in"], end],
    ]
    # Words past max_tokens do not reach the features.
    long_and_short = tower(tokenizer(tf.constant(["a man is in the rain", "a man is in"]))).numpy()
    np.testing.assert_allclose(long_and_short[0], long_and_short[1], rtol=1e-6)


def test_bilstm_tower_trains(vocabulary_file):
    config = _bilstm_config(vocabulary_file)
    tower = build_text_tower(config)
    before = [weight.numpy().copy() for weight in tower.trainable_weights]
    _train_steps(tower, build_text_preprocessor(config)(tf.constant(CAPTIONS[:4])))
    assert all(not np.array_equal(old, weight.numpy()) for old, weight in zip(before, tower.trainable_weights))


def test_bilstm_needs_an_existing_vocabulary_that_fits(tmp_path, vocabulary_file):
    with pytest.raises(DualEncError, match="does not exist"):
        build_text_preprocessor(_bilstm_config(tmp_path / "missing.txt"))
    with pytest.raises(DualEncError, match="needs a vocabulary"):
        build_text_preprocessor(TextConfig(tower="bilstm"))
    with pytest.raises(DualEncError, match="raise vocab_size"):
        build_text_preprocessor(_bilstm_config(vocabulary_file, vocab_size=10))
