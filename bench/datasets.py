"""Inputs the benchmarks share, built once per run in a child process (``measure(kind, params)``).

- ``demo``: the synthetic CUHK-PEDES-layout demo (128×64 PNG/JPEG person crops), raw and packed
  (its result also carries the TensorFlow version, for the machine description).
- ``coco``: COCO-like photos: 640×480 RGB JPEGs (quality 90) of smooth random colour fields with
  edges and grain, so they compress like photos (~40–70 kB each) and cost what a COCO image
  costs to decode and resize; `captions_per_image` captions each, as a folder caption table
  (``captions.jsonl``), raw and packed.
- ``bert``: the tiny TF-Hub-format BERT of the test fixtures (`tests/support/tiny_bert.py`), as a
  frozen text tower that needs no download.
- ``encoder``: a small vision encoder (frozen MobileNetV2, random weights, + Dense(256)), saved
  both as a Keras model (how seed 003 saves its encoders) and exported with
  `dualenc.export.encoders.export_vision_encoder` (bytes in, unit embeddings out).
- ``tflite``: that encoder's ``vision_encoder.tflite`` beside its SavedModel, converted as
  `dualenc.export.encoders.export_encoders` converts a trained run's (``--engine tflite``).
- ``demo_epoch``: a demo of its own (another number of people) for `bench.demo_epoch`, built
  as ``demo`` is.
- ``demo_run``: a run of the default demo preset (small CNN + WordPiece BiLSTM) trained for one
  epoch on the packed demo by ``train.py``'s `main`, as the search service serves it (not built
  when `bench.demo_epoch` trains that very run, as in the quick run).

``measure(ALL, {kind: params, …})`` builds several in one process, in the order given: one
TensorFlow start-up instead of one per input (about 4 s of CPU each on 2 cores). None of this is
timed; the measured variants still run each in its own process (`bench.common.run_isolated`),
except in the quick run (`bench.common.SharedWorker`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

COCO_SIZE = (640, 480)  # width, height: a typical COCO train2014 image
COCO_JPEG_QUALITY = 90
COARSE_GRID = (8, 6)
GRAIN = 6.0
SEED_KERAS_MODEL = "seed_vision_encoder.keras"
PROJECTION_DIM = 256
PACKED = "packed"  # the packed copy of a source, under its root
STORED_AT_SIZE = "packed-at-size"  # the coco-like source packed for the input pipeline's size (--preset)
ALL = "all"  # the `measure` kind that builds several inputs in one process
# What the search service serves: one epoch of the demo preset; speed does not depend on how well it learnt.
DEMO_RUN_EPOCHS, DEMO_RUN_BATCH = 1, 16
DEMO_RUN_FLAGS = ["--epochs", str(DEMO_RUN_EPOCHS), "--batch-size", str(DEMO_RUN_BATCH), "--quiet"]


def coco_like_image(rng: np.random.Generator) -> bytes:
    """One 640×480 JPEG: a bicubically upsampled random colour grid, a few hard-edged shapes
    (the high frequencies JPEG pays for) and grain."""
    width, height = COCO_SIZE
    coarse = Image.fromarray(rng.integers(0, 256, (*COARSE_GRID[::-1], 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize(COCO_SIZE, Image.Resampling.BICUBIC), dtype=np.float32)
    for _ in range(6):
        top, left = rng.integers(0, height - 40), rng.integers(0, width - 40)
        pixels[top:top + rng.integers(20, 200), left:left + rng.integers(20, 300)] = rng.integers(0, 256, 3)
    pixels += rng.normal(0.0, GRAIN, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=COCO_JPEG_QUALITY)
    return buffer.getvalue()


def make_coco_like(root: Path, images: int, captions_per_image: int, seed: int = 0) -> dict:
    """Write `images` JPEGs under ``root/images`` and ``root/captions.jsonl``; returns the paths."""
    rng = np.random.default_rng(seed)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(images):
        name = f"COCO_train2014_{index:012d}.jpg"
        (image_dir / name).write_bytes(coco_like_image(rng))
        rows += [{"image": name, "caption": f"photo {index} caption {number}"} for number in range(captions_per_image)]
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return {"annotations": str(captions), "images": str(image_dir), "pairs": len(rows), "format": "folder"}


def load_entries(source_format: str, annotations: Path, images: Path):
    """The packer's `ImageEntry` lists per split for a source (``cuhk-pedes`` or ``folder``)."""
    if source_format == "cuhk-pedes":
        from tfrecords_tools import cuhk_pedes

        return cuhk_pedes.load(annotations, images)
    from tfrecords_tools import folder

    return folder.load(annotations, images)


def pack_with_tools(source_format: str, annotations: Path, images: Path, out: Path, workers: int,
                    cover: tuple[int, int] | None = None) -> dict:
    """Pack a source with `tfrecords_tools.writer.pack` (images stored just large enough to cover
    `cover`, as ``--preset`` does, when given); returns the manifest."""
    from dualenc.data.images import StoreSize
    from tfrecords_tools.writer import pack

    splits, skipped = load_entries(source_format, annotations, images)
    source = {"format": source_format, "annotations": str(annotations), "images": str(images)}
    return pack(splits, out, source, skipped=skipped, workers=workers, overwrite=True,
                size=StoreSize(cover=None if cover is None else tuple(cover)))


def _make_demo(params: dict) -> dict:
    from tfrecords_tools.demo import IMAGES_DIR, REID_RAW_NAME, make_demo

    raw = make_demo(Path(params["root"]) / "raw", identities=params["identities"])
    annotations, images = raw / REID_RAW_NAME, raw / IMAGES_DIR
    packed = Path(params["root"]) / PACKED
    manifest = pack_with_tools("cuhk-pedes", annotations, images, packed, workers=1)
    pairs = sum(split.pairs for split in manifest.splits.values())
    import tensorflow as tf  # already loaded by the packer; its version describes the machine

    return {"annotations": str(annotations), "images": str(images), "packed": str(packed), "pairs": pairs,
            "train_pairs": manifest.splits["train"].pairs, "format": "cuhk-pedes",
            "tensorflow": tf.__version__}


def _make_coco(params: dict) -> dict:
    root = Path(params["root"])
    made = make_coco_like(root / "raw", params["images"], params["captions_per_image"])
    packed, stored = root / PACKED, root / STORED_AT_SIZE
    pack_with_tools("folder", Path(made["annotations"]), Path(made["images"]), packed, workers=1)
    pack_with_tools("folder", Path(made["annotations"]), Path(made["images"]), stored, workers=1,
                    cover=params["cover"])
    return {**made, "packed": str(packed), "stored": str(stored), "cover": params["cover"]}


def _make_bert(params: dict) -> dict:
    from tests.support.tiny_bert import make_tiny_bert  # the worker runs from REPO_ROOT

    preprocessor, encoder = make_tiny_bert(Path(params["root"]))
    return {"preprocessor": str(preprocessor), "encoder": str(encoder)}


def build_small_encoder(image_size: tuple[int, int]):
    """Frozen MobileNetV2 (random weights: no ImageNet download here) + Dense(256): pixels → [B, 256]."""
    import keras

    from dualenc.core.config import VisionConfig
    from dualenc.models.towers.vision import build_vision_tower

    keras.utils.set_random_seed(0)
    tower = build_vision_tower(VisionConfig("mobilenet_v2", None, trainable=False, image_size=tuple(image_size)))
    pixels = keras.Input(shape=(*image_size, 3), name="pixels")
    embeddings = keras.layers.Dense(PROJECTION_DIM, name="projection")(tower(pixels))
    return keras.Model(pixels, embeddings, name="vision_encoder")


def _make_encoder(params: dict) -> dict:
    from dualenc.export.encoders import VISION_ENCODER_DIR, export_vision_encoder

    run_dir = Path(params["root"])
    run_dir.mkdir(parents=True, exist_ok=True)
    image_size = tuple(params["image_size"])
    model = build_small_encoder(image_size)
    model.save(run_dir / SEED_KERAS_MODEL)
    export_vision_encoder(model, image_size, run_dir / VISION_ENCODER_DIR)
    return {"run_dir": str(run_dir), "keras_model": str(run_dir / SEED_KERAS_MODEL)}


def _make_tflite(params: dict) -> dict:
    from dualenc.export.encoders import VISION_ENCODER_DIR, VISION_TFLITE, export_vision_tflite

    run_dir = Path(params["run_dir"])
    export_vision_tflite(run_dir / VISION_ENCODER_DIR, run_dir / VISION_TFLITE)
    return {"tflite_mb": (run_dir / VISION_TFLITE).stat().st_size / 2**20}


def _make_demo_run(params: dict) -> dict:
    import train  # the worker runs from REPO_ROOT

    run_dir = Path(params["out"])
    code = train.main(["--data", params["data_dir"], *DEMO_RUN_FLAGS, "--out", str(run_dir)])
    if code != 0:
        raise RuntimeError(f"train.py exited {code} training the service's run into {run_dir}")
    return {"run_dir": str(run_dir)}


MAKERS = {"demo": _make_demo, "demo_epoch": _make_demo, "coco": _make_coco, "bert": _make_bert,
          "encoder": _make_encoder, "tflite": _make_tflite, "demo_run": _make_demo_run}


def measure(kind: str, params: dict) -> dict:
    """Build input `kind` (one of `MAKERS`) as `params` say; returns where it is. With kind `ALL`,
    `params` maps kinds to their params: each is built in turn and the results come back by kind."""
    if kind == ALL:
        return {name: MAKERS[name](name_params) for name, name_params in params.items()}
    return MAKERS[kind](params)
