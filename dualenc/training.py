"""One training run, start to finish: data checks, model, input pipelines, callbacks, export.

`run_training` is what `train.py` calls once it has built a `TrainConfig` from flags. It
writes everything into a run directory (see `dualenc.runs`): the resolved config first, then
logs and checkpoints per epoch, and at the end the two exported encoders, ``curves.png``
and ``metrics.json`` (retrieval on the test split; writing it marks the run finished).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from dualenc import config as configs
from dualenc import losses
from dualenc.curves import plot_curves
from dualenc.data import TEST_SPLITS, VALIDATION_SPLITS, verify_checksums
from dualenc.errors import DualEncError
from dualenc.evaluation import embed_split, retrieval_metrics
from dualenc.export import export_encoders
from dualenc.feature_cache import CachedFeatures, cached_features, tower_fingerprint
from dualenc.files import atomic_file, write_json_atomic
from dualenc.images import decode_image
from dualenc.manifest import Manifest, load_manifest
from dualenc.model import CAPTION_FEATURES, IMAGE_FEATURES, TOKENS, DualEncoder, build_dual_encoder
from dualenc.multiworker import (
    describe, fingerprint, join_run, shard_inputs, shard_mode, worker_cache_dir, worker_callbacks,
)
from dualenc.packed import record_dataset, split_captions
from dualenc.placement import Placement, make_placement
from dualenc.preprocessing import build_text_preprocessor
from dualenc.records import CAPTION, IMAGE, IMAGE_ID, LABEL, parse_example
from dualenc.runs import RunPaths, cache_root
from dualenc.sampling import identity_batches
from dualenc.vocabulary import learn_wordpiece_vocabulary

TRAIN_SPLIT = "train"
# K of the P x K identity batches used by CMPM/CMPC (IRRA samples 4 instances per identity).
INSTANCES_PER_IDENTITY = 4
# Where keras.callbacks.BackupAndRestore records how many epochs its backup holds.
BACKUP_METADATA = "training_metadata.json"


def pick_split(manifest: Manifest, preferred: tuple[str, ...], data_dir: Path) -> str:
    """The first of `preferred` that the dataset has with at least one pair."""
    for split in preferred:
        if split in manifest.splits and manifest.splits[split].pairs:
            return split
    raise DualEncError(f"{data_dir} has no non-empty split among {', '.join(preferred)}; pack one (e.g. --holdout-images)")


def resolve_config(config: configs.TrainConfig, manifest: Manifest, paths: RunPaths) -> configs.TrainConfig:
    """Fill what depends on the data and the run directory: CMPC's class count, the vocabulary path."""
    model = config.model
    if losses.needs_class_weights(model.loss):
        model = dataclasses.replace(model, num_classes=manifest.split(TRAIN_SPLIT, config.data).ids)
    if model.text.tower == "bilstm" and model.text.vocabulary is None:
        model = dataclasses.replace(model, text=dataclasses.replace(model.text, vocabulary=str(paths.vocabulary)))
    return dataclasses.replace(config, model=model)


def check_data(config: configs.TrainConfig, data_dir: Path) -> Manifest:
    """The manifest, after checking splits, checksums (every split used) and that one batch fits the training split."""
    manifest = load_manifest(data_dir)
    pairs = manifest.split(TRAIN_SPLIT, data_dir).pairs
    if config.batch_size > pairs:
        raise DualEncError(f"--batch-size {config.batch_size} is larger than the {pairs} training pairs in {data_dir}; lower it")
    # The test split too: a damaged one would otherwise fail only after the last epoch.
    for split in {TRAIN_SPLIT, pick_split(manifest, VALIDATION_SPLITS, data_dir), pick_split(manifest, TEST_SPLITS, data_dir)}:
        verify_checksums(data_dir, split)
    return manifest


def _frozen(config: configs.ModelConfig) -> dict[str, bool]:
    """Which towers are frozen, so their features can be cached."""
    return {"image": not config.vision.trainable, "caption": not config.text.trainable}


def _pair_parser(image_size: tuple[int, int], caches: dict[str, CachedFeatures], decode: bool):
    """Serialised record -> a pair (pixels or cached image features, caption, label, image_id)."""

    def parse(record: tf.Tensor) -> dict[str, tf.Tensor]:
        features = parse_example(record)
        inputs = {LABEL: features[LABEL], IMAGE_ID: features[IMAGE_ID], CAPTION: features[CAPTION]}
        if "image" in caches:
            inputs[IMAGE_FEATURES] = caches["image"].lookup(features[IMAGE_ID])
        else:
            inputs[IMAGE] = decode_image(features[IMAGE], image_size) if decode else features[IMAGE]
        return inputs

    return parse


def _with_tokens(text_preprocessor: Callable, caches: dict[str, CachedFeatures]):
    """Batch -> batch with the captions' "tokens" (or cached "caption_features") added."""

    def add(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        if "caption" in caches:
            return {**batch, CAPTION_FEATURES: caches["caption"].lookup(batch[CAPTION])}
        return {**batch, TOKENS: text_preprocessor(batch[CAPTION])}

    return add


def model_inputs(batches: tf.data.Dataset) -> tf.data.Dataset:
    """The batches without their strings (caption, image_id): the model takes numbers only."""
    return batches.map(lambda batch: {key: value for key, value in batch.items() if key not in (CAPTION, IMAGE_ID)})


def pair_batches(
    data_dir: Path,
    split: str,
    config: configs.TrainConfig,
    text_preprocessor: Callable,
    caches: dict[str, CachedFeatures],
    *,
    training: bool,
) -> tf.data.Dataset:
    """Batches of pairs of `split` with the model's inputs: shuffled (seeded) when training, in order otherwise.

    Losses that learn from identities (CMPM, CMPC) train on P identities x K pairs per batch;
    the others on plain shuffled batches. Batches also carry "caption" and "image_id" strings,
    which evaluation uses (`model_inputs` drops them for Keras).
    """
    image_size = config.model.vision.image_size
    records = record_dataset(data_dir, split, shuffle=training, seed=config.seed)
    if training and losses.needs_labels(config.model.loss):
        # Light elements (encoded bytes) are grouped by identity, then decoded per batch.
        light = records.map(_pair_parser(image_size, caches, decode=False), num_parallel_calls=tf.data.AUTOTUNE)
        batches = identity_batches(
            light, max(1, config.batch_size // INSTANCES_PER_IDENTITY), INSTANCES_PER_IDENTITY, seed=config.seed
        )
        if "image" not in caches:
            decode = lambda images: tf.map_fn(  # noqa: E731
                lambda image: decode_image(image, image_size), images, fn_output_signature=tf.uint8
            )
            batches = batches.map(lambda batch: {**batch, IMAGE: decode(batch[IMAGE])}, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        pairs = records.map(_pair_parser(image_size, caches, decode=True), num_parallel_calls=tf.data.AUTOTUNE)
        batches = pairs.batch(config.batch_size, drop_remainder=training)
    batches = batches.map(_with_tokens(text_preprocessor, caches), num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE)


class RetrievalValidation(keras.callbacks.Callback):
    """Adds validation R@1/5/10 and mAP in both directions to each epoch's logs (``val_t2i_r1`` …).

    Listed first among the callbacks, so the CSV log, checkpoints and curves see the values.
    """

    def __init__(self, batches: tf.data.Dataset, caches: dict[str, CachedFeatures]):
        super().__init__()
        self.batches = batches
        self.image_key = IMAGE_FEATURES if "image" in caches else IMAGE
        self.caption_key = CAPTION_FEATURES if "caption" in caches else TOKENS

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        embeddings = embed_split(
            self.batches.as_numpy_iterator(),
            self.model.encode_images,
            self.model.encode_texts,
            image_key=self.image_key,
            caption_key=self.caption_key,
        )
        if logs is not None:
            logs.update({f"val_{name}": value for name, value in retrieval_metrics(embeddings).items()})


class EpochSummary(keras.callbacks.Callback):
    """One line per epoch: losses and validation recall, for logs that outlive the progress bar."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        parts = [f"epoch {epoch + 1}/{self.epochs}"]
        for key, label in (("loss", "loss"), ("val_loss", "val_loss"), ("val_t2i_r1", "t2i R@1"),
                           ("val_t2i_r10", "t2i R@10"), ("val_i2t_r1", "i2t R@1")):
            if key in logs:
                parts.append(f"{label} {float(logs[key]):.3f}" if "loss" in key else f"{label} {float(logs[key]):.1f}%")
        # Keras' progress bar is still mid-line here (it finishes after user callbacks).
        print("\n" + " | ".join(parts), flush=True)


def _callbacks(paths: RunPaths, config: configs.TrainConfig, validation: RetrievalValidation, verbose: int) -> list:
    paths.best_weights.parent.mkdir(parents=True, exist_ok=True)
    # Losses should fall, retrieval scores rise.
    follow = {"monitor": config.monitor, "mode": "min" if config.monitor.endswith("loss") else "max"}
    callbacks = [
        validation,
        keras.callbacks.TerminateOnNaN(),
        # Seed 003's schedule: cut the rate on a plateau, stop after 5 flat epochs, keep the best.
        keras.callbacks.ReduceLROnPlateau(factor=0.2, patience=3, **follow),
        keras.callbacks.EarlyStopping(patience=5, restore_best_weights=True, **follow),
        keras.callbacks.ModelCheckpoint(str(paths.best_weights), save_best_only=True, save_weights_only=True, **follow),
        # The CSV row is written before the backup: an interruption between the two leaves a row
        # for an epoch the backup lacks, which `trim_log` drops before the epoch is redone.
        keras.callbacks.CSVLogger(str(paths.log_csv), append=True),
        # Two generations, so a kill while the weights file is half written resumes from the one before.
        keras.callbacks.BackupAndRestore(str(paths.backup), double_checkpoint=True),
        keras.callbacks.TensorBoard(str(paths.tensorboard), write_graph=False),
    ]
    if verbose:
        callbacks.append(EpochSummary(config.epochs))
    return callbacks


def read_history(log_csv: Path) -> dict[str, list[float]]:
    """Per-epoch values from the CSV log; an epoch logged twice keeps its last row."""
    if not log_csv.is_file():
        return {}
    rows: dict[int, dict[str, str]] = {}
    with open(log_csv, newline="") as stream:
        for row in csv.DictReader(stream):
            rows[int(row["epoch"])] = row
    history: dict[str, list[float]] = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            if key != "epoch" and value not in ("", None):
                history.setdefault(key, []).append(float(value))
    return history


def backed_up_epochs(backup_dir: Path) -> int:
    """Epochs finished in the BackupAndRestore backup under `backup_dir` (0 without one)."""
    try:
        return int(json.loads((backup_dir / BACKUP_METADATA).read_text())["epoch"])
    except FileNotFoundError:
        return 0


def trim_log(log_csv: Path, epochs: int) -> None:
    """Keep only the CSV rows of the first `epochs` epochs: a resumed run redoes the others.

    Rewritten under a temporary name and renamed, like every other file of the run.
    """
    if not log_csv.is_file():
        return
    with open(log_csv, newline="") as stream:
        reader = csv.DictReader(stream)
        fields = reader.fieldnames
        rows = [row for row in reader if int(row["epoch"]) < epochs]
    with atomic_file(log_csv) as staging, open(staging, "w", newline="") as stream:
        if rows:
            writer = csv.DictWriter(stream, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def learn_vocabulary(data_dir: Path, text: configs.TextConfig) -> None:
    """Learn the BiLSTM's WordPiece vocabulary from the training captions (once per run)."""
    path = Path(text.vocabulary)
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    captions = split_captions(data_dir, TRAIN_SPLIT).captions
    learn_wordpiece_vocabulary(captions, text.vocab_size, path)


def build_model(config: configs.TrainConfig, placement: Placement | None = None) -> DualEncoder:
    """The compiled dual encoder for `config` (placement, mixed precision, AdamW with EMA)."""
    keras.mixed_precision.set_global_policy("mixed_float16" if config.mixed_precision else "float32")
    placement = placement if placement is not None else make_placement(config.placement)
    with placement.scope():
        model = build_dual_encoder(config.model, placement)
        model.compile(
            optimizer=keras.optimizers.AdamW(
                learning_rate=config.learning_rate, weight_decay=config.weight_decay, use_ema=True
            )
        )
    return model


def feature_caches(
    model: DualEncoder,
    config: configs.TrainConfig,
    text_preprocessor: Callable,
    data_dir: Path,
    splits: list[str],
    cache_dir: Path,
) -> dict:
    """{"image"/"caption": features} for each frozen tower, over the given splits' records."""
    # Raw batch -> frozen tower features; the text tower sees the preprocessor's tokens.
    embedders = {
        "image": lambda pixels: model.vision_tower(pixels, training=False),
        "caption": lambda captions: model.text_tower(text_preprocessor(captions), training=False),
    }
    # The caption features depend on the tokenisation too (vocabulary or BERT preprocessor).
    text_identity = json.dumps(configs.to_dict(config.model.text), sort_keys=True)
    fingerprints = {
        "image": tower_fingerprint(model.vision_tower),
        "caption": hashlib.sha256((tower_fingerprint(model.text_tower) + text_identity).encode()).hexdigest(),
    }
    caches = {}
    for kind, frozen in _frozen(config.model).items():
        if not frozen:
            continue
        parts = [
            cached_features(
                embedders[kind], fingerprints[kind], data_dir, split, kind, cache_dir, image_size=config.model.vision.image_size
            )
            for split in splits
        ]
        # A caption (or image) found in several splits has the same features from a frozen tower;
        # it is kept once, since the lookup table refuses a key with two rows.
        rows: dict[str, np.ndarray] = {}
        for part in parts:
            for key, features in zip(part.keys, part.features):
                rows.setdefault(key, features)
        caches[kind] = CachedFeatures(keys=list(rows), features=np.stack(list(rows.values())))
    return caches


def run_training(
    config: configs.TrainConfig,
    paths: RunPaths,
    *,
    resume: bool = False,
    cache_dir: Path | None = None,
    use_feature_cache: bool = True,
    verbose: int = 1,
    on_start: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train `config` into `paths` (resuming an unfinished run there when `resume`); return the test metrics.

    The data is checked and the model built before the run directory gets its config, so a
    bad dataset or an unreachable TF Hub handle leaves no run behind; `on_start` is called
    then, just before training (train.py points runs/latest at the run there).
    """
    data_dir = Path(config.data)
    manifest = check_data(config, data_dir)
    validation_split = pick_split(manifest, VALIDATION_SPLITS, data_dir)
    test_split = pick_split(manifest, TEST_SPLITS, data_dir)
    # Before any TensorFlow op: MultiWorkerMirroredStrategy configures TensorFlow's runtime.
    placement = make_placement(
        config.placement, config_fingerprint=fingerprint(json.dumps(configs.to_dict(config), sort_keys=True) + str(paths.root))
    )
    cluster = placement.cluster

    def prepare() -> None:
        if config.model.text.tower == "bilstm":
            learn_vocabulary(data_dir, config.model.text)

    if cluster is None:
        prepare()
    else:
        paths = join_run(placement.strategy, cluster, paths, prepare)
    keras.utils.set_random_seed(config.seed)
    text_preprocessor = build_text_preprocessor(config.model.text)
    model = build_model(config, placement)
    paths.root.mkdir(parents=True, exist_ok=True)
    if resume:
        trim_log(paths.log_csv, backed_up_epochs(paths.backup))
    else:
        configs.save(config, paths.config)
    if on_start is not None:
        on_start()
    caches = (
        feature_caches(
            model, config, text_preprocessor, data_dir, [TRAIN_SPLIT, validation_split],
            worker_cache_dir(cache_root(cache_dir), cluster),
        )
        if use_feature_cache
        else {}
    )
    train_batches = pair_batches(data_dir, TRAIN_SPLIT, config, text_preprocessor, caches, training=True)
    validation_batches = pair_batches(data_dir, validation_split, config, text_preprocessor, caches, training=False)
    train_inputs, validation_inputs = model_inputs(train_batches), model_inputs(validation_batches)
    if cluster is not None:
        shards = len(manifest.split(TRAIN_SPLIT, data_dir).shards)
        print(describe(cluster, shard_mode(shards, cluster.num_workers), shards), flush=True)
        train_inputs = shard_inputs(train_inputs, shard_mode(shards, cluster.num_workers))
        validation_shards = len(manifest.split(validation_split, data_dir).shards)
        validation_inputs = shard_inputs(validation_inputs, shard_mode(validation_shards, cluster.num_workers))
    with warnings.catch_warnings():
        # Epoch length is unknown until the first epoch ends (identity batches vary in number);
        # Keras reports that end as "input ran out of data", which here is expected.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        model.fit(
            train_inputs,
            validation_data=validation_inputs,
            epochs=config.epochs,
            shuffle=False,  # the pipeline shuffles, seeded
            callbacks=[
                *worker_callbacks(placement),
                *_callbacks(paths, config, RetrievalValidation(validation_batches, caches), verbose),
            ],
            verbose=verbose,
        )
    export_encoders(
        paths.root,
        encode_images=model.encode_images,
        encode_texts=model.encode_texts,
        image_size=config.model.vision.image_size,
        text_preprocessor=text_preprocessor,
        # Each SavedModel carries only its own tower's weights.
        track_images=[model.vision_tower, model.image_head],
        track_texts=[model.text_tower, model.caption_head],
    )
    test_batches = pair_batches(data_dir, test_split, config, text_preprocessor, {}, training=False)
    metrics = retrieval_metrics(
        embed_split(test_batches.as_numpy_iterator(), model.encode_images, model.encode_texts, caption_key=TOKENS)
    )
    history = read_history(paths.log_csv)
    plot_curves(history, paths.curves)
    report = {"split": test_split, "epochs_trained": len(history.get("loss", [])), **metrics}
    write_json_atomic(paths.metrics, report)
    return report
