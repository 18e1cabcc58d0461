"""Towers from keras-hub presets, judged against keras-hub itself.

The presets are tiny random-weight CLIP and SigLIP models written with keras-hub's own
`save_to_preset` (the `keras_hub_presets` fixture), so everything runs offline in seconds. The
reference for every number is the in-memory keras-hub model: its backbone's
`get_vision_embeddings`/`get_text_embeddings`, its image converter and its preprocessor.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dualenc.config import ModelConfig, TextConfig, VisionConfig
from tests.support.keras_hub_presets import IMAGE_SIZE, SEQUENCE_LENGTH

CAPTIONS = ["a man in a red coat", "the woman with blue and black", "white coat, 2 dogs!"]


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def _keras_hub_reference(preset, family):
    """(backbone, embed_pixels, embed_captions) of keras-hub's own in-memory model of `preset`."""
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(str(preset))
    converter = keras_hub.layers.ImageConverter.from_preset(str(preset))
    preprocessor_class = keras_hub.models.CLIPPreprocessor if family == "clip" else keras_hub.models.SigLIPPreprocessor
    preprocessor = preprocessor_class.from_preset(str(preset))

    def embed_pixels(pixels):
        return _unit(np.asarray(backbone.get_vision_embeddings(converter(pixels.astype("float32")))))

    def embed_captions(captions):
        blank = np.zeros((len(captions), *IMAGE_SIZE, 3), "float32")
        token_ids = preprocessor({"prompts": captions, "images": blank})["token_ids"]
        return _unit(np.asarray(backbone.get_text_embeddings(token_ids)))

    return backbone, embed_pixels, embed_captions


def _zero_shot_config(preset, family, projection="preset"):
    from dualenc.towers.keras_hub import resolve_model_config

    return resolve_model_config(
        ModelConfig(
            vision=VisionConfig(family, preset=str(preset)),
            text=TextConfig(family, preset=str(preset)),
            projection=projection,
            loss="clip",
        )
    )


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_towers_and_preprocessor_give_keras_hub_embeddings(keras_hub_presets, family):
    import tensorflow as tf

    from dualenc.model import build_dual_encoder
    from dualenc.preprocessing import build_text_preprocessor

    preset = keras_hub_presets[family]
    config = _zero_shot_config(preset, family)
    assert config.vision.image_size == IMAGE_SIZE and config.text.max_tokens == SEQUENCE_LENGTH
    model = build_dual_encoder(config)
    _, embed_pixels, embed_captions = _keras_hub_reference(preset, family)
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, *IMAGE_SIZE, 3), dtype=np.uint8)
    np.testing.assert_allclose(model.encode_images(pixels).numpy(), embed_pixels(pixels), atol=1e-5)
    # Tokenised in a tf.data pipeline, as training does (keras-hub's graph tokenizer path).
    tokens = next(iter(tf.data.Dataset.from_tensor_slices(CAPTIONS).batch(3).map(build_text_preprocessor(config.text))))
    np.testing.assert_allclose(model.encode_texts(tokens).numpy(), embed_captions(CAPTIONS), atol=1e-5)


def test_heads_projection_stops_before_the_preset_projection(keras_hub_presets):
    from dualenc.model import build_dual_encoder

    config = _zero_shot_config(keras_hub_presets["clip"], "clip", projection="heads")
    model = build_dual_encoder(config)
    pixels = np.zeros((2, *IMAGE_SIZE, 3), np.uint8)
    # CLIP's pooled class token (hidden_dim 16), then dualenc's head to projection_dim.
    assert model.vision_tower(pixels).shape == (2, 16)
    assert model.encode_images(pixels).shape == (2, config.projection_dim)


def _serve_in_fresh_process(run_dir, image_bytes: list[bytes]) -> dict:
    """Embeddings from the exported encoders in a process that imports only TF and TF Text."""
    script = f"""
import json, sys
import tensorflow as tf
import tensorflow_text  # noqa: F401  the tokenizers' ops
vision = tf.saved_model.load({str(run_dir / "vision_encoder")!r})
text = tf.saved_model.load({str(run_dir / "text_encoder")!r})
images = [bytes.fromhex(h) for h in {[blob.hex() for blob in image_bytes]!r}]
out = {{
    "images": vision.signatures["serving_default"](images=tf.constant(images))["embeddings"].numpy().tolist(),
    "captions": text.signatures["serving_default"](captions=tf.constant({CAPTIONS!r}))["embeddings"].numpy().tolist(),
    "keras_hub_imported": any(name.startswith("keras_hub") for name in sys.modules),
}}
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_zero_shot_evaluation_equals_the_in_memory_keras_hub_model(keras_hub_presets, demo_data, tmp_path, capsys, monkeypatch):
    import search
    from dualenc.evaluation import SplitEmbeddings, retrieval_report
    from dualenc.gallery import PackedGallery
    from dualenc.images import decode_image
    from dualenc.index import open_index
    from dualenc.packed import split_captions

    monkeypatch.chdir(tmp_path)
    preset = keras_hub_presets["clip"]
    assert search.main(["--evaluate", "--model", str(preset), "--data", str(demo_data), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)

    # The same split embedded by keras-hub's own model: images through the shared decoder at
    # the preset's size, then keras-hub's converter and backbone; captions through its preprocessor.
    _, embed_pixels, embed_captions = _keras_hub_reference(preset, "clip")
    (run_dir,) = (tmp_path / "runs" / "zero-shot").iterdir()
    gallery = PackedGallery(demo_data, scores["split"])
    index = open_index(run_dir, gallery)
    blobs = gallery.read_images(list(index.image_ids))
    pixels = np.stack([decode_image(blobs[image_id], IMAGE_SIZE).numpy() for image_id in index.image_ids])
    captions = split_captions(demo_data, scores["split"])
    reference = retrieval_report(
        SplitEmbeddings(
            caption_embeddings=embed_captions(captions.captions),
            caption_labels=np.asarray(captions.labels),
            image_embeddings=embed_pixels(pixels),
            image_labels=np.asarray(index.labels),
            image_ids=list(index.image_ids),
        ),
        first_caption_embeddings=embed_captions(list(index.captions)),
    )
    np.testing.assert_allclose(index.embeddings, embed_pixels(pixels), atol=1e-5)
    for direction in ("text_to_image", "image_to_text"):
        for name, value in reference[direction].items():
            assert scores[direction][name] == pytest.approx(value, abs=1e-6), (direction, name)
    assert scores["top_k_accuracy"] == reference["top_k_accuracy"]

    # The exported encoders serve raw bytes and strings without keras-hub, with the same numbers.
    served = _serve_in_fresh_process(run_dir, [blobs[image_id] for image_id in index.image_ids[:3]])
    assert not served["keras_hub_imported"]
    np.testing.assert_allclose(served["images"], embed_pixels(pixels[:3]), atol=1e-5)
    np.testing.assert_allclose(served["captions"], embed_captions(CAPTIONS), atol=1e-5)


@pytest.mark.slow
def test_one_epoch_from_siglip_preset_trains_and_serves_in_a_fresh_process(keras_hub_presets, demo_data, tmp_path):
    import train
    from dualenc.gallery import PackedGallery
    from dualenc.packed import split_captions

    preset = str(keras_hub_presets["siglip"])
    out = tmp_path / "run"
    flags = ["--data", str(demo_data), "--out", str(out), "--vision", "siglip", "--vision-preset", preset,
             "--text", "siglip", "--text-preset", preset, "--loss", "siglip", "--epochs", "1",
             "--batch-size", "8", "--quiet"]
    assert train.main(flags) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 1
    image_ids = list(dict.fromkeys(split_captions(demo_data, "test").image_ids))[:2]
    blobs = PackedGallery(demo_data, "test").read_images(image_ids)
    served = _serve_in_fresh_process(out, [blobs[image_id] for image_id in image_ids])
    assert not served["keras_hub_imported"]
    for rows in (served["images"], served["captions"]):
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
