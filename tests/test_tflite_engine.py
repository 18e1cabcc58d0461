"""`dualenc.export.engines`: the TFLite engine against the SavedModel, and the one engine choice.

The SavedModel (TensorFlow's kernels, decoding in its own graph) is the reference the TFLite
engine (XNNPACK kernels, decoding in front of the model) is checked against, on the colour run
and on a small real backbone (MobileNetV2 with random weights): cosine ≥ 0.9999 per image.
"""

from __future__ import annotations

import concurrent.futures
import io
import shutil

import numpy as np
import pytest
from PIL import Image

import dualenc
import search
from dualenc.core.errors import DualEncError
from dualenc.export import engines
from dualenc.export.encoders import (
    VISION_ENCODER_DIR,
    VISION_TFLITE,
    LoadedEncoder,
    export_vision_encoder,
    export_vision_tflite,
)
from dualenc.export.engines import TFLiteVisionEncoder, load_vision_encoder, resolve_engine
from tests.support.colour_run import COLOURS, IMAGE_SIZE, encode_png, make_colour_run, mean_colour_encoder, solid_image

MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    return make_colour_run(tmp_path_factory.mktemp("colour"))


def colour_images() -> list[bytes]:
    """PNGs and JPEGs of every colour, of another size than the encoder's (so decoding resizes)."""
    images = []
    for number, rgb in enumerate(COLOURS.values()):
        buffer = io.BytesIO()
        Image.fromarray(solid_image(rgb, seed=number, size=(50, 70))).save(buffer, "JPEG" if number % 2 else "PNG")
        images.append(buffer.getvalue())
    return images


def photo_like(seed: int, size: tuple[int, int] = (120, 90)) -> bytes:
    """A JPEG of smooth random colour with hard-edged blocks: real spatial structure for a CNN."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(coarse).copy()
    for _ in range(4):
        top, left = rng.integers(0, size[1] - 20), rng.integers(0, size[0] - 20)
        pixels[top:top + 20, left:left + 30] = rng.integers(0, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def cosines(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row-wise cosine, in float64, of rows normalised here (not trusting either side's norm)."""
    left, right = left.astype(np.float64), right.astype(np.float64)
    return (left * right).sum(1) / np.linalg.norm(left, axis=1) / np.linalg.norm(right, axis=1)


def test_colour_run_tflite_matches_the_saved_model(colour_run):
    blobs = colour_images()
    tflite = load_vision_encoder(colour_run, "tflite", batch_size=3)
    saved_model = load_vision_encoder(colour_run, "savedmodel", batch_size=3)
    assert isinstance(tflite, TFLiteVisionEncoder) and isinstance(saved_model, LoadedEncoder)
    assert tflite.dimension == saved_model.dimension == 3 and tflite.image_size == IMAGE_SIZE
    ours, reference = tflite(blobs), saved_model(blobs)
    assert ours.dtype == np.float32 and ours.shape == (len(blobs), 3)
    assert cosines(ours, reference).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert tflite([]).shape == (0, 3)


def test_small_real_backbone_tflite_matches_the_saved_model(tmp_path):
    """MobileNetV2 (convolutions, depthwise, batch norm, ReLU6) + a projection, exported and converted."""
    from dualenc.core.config import VisionConfig
    from dualenc.models.towers.vision import build_vision_tower
    import keras

    image_size = (64, 64)
    keras.utils.set_random_seed(0)
    tower = build_vision_tower(VisionConfig("mobilenet_v2", None, trainable=False, image_size=image_size))
    pixels = keras.Input(shape=(*image_size, 3), dtype="uint8")
    model = keras.Model(pixels, keras.layers.Dense(32)(tower(pixels)))
    export_vision_encoder(model, image_size, tmp_path / VISION_ENCODER_DIR)
    export_vision_tflite(tmp_path / VISION_ENCODER_DIR, tmp_path / VISION_TFLITE)
    blobs = [photo_like(seed) for seed in range(10)]
    ours = load_vision_encoder(tmp_path, "tflite", batch_size=4)(blobs)
    reference = load_vision_encoder(tmp_path, "savedmodel", batch_size=4)(blobs)
    # The images must embed differently, or any two outputs would be close.
    assert cosines(reference[:-1], reference[1:]).min() < 0.99
    assert cosines(ours, reference).min() >= MIN_COSINE


def test_threads_share_one_interpreter(colour_run):
    blobs = colour_images() * 4
    encoder = load_vision_encoder(colour_run, "tflite", batch_size=5)
    alone = [encoder.embed_batch(blobs[start:start + 5]) for start in range(0, len(blobs), 5)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(encoder.embed_batch, [blobs[start:start + 5] for start in range(0, len(blobs), 5)]))
    for one, other in zip(alone, together):
        np.testing.assert_array_equal(one, other)


def test_bad_image_raises_the_kernel_message(colour_run):
    """As from the SavedModel: an `OpError` whose message starts with the kernel's own words."""
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        load_vision_encoder(colour_run, "tflite").embed_batch([colour_images()[0], b"not an image"])
    assert raised.value.message.startswith("Unknown image file format")


def test_auto_is_tflite_without_a_gpu_and_savedmodel_with_one(colour_run, monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert resolve_engine(colour_run) == "tflite"
    assert resolve_engine(colour_run, "savedmodel") == "savedmodel"
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert resolve_engine(colour_run) == "savedmodel"
    assert resolve_engine(colour_run, "tflite") == "tflite"
    with pytest.raises(DualEncError, match="unknown engine 'onnx'; choose one of auto, tflite, savedmodel"):
        resolve_engine(colour_run, "onnx")


def test_missing_or_stale_tflite_file(colour_run, tmp_path, monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    run_copy = tmp_path / "run"
    shutil.copytree(colour_run, run_copy)
    # Exported again without converting: the TFLite file is the old encoder's.
    negated = mean_colour_encoder()
    negated.layers[-1].kernel.assign(-np.eye(3, dtype=np.float32))
    export_vision_encoder(negated, IMAGE_SIZE, run_copy / VISION_ENCODER_DIR)
    assert resolve_engine(run_copy) == "savedmodel"
    with pytest.raises(DualEncError, match=r"has a stale vision_encoder\.tflite .*pass --engine savedmodel"):
        resolve_engine(run_copy, "tflite")
    export_vision_tflite(run_copy / VISION_ENCODER_DIR, run_copy / VISION_TFLITE)
    assert resolve_engine(run_copy) == "tflite"
    blob = encode_png(solid_image(COLOURS["red"], seed=3))
    np.testing.assert_allclose(load_vision_encoder(run_copy)([blob]), -load_vision_encoder(colour_run)([blob]), atol=1e-6)
    (run_copy / VISION_TFLITE).unlink()
    assert resolve_engine(run_copy) == "savedmodel"
    with pytest.raises(DualEncError, match=r"has no vision_encoder\.tflite"):
        resolve_engine(run_copy, "tflite")


def test_api_and_index_use_the_engine_chosen(colour_run, monkeypatch):
    """`dualenc.load` resolves the engine once; its queries and the index it builds both use it."""
    import tensorflow as tf

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    loaded = []
    original = engines.load_vision_encoder

    def recording(run_dir, engine="auto", batch_size=64):
        encoder = original(run_dir, engine, batch_size)
        loaded.append(type(encoder))
        return encoder

    monkeypatch.setattr("dualenc.api.load_vision_encoder", recording)
    monkeypatch.setattr("dualenc.retrieval.index.load_vision_encoder", recording)
    for engine, expected in (("auto", TFLiteVisionEncoder), ("savedmodel", LoadedEncoder)):
        loaded.clear()
        run = dualenc.load(colour_run, engine=engine)
        assert run.engine == ("tflite" if expected is TFLiteVisionEncoder else "savedmodel")
        run.index(data=colour_run.parent.parent / "data", split="test", rebuild=True, log=io.StringIO())
        run.encode_images(colour_images()[:1])
        assert loaded == [expected, expected]
    with pytest.raises(DualEncError, match="unknown engine"):
        dualenc.load(colour_run, engine="onnx")


def test_cli_engine_flag(colour_run, tmp_path, capsys, monkeypatch):
    bare = tmp_path / "bare"
    shutil.copytree(colour_run, bare)
    (bare / VISION_TFLITE).unlink()
    assert search.main(["red", "--model", str(bare), "--engine", "tflite"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {bare} has no vision_encoder.tflite (not converted from its vision_encoder/); "
        "re-export the run or pass --engine savedmodel"]
    from dualenc.service import server as service_server

    served = {}
    monkeypatch.setattr(service_server, "serve", lambda *args, **options: served.update(options))
    assert search.main(["--serve", "--model", str(colour_run), "--engine", "savedmodel"]) == 0
    assert served["engine"] == "savedmodel"  # the service indexes and embeds uploads on the same engine
    capsys.readouterr()
    assert search.main(["red", "--model", str(colour_run), "--engine", "savedmodel", "--json", "-k", "1"]) == 0
