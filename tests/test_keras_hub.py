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

from dualenc.core.config import ModelConfig, TextConfig, VisionConfig
from tests.support.keras_hub_presets import IMAGE_SIZE, SEQUENCE_LENGTH
from tfrecords_tools.demo import MIN_IDENTITIES

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
    from dualenc.models.towers.keras_hub import resolve_model_config

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

    from dualenc.models.model import build_dual_encoder
    from dualenc.models.preprocessing import build_text_preprocessor

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
    from dualenc.models.model import build_dual_encoder

    config = _zero_shot_config(keras_hub_presets["clip"], "clip", projection="heads")
    model = build_dual_encoder(config)
    pixels = np.zeros((2, *IMAGE_SIZE, 3), np.uint8)
    # CLIP's pooled class token (hidden_dim 16), then dualenc's head to projection_dim.
    assert model.vision_tower(pixels).shape == (2, 16)
    assert model.encode_images(pixels).shape == (2, config.projection_dim)


def _serve_in_fresh_process(run_dir, image_bytes: list[bytes]) -> dict:
    """Embeddings from the exported encoders in a process that imports only TF and TF Text
    (the vision encoder only when there are `image_bytes`)."""
    script = f"""
import json, sys
import tensorflow as tf
import tensorflow_text  # noqa: F401  the tokenizers' ops
text = tf.saved_model.load({str(run_dir / "text_encoder")!r})
out = {{"captions": text.signatures["serving_default"](captions=tf.constant({CAPTIONS!r}))["embeddings"].numpy().tolist()}}
images = [bytes.fromhex(h) for h in {[blob.hex() for blob in image_bytes]!r}]
if images:
    vision = tf.saved_model.load({str(run_dir / "vision_encoder")!r})
    out["images"] = vision.signatures["serving_default"](images=tf.constant(images))["embeddings"].numpy().tolist()
out["keras_hub_imported"] = any(name.startswith("keras_hub") for name in sys.modules)
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_zero_shot_evaluation_equals_the_in_memory_keras_hub_model(keras_hub_presets, demo_data, tmp_path, capsys, monkeypatch):
    import search
    from dualenc.retrieval import attributes
    from dualenc.retrieval.evaluation import SplitEmbeddings, retrieval_report
    from dualenc.retrieval.gallery import PackedGallery
    from dualenc.data.images import decode_image
    from dualenc.retrieval.index import open_index
    from dualenc.data.packed import split_captions

    monkeypatch.chdir(tmp_path)
    # The attribute report a demo pack adds, over the smallest demo of unseen people: its 500
    # people would cost most of this test, which judges the retrieval scores.
    monkeypatch.setattr(attributes, "GALLERY_IDENTITIES", MIN_IDENTITIES)
    preset = keras_hub_presets["clip"]
    assert search.main(["--evaluate", "--model", str(preset), "--data", str(demo_data), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert "attributes" in scores

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
    from dualenc.retrieval.gallery import PackedGallery
    from dualenc.data.packed import split_captions

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


def test_keras_hub_bert_text_tower_gives_keras_hub_pooled_output(keras_hub_presets, tmp_path):
    import keras_hub
    import tensorflow as tf

    from dualenc.export.encoders import export_text_encoder
    from dualenc.models.preprocessing import build_text_preprocessor
    from dualenc.models.towers import build_text_tower
    from dualenc.models.towers.keras_hub import resolve_model_config

    preset = str(keras_hub_presets["bert"])
    config = resolve_model_config(ModelConfig(text=TextConfig("bert", preset=preset))).text
    tower = build_text_tower(config)
    tokens = next(iter(tf.data.Dataset.from_tensor_slices(CAPTIONS).batch(3).map(build_text_preprocessor(config))))
    backbone = keras_hub.models.Backbone.from_preset(preset)
    reference = backbone(keras_hub.models.BertTextClassifierPreprocessor.from_preset(preset)(CAPTIONS))["pooled_output"]
    np.testing.assert_allclose(tower(tokens).numpy(), np.asarray(reference), atol=1e-5)

    # BERT's WordPiece tokenizer exports too: the text encoder serves strings without keras-hub.
    export_text_encoder(tower, tmp_path / "text_encoder", preprocessor=build_text_preprocessor(config))
    served = _serve_in_fresh_process(tmp_path, [])
    assert not served["keras_hub_imported"]
    np.testing.assert_allclose(served["captions"], _unit(np.asarray(reference)), atol=1e-5)


@pytest.mark.slow
def test_search_a_folder_straight_from_a_preset(keras_hub_presets, tmp_path, capsys, monkeypatch):
    from PIL import Image

    import search
    from dualenc.data.images import decode_image

    gallery = tmp_path / "photos"
    gallery.mkdir()
    rng = np.random.default_rng(1)
    for name in ("red", "green", "blue", "grey"):
        Image.fromarray(rng.integers(0, 256, size=(40, 24, 3), dtype=np.uint8)).save(gallery / f"{name}.png")
    monkeypatch.chdir(tmp_path)
    preset = keras_hub_presets["siglip"]
    assert search.main([CAPTIONS[0], "--model", str(preset), "--gallery", str(gallery), "-k", "4", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)

    _, embed_pixels, embed_captions = _keras_hub_reference(preset, "siglip")
    paths = sorted(gallery.iterdir())
    pixels = np.stack([decode_image((path).read_bytes(), IMAGE_SIZE).numpy() for path in paths])
    scores = embed_pixels(pixels) @ embed_captions([CAPTIONS[0]])[0]
    expected = [paths[row].name for row in np.argsort(-scores)]
    assert [result["path"].rsplit("/", 1)[-1] for result in results] == expected
    np.testing.assert_allclose([result["score"] for result in results], np.sort(scores)[::-1], atol=1e-5)


def _bad_input_cases(presets, tmp_path):
    not_a_preset = tmp_path / "not_a_preset"
    not_a_preset.mkdir()
    (not_a_preset / "config.json").write_text('{"hidden_size": 8}')
    clip, siglip = str(presets["clip"]), str(presets["siglip"])
    wrong_size = tmp_path / "wrong_size.json"
    wrong_size.write_text(json.dumps({"model": {"vision": {"backbone": "clip", "preset": clip, "image_size": [64, 64]}}}))
    unreachable = "kaggle://dualenc-tests/none/keras/none"
    return {
        "unreachable handle": (["--vision", "clip", "--vision-preset", unreachable], [unreachable, "--vision-preset DIR"]),
        "not a preset": (["--text", "clip", "--text-preset", str(not_a_preset)], [str(not_a_preset), "not a keras-hub preset"]),
        "wrong family": (["--vision", "siglip", "--vision-preset", clip], ["holds a clip model", "--vision clip"]),
        "projection widths": (
            ["--vision", "clip", "--vision-preset", clip, "--text", "siglip", "--text-preset", siglip, "--projection", "preset"],
            ["projects to 8 dimensions", "16", "--projection heads"],
        ),
        "image size": (["--config", str(wrong_size)], ["takes 32x32 images, not 64x64"]),
        "missing preset": (["--vision", "clip"], ["--vision-preset HANDLE_OR_DIR"]),
    }


@pytest.mark.parametrize(
    "case", ["unreachable handle", "not a preset", "wrong family", "projection widths", "image size", "missing preset"]
)
def test_bad_presets_exit_2_with_one_line(case, keras_hub_presets, demo_data, tmp_path, capsys):
    import train

    flags, words = _bad_input_cases(keras_hub_presets, tmp_path)[case]
    assert train.main([*flags, "--data", str(demo_data), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    for word in words:
        assert word in error, (word, error)
    assert not (tmp_path / "run").exists()


def test_search_with_an_unreachable_preset_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    import search

    monkeypatch.chdir(tmp_path)
    assert search.main(["a dog", "--model", "kaggle://dualenc-tests/none/keras/none", "--gallery", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "kaggle://dualenc-tests/none/keras/none" in error and "DIR" in error


@pytest.mark.parametrize("name, loss", [("cuhk-pedes-clip", "sdm+cmpc"), ("coco-clip", "clip")])
def test_clip_presets_run_from_a_local_preset_directory(name, loss, keras_hub_presets):
    import train
    from dualenc.models.towers.keras_hub import resolve_model_config

    clip = str(keras_hub_presets["clip"])
    config = train.build_config(train.parse_args(["--preset", name, "--vision-preset", clip, "--text-preset", clip]))
    model = resolve_model_config(config.model)
    assert (model.loss, model.projection, model.vision.preset, model.text.preset) == (loss, "preset", clip, clip)
    # Image size, sequence length and embedding width come from the preset found.
    assert (model.vision.image_size, model.text.max_tokens, model.projection_dim) == (IMAGE_SIZE, SEQUENCE_LENGTH, 8)


def test_model_with_preset_towers_saves_and_loads_as_a_keras_file(keras_hub_presets, tmp_path):
    import keras

    from dualenc.models.model import build_dual_encoder

    model = build_dual_encoder(_zero_shot_config(keras_hub_presets["clip"], "clip"))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    pixels = np.random.default_rng(2).integers(0, 256, size=(2, *IMAGE_SIZE, 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.encode_images(pixels).numpy(), model.encode_images(pixels).numpy(), atol=1e-6)


def test_keras_hub_configs_round_trip_through_json(keras_hub_presets):
    from dualenc.core import config as configs

    clip = str(keras_hub_presets["clip"])
    config = configs.TrainConfig(
        model=ModelConfig(vision=VisionConfig("clip", preset=clip), text=TextConfig("clip", preset=clip), projection="preset"),
        epochs=0,
    )
    assert config.model.vision.image_size is None  # until resolve_model_config reads the preset
    assert configs.from_dict(configs.TrainConfig, json.loads(json.dumps(configs.to_dict(config)))) == config


@pytest.mark.slow
def test_train_with_zero_epochs_exports_the_preset_as_keras_hub_computes_it(keras_hub_presets, demo_data, tmp_path):
    """train.py's export of an untrained preset, loaded here: serving it in a fresh process
    without keras-hub is what the zero-shot and SigLIP tests check."""
    import train
    from dualenc.export.encoders import TEXT_ENCODER_DIR, VISION_ENCODER_DIR, load_encoder
    from dualenc.retrieval.gallery import PackedGallery
    from dualenc.data.images import decode_image
    from dualenc.data.packed import split_captions

    preset = str(keras_hub_presets["clip"])
    out = tmp_path / "run"
    flags = ["--data", str(demo_data), "--out", str(out), "--vision", "clip", "--vision-preset", preset,
             "--text", "clip", "--text-preset", preset, "--projection", "preset", "--epochs", "0",
             "--batch-size", "8", "--quiet"]
    assert train.main(flags) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs_trained"] == 0
    image_ids = list(dict.fromkeys(split_captions(demo_data, "test").image_ids))[:2]
    blobs = PackedGallery(demo_data, "test").read_images(image_ids)
    served_images = load_encoder(out / VISION_ENCODER_DIR)([blobs[image_id] for image_id in image_ids])
    served_captions = load_encoder(out / TEXT_ENCODER_DIR)(CAPTIONS)
    _, embed_pixels, embed_captions = _keras_hub_reference(preset, "clip")
    pixels = np.stack([decode_image(blobs[image_id], IMAGE_SIZE).numpy() for image_id in image_ids])
    np.testing.assert_allclose(served_images, embed_pixels(pixels), atol=1e-5)
    np.testing.assert_allclose(served_captions, embed_captions(CAPTIONS), atol=1e-5)
