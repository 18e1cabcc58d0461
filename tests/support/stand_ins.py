"""Stand-in towers and batches for DualEncoder tests, independent of `dualenc.models.towers`.

A Dense vision tower on 8x8 float images and a hashed bag-of-words text tower; batches whose
images and captions both encode a class; and a tiny config for the real tower factory.
Used by the model and placement tests.
"""

import keras
import numpy as np
import tensorflow as tf

from dualenc.core.config import ModelConfig, TextConfig, VisionConfig

IMAGE_SIZE = 8
NUM_CLASSES = 16
TEXT_BUCKETS = 256


def hashed_tokens(captions) -> tf.Tensor:
    """The stand-in text preprocessor: captions [B] -> hashed word ids int32 [B, words], 0-padded."""
    words = tf.strings.split(tf.constant(captions)).to_tensor(default_value="")
    ids = tf.strings.to_hash_bucket_fast(words, TEXT_BUCKETS - 1) + 1
    return tf.cast(tf.where(tf.equal(words, ""), tf.zeros_like(ids), ids), tf.int32)


class HashedTextTower(keras.Model):
    """Hashed word ids [B, W] (0 = padding) -> mean of their embeddings [B, width]."""

    def __init__(self, width: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.Embedding(TEXT_BUCKETS, width)

    def call(self, token_ids):
        present = tf.cast(tf.not_equal(token_ids, 0), self.compute_dtype)[..., None]
        word_embeddings = self.embedding(token_ids)
        return tf.reduce_sum(word_embeddings * present, axis=1) / tf.maximum(tf.reduce_sum(present, axis=1), 1)


def stand_in_towers(seed: int = 0) -> tuple[keras.Model, keras.Model]:
    """(vision tower: float images [B, 8, 8, 3] -> [B, 24], text tower: word ids [B, W] -> [B, 16])."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    features = keras.layers.Dense(24)(keras.layers.Flatten()(images))
    return keras.Model(images, features, name="vision_stand_in"), HashedTextTower(name="text_stand_in")


def matching_batch(labels: np.ndarray, seed: int = 0) -> dict[str, tf.Tensor]:
    """Images of class c are a fixed random pattern plus noise; captions name c in varying words."""
    prototypes = np.random.default_rng(1234).normal(size=(NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE, 3))
    noise = np.random.default_rng(seed).normal(scale=0.3, size=(len(labels), IMAGE_SIZE, IMAGE_SIZE, 3))
    templates = ["item {} here", "a photo of item {}", "look item {}"]
    captions = [templates[(seed + i) % 3].format(f"c{label}") for i, label in enumerate(labels)]
    return {
        "image": tf.constant(prototypes[labels] + noise, tf.float32),
        "tokens": hashed_tokens(captions),
        "label": tf.constant(labels, tf.int64),
    }


def factory_config(tmp_path) -> ModelConfig:
    from dualenc.models.vocabulary import learn_wordpiece_vocabulary

    captions = ["a man in a red coat", "a woman with a blue bag", "a dog on the grass"] * 4
    vocabulary = learn_wordpiece_vocabulary(captions, 60, tmp_path / "vocab.txt")
    return ModelConfig(
        vision=VisionConfig("small_cnn", image_size=(32, 32)),
        text=TextConfig(tower="bilstm", vocabulary=str(vocabulary), max_tokens=8, embedding_dim=8, lstm_units=4),
        projection_dim=8,
    )
