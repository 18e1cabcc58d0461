"""Export round trip: tiny Keras towers → SavedModels → a fresh process with no dualenc import.

The tiny "colour" towers used here, and by the index and CLI tests, are in `tests.support.colour_run`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from dualenc.export.encoders import export_encoders, export_text_encoder, export_vision_encoder, load_encoder
from dualenc.core.errors import DualEncError
from tests.support.colour_run import COLOURS, IMAGE_SIZE, encode_png, solid_image


def small_conv_encoder() -> keras.Model:
    pixels = keras.Input(shape=(*IMAGE_SIZE, 3), dtype="uint8")
    features = keras.layers.Rescaling(1.0 / 255.0)(pixels)
    features = keras.layers.Conv2D(4, 3, activation="relu")(features)
    features = keras.layers.BatchNormalization()(features)
    features = keras.layers.GlobalAveragePooling2D()(features)
    return keras.Model(pixels, keras.layers.Dense(6)(features))


class HashedWordEncoder(keras.layers.Layer):
    """Captions → sum of a random trainable embedding per hashed word (plus a bias row)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.Embedding(50, 6)
        self.bias = self.add_weight(shape=(6,), initializer="random_normal")

    def call(self, captions):
        buckets = tf.strings.to_hash_bucket_fast(tf.strings.split(captions), 50)
        return tf.reduce_sum(tf.ragged.map_flat_values(self.embedding, buckets), axis=1) + self.bias


def hashed_text_encoder() -> keras.layers.Layer:
    encoder = HashedWordEncoder()
    encoder(tf.constant(["build"]))
    return encoder


FRESH_PROCESS = """
import json, sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401
request = json.load(sys.stdin)
assert not [name for name in sys.modules if name.startswith("dualenc")]
with tf.device("/cpu:0"):
    vision = tf.saved_model.load(request["vision"]).signatures["serving_default"]
    text = tf.saved_model.load(request["text"]).signatures["serving_default"]
    images = [bytes.fromhex(blob) for blob in request["images"]]
    out = {
        "vision": vision(images=tf.constant(images, dtype=tf.string, shape=[len(images)]))["embeddings"].numpy().tolist(),
        "text": text(captions=tf.constant(request["captions"], dtype=tf.string))["embeddings"].numpy().tolist(),
    }
print(json.dumps(out))
"""


def run_fresh(vision_dir: Path, text_dir: Path, images: list[bytes], captions: list[str]) -> dict:
    request = {"vision": str(vision_dir), "text": str(text_dir), "images": [blob.hex() for blob in images], "captions": captions}
    completed = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env={"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {name: np.array(values, np.float32) for name, values in json.loads(completed.stdout).items()}


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_round_trip_in_fresh_process_matches_in_memory(tmp_path):
    from dualenc.data.images import decode_image

    # Seeded: an unseeded ReLU encoder sometimes maps an image to an all-zero row, whose unit
    # vector is NaN in the NumPy reference (and 0 in the export), making the test flaky.
    keras.utils.set_random_seed(0)
    vision_model, text_model = small_conv_encoder(), hashed_text_encoder()
    export_encoders(tmp_path, encode_images=vision_model, encode_texts=text_model, image_size=IMAGE_SIZE)

    pixels = [solid_image(rgb, seed) for seed, rgb in enumerate(COLOURS.values())][:3]
    images = [encode_png(pixels[0], "JPEG"), encode_png(pixels[1], "PNG"), encode_png(pixels[2], "BMP")]
    captions = ["a red coat", "", "ünïcödé words"]
    loaded = run_fresh(tmp_path / "vision_encoder", tmp_path / "text_encoder", images, captions)

    decoded = np.stack([decode_image(tf.constant(blob), IMAGE_SIZE).numpy() for blob in images])
    expected_vision = unit(vision_model(decoded).numpy())
    expected_text = unit(text_model(tf.constant(captions)).numpy())
    np.testing.assert_allclose(loaded["vision"], expected_vision, atol=1e-5)
    np.testing.assert_allclose(loaded["text"], expected_text, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(loaded["vision"], axis=1), 1.0, atol=1e-5)


def test_bert_tower_with_its_hub_preprocessor_in_front(tmp_path, tiny_bert):
    """A TF-Hub-style BERT encoder (TFSMLayer) behind its TF-Hub preprocessor, exported captions-in."""
    preprocessor_dir, encoder_dir = tiny_bert

    from dualenc.core.config import TextConfig
    from dualenc.models.preprocessing import build_text_preprocessor
    from dualenc.models.towers.text import build_text_tower

    config = TextConfig(tower="bert", preprocessor=str(preprocessor_dir), encoder=str(encoder_dir))
    bert, projection = build_text_tower(config), keras.layers.Dense(4)
    preprocessor = build_text_preprocessor(config)
    captions = ["a woman in a red coat", "two dogs running on grass"]
    expected = unit(projection(bert(preprocessor(tf.constant(captions)))).numpy())
    export_text_encoder(lambda tokens: projection(bert(tokens)), tmp_path / "text_encoder", preprocessor, track=[bert, projection])
    export_vision_encoder(small_conv_encoder(), IMAGE_SIZE, tmp_path / "vision_encoder")
    loaded = run_fresh(tmp_path / "vision_encoder", tmp_path / "text_encoder", [], captions)
    np.testing.assert_allclose(loaded["text"], expected, atol=1e-5)
    assert loaded["vision"].shape == (0,) or loaded["vision"].shape[0] == 0


TF1_SESSION = """
import json, sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  the text preprocessor's ops
request = json.load(sys.stdin)
assert not [name for name in sys.modules if name.startswith("dualenc")]
tf.compat.v1.disable_eager_execution()
out = {}
for name, feed in (("vision", [bytes.fromhex(blob) for blob in request["images"]]), ("text", request["captions"])):
    # TensorFlow Serving's loader: a TF1 session restoring the variables by name.
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], request[name])
        signature = meta_graph.signature_def["serving_default"]
        (tensor_input,) = signature.inputs.values()
        out[name] = session.run(signature.outputs["embeddings"].name, {tensor_input.name: feed}).tolist()
print(json.dumps(out))
"""


def test_dual_encoder_exports_run_under_the_tf1_session_loader_and_tflite(tmp_path):
    """TensorFlow Serving's TF1 loader and the TFLite interpreter, each against the Keras model."""
    from dualenc.core.config import ModelConfig, TextConfig, VisionConfig
    from dualenc.data.images import decode_image
    from dualenc.models.model import build_dual_encoder
    from dualenc.models.preprocessing import build_text_preprocessor
    from dualenc.models.vocabulary import learn_wordpiece_vocabulary

    vocabulary = learn_wordpiece_vocabulary(["a woman in a red coat", "a man with a blue bag"] * 3, 40, tmp_path / "vocab.txt")
    config = ModelConfig(
        vision=VisionConfig("small_cnn", image_size=IMAGE_SIZE),
        text=TextConfig(tower="bilstm", vocabulary=str(vocabulary), vocab_size=40, max_tokens=8, embedding_dim=8, lstm_units=4),
        projection_dim=8,
    )
    model = build_dual_encoder(config)
    preprocessor = build_text_preprocessor(config.text)
    run_dir = tmp_path / "run"
    export_encoders(
        run_dir,
        encode_images=model.encode_images,
        encode_texts=model.encode_texts,
        image_size=IMAGE_SIZE,
        text_preprocessor=preprocessor,
        track_images=[model.vision_tower, model.image_head],
        track_texts=[model.text_tower, model.caption_head],
    )
    vocabulary.unlink()  # the export carries its own copy of the vocabulary
    pixels = [solid_image(rgb, seed) for seed, rgb in enumerate(COLOURS.values())][:4]
    images = [encode_png(pixels[0], "JPEG"), encode_png(pixels[1], "PNG"), encode_png(pixels[2], "BMP"), encode_png(pixels[3])]
    captions = ["a woman in a red coat", "", "ünïcödé words", "A MAN WITH A BLUE BAG"]
    decoded = np.stack([decode_image(tf.constant(blob), IMAGE_SIZE).numpy() for blob in images])
    expected_vision = model.encode_images(decoded).numpy()
    expected_text = model.encode_texts(preprocessor(tf.constant(captions))).numpy()

    request = {"vision": str(run_dir / "vision_encoder"), "text": str(run_dir / "text_encoder"),
               "images": [blob.hex() for blob in images], "captions": captions}
    completed = subprocess.run(
        [sys.executable, "-c", TF1_SESSION], input=json.dumps(request), capture_output=True, text=True,
        env={"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    loaded = json.loads(completed.stdout)
    np.testing.assert_allclose(loaded["vision"], expected_vision, atol=1e-5)
    np.testing.assert_allclose(loaded["text"], expected_text, atol=1e-5)
    assert len({tuple(np.round(row, 4)) for row in loaded["text"]}) == len(captions)  # not all one row

    interpreter = tf.lite.Interpreter(model_path=str(run_dir / "vision_encoder.tflite"))
    runner = interpreter.get_signature_runner("pixels")
    saved = tf.saved_model.load(str(run_dir / "vision_encoder")).signatures["pixels"]
    from_saved_model = saved(pixels=tf.constant(decoded))["embeddings"].numpy()
    from_tflite = runner(pixels=decoded)["embeddings"]
    assert from_tflite.shape == (4, 8)
    np.testing.assert_allclose(from_tflite, from_saved_model, atol=1e-4)
    np.testing.assert_allclose(from_saved_model, expected_vision, atol=1e-5)


def test_load_encoder_batches_and_reexport_replaces(tmp_path):
    text_model = hashed_text_encoder()
    export_text_encoder(text_model, tmp_path / "text_encoder")
    captions = [f"caption {index}" for index in range(7)]
    encoder = load_encoder(tmp_path / "text_encoder", batch_size=3)
    np.testing.assert_allclose(encoder(captions), unit(text_model(tf.constant(captions)).numpy()), atol=1e-5)
    assert encoder([]).shape == (0, 6)

    other = hashed_text_encoder()  # new random embedding table
    export_text_encoder(other, tmp_path / "text_encoder")
    reloaded = load_encoder(tmp_path / "text_encoder")(captions)
    np.testing.assert_allclose(reloaded, unit(other(tf.constant(captions)).numpy()), atol=1e-5)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["text_encoder"]


def test_load_encoder_missing_or_damaged(tmp_path):
    with pytest.raises(DualEncError, match="train.py"):
        load_encoder(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(DualEncError, match="cannot load"):
        load_encoder(tmp_path / "broken")


def test_track_saves_only_the_named_parts(tmp_path):
    class Pair(keras.Model):
        def __init__(self):
            super().__init__()
            self.vision = small_conv_encoder()
            self.text = hashed_text_encoder()

        def encode_images(self, images):
            return self.vision(images)

    pair = Pair()
    export_vision_encoder(pair.encode_images, IMAGE_SIZE, tmp_path / "whole", track=[pair.vision, pair.text])
    export_vision_encoder(pair.encode_images, IMAGE_SIZE, tmp_path / "vision", track=[pair.vision])

    def weights(path):
        return {name for name, _ in tf.train.list_variables(str(path / "variables" / "variables"))}

    assert len(weights(tmp_path / "vision")) < len(weights(tmp_path / "whole"))
    assert not any("embedding" in name for name in weights(tmp_path / "vision"))
    blobs = [encode_png(solid_image(rgb, seed)) for seed, rgb in enumerate(COLOURS.values())]
    np.testing.assert_allclose(
        load_encoder(tmp_path / "vision")(blobs), load_encoder(tmp_path / "whole")(blobs), atol=1e-6
    )
