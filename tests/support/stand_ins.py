"""Stand-in towers and batches for DualEncoder tests, independent of `dualenc.towers`.

A Dense vision tower on 8x8 float images and a hashed bag-of-words text tower; batches whose
images and captions both encode a class; and a tiny config for the real tower factory.
Used by the model and placement tests.
"""

import keras
import numpy as np
import tensorflow as tf

from dualenc.config import ModelConfig, TextConfig, VisionConfig

IMAGE_SIZE = 8
NUM_CLASSES = 16
TEXT_BUCKETS = 256


class HashedTextTower(keras.Model):
    """Captions [B] -> mean of hashed word embeddings [B, width]."""

    def __init__(self, width: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.Embedding(TEXT_BUCKETS, width)

    def call(self, captions):
        words = tf.strings.split(captions).to_tensor(default_value="")
        present = tf.cast(tf.not_equal(words, ""), self.compute_dtype)[..., None]
        word_embeddings = self.embedding(tf.strings.to_hash_bucket_fast(words, TEXT_BUCKETS))
        return tf.reduce_sum(word_embeddings * present, axis=1) / tf.maximum(tf.reduce_sum(present, axis=1), 1)


def stand_in_towers(seed: int = 0) -> tuple[keras.Model, keras.Model]:
    """(vision tower: float images [B, 8, 8, 3] -> [B, 24], text tower: strings [B] -> [B, 16])."""
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
        "caption": tf.constant(captions),
        "label": tf.constant(labels, tf.int64),
    }


def factory_config(tmp_path) -> ModelConfig:
    from dualenc.vocabulary import learn_wordpiece_vocabulary

    captions = ["a man in a red coat", "a woman with a blue bag", "a dog on the grass"] * 4
    vocabulary = learn_wordpiece_vocabulary(captions, 60, tmp_path / "vocab.txt")
    return ModelConfig(
        vision=VisionConfig("small_cnn", image_size=(32, 32)),
        text=TextConfig(tower="bilstm", vocabulary=str(vocabulary), max_tokens=8, embedding_dim=8, lstm_units=4),
        projection_dim=8,
    )
