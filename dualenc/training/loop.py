"""One training run, start to finish: data checks, model, input pipelines, callbacks, export.

`run_training` is what `train.py` calls once it has built a `TrainConfig` from flags. It
writes everything into a run directory (see `dualenc.core.runs`): the resolved config first, then
per epoch the log, the best weights and a backup (`dualenc.training.selection`), and at the end the two
encoders exported from the best epoch, ``curves.png`` and ``metrics.json`` (the test split
scored through the exported encoders, exactly as ``search.py --evaluate`` scores it; writing it
marks the run finished, and only then does the backup go).

Every epoch's batches have a known length and their own seed, so logged means are true means
and a resumed run sees the epochs an uninterrupted one would. Validation never uses the test
split: without a validation split, part of the training identities is held out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import keras
import numpy as np
import tensorflow as tf

from dualenc.core import config as configs
from dualenc import losses
from dualenc.training.curves import plot_curves
from dualenc.data import pipeline
from dualenc.data.augment import sides_named
from dualenc.data.pipeline import Holdout, decoded_pixels, epoch_seed, verify_checksums
from dualenc.core.errors import DualEncError
from dualenc.retrieval.evaluation import SplitEmbeddings, embed_split, evaluate_split, retrieval_metrics
from dualenc.retrieval.gallery import PackedGallery
from dualenc.retrieval.index import open_index
from dualenc.export.encoders import TEXT_ENCODER_DIR, export_encoders, load_encoder
from dualenc.training.optimizer import PartwiseAdamW, StepSchedule, unwrapped_optimizer
from dualenc.training.feature_cache import CachedFeatures, cached_features, tower_fingerprint
from dualenc.core.files import atomic_file, write_json_atomic
from dualenc.data.manifest import TEST_SPLITS, Manifest, default_split, load_manifest
from dualenc.models.model import (CAPTION_FEATURES, IMAGE_FEATURES, TOKENS, DualEncoder, build_dual_encoder,
                                  in_batch_recall_at_1)
from dualenc.distribute.multiworker import fingerprint, input_sharding, join_run, worker_cache_dir, worker_callbacks
from dualenc.data.packed import split_captions
from dualenc.distribute.placement import make_placement
from dualenc.models.placement import Placement
from dualenc.models.preprocessing import build_text_preprocessor
from dualenc.data.records import CAPTION, IMAGE, IMAGE_ID
from dualenc.core.runs import RunPaths, cache_root
from dualenc.training.selection import (
    ModelSelection,
    Schedule,
    SelectionState,
    best_weights_path,
    restore_backup,
    write_log,
)
from dualenc.models.vocabulary import learn_wordpiece_vocabulary

TRAIN_SPLIT = "train"
# Split names a run validates on, in order of preference (the test split excepted).
VALIDATION_SPLITS = ("val", "valid", "validation", "test")
# `TrainConfig.validation` when the data has no validation split: part of train is held out.
HELD_OUT_VALIDATION = "train-holdout"
HOLDOUT_FRACTION = 0.1
# The caches' key for decoded pixels (`dualenc.data.pipeline.decoded_pixels`), beside frozen
# towers' "image" and "caption" features.
PIXELS = "pixels"
# K of the P x K identity batches used by CMPM/CMPC (IRRA samples 4 instances per identity).
INSTANCES_PER_IDENTITY = 4


def scored_split(manifest: Manifest, data_dir: Path) -> str:
    """The split a run is finally scored on: `default_split`, the one ``search.py --evaluate``
    also takes, but never the training split (its score would say nothing)."""
    split = default_split(manifest, data_dir)
    if split == TRAIN_SPLIT:
        raise DualEncError(f"{data_dir} has no non-empty split among {', '.join(TEST_SPLITS)} to score the run on; "
                           "pack one (e.g. --holdout-images)")
    return split


def validation_source(manifest: Manifest, data_dir: Path) -> str:
    """The split to validate on, never the test split (kept for the final score): the first
    non-empty validation split, else `HELD_OUT_VALIDATION`."""
    scored = scored_split(manifest, data_dir)
    for split in VALIDATION_SPLITS:
        if split != scored and split in manifest.splits and manifest.splits[split].pairs:
            return split
    return HELD_OUT_VALIDATION


def choose_holdout(data_dir: Path, manifest: Manifest, seed: int) -> Holdout:
    """`HOLDOUT_FRACTION` of the training labels (at least one), drawn with `seed`."""
    summary = manifest.split(TRAIN_SPLIT, data_dir)
    labels = split_captions(data_dir, TRAIN_SPLIT).labels
    distinct = np.unique(labels)
    kind = "images" if summary.ids == summary.images else "identities"
    if len(distinct) < 2:
        raise DualEncError(
            f"{data_dir} has no validation split and only one training label to hold out for one; "
            "pack a validation split (e.g. --holdout-images)"
        )
    count = max(1, round(len(distinct) * HOLDOUT_FRACTION))
    chosen = np.sort(np.random.default_rng(seed).choice(distinct, size=count, replace=False))
    return Holdout(tuple(int(label) for label in chosen), int(np.isin(labels, chosen).sum()), len(labels), kind)


def resolve_config(config: configs.TrainConfig, manifest: Manifest, paths: RunPaths) -> configs.TrainConfig:
    """Fill what depends on the data and the run directory: CMPC's class count, the vocabulary
    path, where validation pairs come from."""
    model = config.model
    if losses.needs_class_weights(model.loss):
        model = dataclasses.replace(model, num_classes=manifest.split(TRAIN_SPLIT, config.data).ids)
    if model.text.tower == "bilstm" and model.text.vocabulary is None:
        model = dataclasses.replace(model, text=dataclasses.replace(model.text, vocabulary=str(paths.vocabulary)))
    return dataclasses.replace(config, model=model, validation=validation_source(manifest, Path(config.data)))


def training_augment(config: configs.TrainConfig, data_dir: Path, verbose: int) -> configs.AugmentConfig:
    """The augmentation training applies: ``config.augment``, with flips off (and a line saying
    so) when the training captions name a side ("a bag on her left shoulder"), which a mirrored
    picture would contradict. Reads the captions with TensorFlow, so it runs once the run's
    strategy exists (a multi-worker strategy must configure TensorFlow's runtime first)."""
    if not config.augment.flip or not sides_named(split_captions(data_dir, TRAIN_SPLIT).captions):
        return config.augment
    if verbose:
        print(f"the training captions in {data_dir} name left or right: training images are not flipped", flush=True)
    return dataclasses.replace(config.augment, flip=False)


def check_data(config: configs.TrainConfig, data_dir: Path) -> Manifest:
    """The manifest, after checking splits, checksums (every split used) and that one batch fits the training split."""
    manifest = load_manifest(data_dir)
    pairs = manifest.split(TRAIN_SPLIT, data_dir).pairs
    if config.batch_size > pairs:
        raise DualEncError(f"--batch-size {config.batch_size} is larger than the {pairs} training pairs in {data_dir}; lower it")
    # The test split too: a damaged one would otherwise fail only after the last epoch.
    used = {TRAIN_SPLIT, validation_source(manifest, data_dir), scored_split(manifest, data_dir)}
    for split in used - {HELD_OUT_VALIDATION}:
        verify_checksums(data_dir, split)
    return manifest


def _frozen(config: configs.TrainConfig) -> dict[str, bool]:
    """Which towers' features can be cached: frozen ones, and for images only when training
    does not augment them (augmented pixels go through the tower every time)."""
    model = config.model
    return {"image": not model.vision.trainable and not config.augment.images, "caption": not model.text.trainable}


def _cached_image_inputs(caches: dict[str, CachedFeatures]):
    """Parsed record -> its image's cached features (a frozen tower's), or its decoded pixels
    (`PIXELS`), in place of decoding the image; None when neither is cached."""
    if "image" in caches:
        return lambda features: {IMAGE_FEATURES: caches["image"].lookup(features[IMAGE_ID])}
    if PIXELS in caches:
        return lambda features: {IMAGE: caches[PIXELS].lookup(features[IMAGE_ID])}
    return None


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


def pipeline_arguments(
    config: configs.TrainConfig,
    text_preprocessor: Callable,
    caches: dict[str, CachedFeatures],
    *,
    training: bool,
    epochs: range = range(1),
) -> dict:
    """What a run passes `dualenc.data.pipeline.pair_batches` besides the data, split and holdout:
    `config`'s image and batch size, each of `epochs` shuffled by `epoch_seed`, P x K identity
    batches for losses that learn from identities (CMPM, CMPC, SDM), cached features in place of
    a frozen tower's inputs, the captions' tokens, and the run's augmentation of training
    batches. ``bench/pipeline.py`` times the pipeline with these arguments too."""
    return {
        "image_size": config.model.vision.image_size,
        "batch_size": config.batch_size,
        "training": training,
        "epoch_seeds": [epoch_seed(config.seed, epoch) for epoch in epochs],
        "instances_per_identity": INSTANCES_PER_IDENTITY if losses.needs_labels(config.model.loss) else None,
        "image_inputs": _cached_image_inputs(caches),
        "batch_inputs": _with_tokens(text_preprocessor, caches),
        "augment": config.augment,
    }


def pair_batches(
    data_dir: Path,
    split: str,
    config: configs.TrainConfig,
    text_preprocessor: Callable,
    caches: dict[str, CachedFeatures],
    *,
    training: bool,
    epochs: range = range(1),
    holdout: Holdout | None = None,
) -> tf.data.Dataset:
    """The run's batches of `split`: `dualenc.data.pipeline.pair_batches` with `pipeline_arguments`.

    Training: the batches of `epochs` one after the other (fit them with ``steps_per_epoch =
    len(batches) / len(epochs)``). Batches also carry "caption" and "image_id" strings, which
    evaluation uses (`model_inputs` drops them for Keras).
    """
    arguments = pipeline_arguments(config, text_preprocessor, caches, training=training, epochs=epochs)
    return pipeline.pair_batches(data_dir, split, holdout=holdout, **arguments)


def compiled_encoders(model: DualEncoder) -> tuple[Callable, Callable]:
    """The model's `encode_images` and `encode_texts` as graphs. Called eagerly batch by batch, the
    demo's BiLSTM embedded its validation pairs five times slower than a Keras evaluation pass
    over the same pairs (measured: 18.9 s against 3.4 s an epoch, 3,000 demo identities)."""
    return tf.function(model.encode_images, reduce_retracing=True), tf.function(model.encode_texts, reduce_retracing=True)


class RetrievalValidation(keras.callbacks.Callback):
    """The epoch's whole validation, from one pass over the validation pairs: R@1/5/10 and mAP in
    both directions (``val_t2i_r1`` …), and the loss and in-batch R@1 of each batch of
    `batch_size` pairs in packing order (``val_loss``, ``val_r1_t2i``, ``val_r1_i2t``: what a
    Keras validation pass over `batches` reports), all added to the epoch's logs.

    One pass instead of Keras' own plus this one: embedding the split is the costly part, and the
    batch losses follow from the same embeddings (each image is embedded once, at its first pair).
    Listed first among the callbacks, so the CSV log, checkpoints and curves see the values.
    """

    def __init__(self, batches: tf.data.Dataset, caches: dict[str, CachedFeatures], batch_size: int):
        super().__init__()
        self.batches = batches
        self.batch_size = batch_size
        self.image_key = IMAGE_FEATURES if "image" in caches else IMAGE
        self.caption_key = CAPTION_FEATURES if "caption" in caches else TOKENS

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        self._encode_images, self._encode_texts = compiled_encoders(model)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        embeddings = embed_split(
            self.batches.as_numpy_iterator(),
            self._encode_images,
            self._encode_texts,
            image_key=self.image_key,
            caption_key=self.caption_key,
        )
        if logs is not None:
            logs.update({f"val_{name}": value for name, value in retrieval_metrics(embeddings).items()})
            logs.update(self._batch_scores(embeddings))

    def _batch_scores(self, embeddings: SplitEmbeddings) -> dict[str, float]:
        rows = {image_id: row for row, image_id in enumerate(embeddings.image_ids)}
        pair_images = embeddings.image_embeddings[[rows[image_id] for image_id in embeddings.caption_image_ids]]
        scores: dict[str, list[float]] = {"val_loss": [], "val_r1_t2i": [], "val_r1_i2t": []}
        for start in range(0, len(pair_images), self.batch_size):
            captions = tf.constant(embeddings.caption_embeddings[start:start + self.batch_size])
            images = tf.constant(pair_images[start:start + self.batch_size])
            labels = tf.constant(embeddings.caption_labels[start:start + self.batch_size], tf.int64)
            scores["val_loss"].append(float(self.model.pair_loss(captions, images, labels)))
            scores["val_r1_t2i"].append(float(in_batch_recall_at_1(captions, images, labels, labels)))
            scores["val_r1_i2t"].append(float(in_batch_recall_at_1(images, captions, labels, labels)))
        return {name: float(np.mean(values)) for name, values in scores.items()}


def keras_verbosity(verbose: int, stream: TextIO) -> int:
    """`model.fit`'s ``verbose`` for a run's `verbose` (0 quiet, else show progress) printing to
    `stream`: Keras' progress bar (1) on a terminal; elsewhere (CI logs, nohup, a pipe) one plain
    line per epoch (2), since the bar redraws itself with carriage returns and ANSI colour codes."""
    if not verbose:
        return 0
    return 1 if stream.isatty() else 2


class EpochSummary(keras.callbacks.Callback):
    """One line per epoch: losses and validation recall, for logs that outlive the progress bar.

    `mid_line`: Keras' progress bar (``verbose=1``) is still mid-line when the epoch ends (it
    finishes after user callbacks), so the summary starts on a new line.
    """

    def __init__(self, epochs: int, mid_line: bool):
        super().__init__()
        self.epochs = epochs
        self.mid_line = mid_line

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        parts = [f"epoch {epoch + 1}/{self.epochs}"]
        for key, label in (("loss", "loss"), ("val_loss", "val_loss"), ("val_t2i_r1", "t2i R@1"),
                           ("val_t2i_r10", "t2i R@10"), ("val_i2t_r1", "i2t R@1")):
            if key in logs:
                parts.append(f"{label} {float(logs[key]):.3f}" if "loss" in key else f"{label} {float(logs[key]):.1f}%")
        print(("\n" if self.mid_line else "") + " | ".join(parts), flush=True)


def _callbacks(paths: RunPaths, config: configs.TrainConfig, validation: RetrievalValidation,
               selection: ModelSelection, keras_verbose: int) -> list:
    callbacks = [
        validation,
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.TensorBoard(str(paths.tensorboard), write_graph=False),
    ]
    if keras_verbose:
        callbacks.append(EpochSummary(config.epochs, mid_line=keras_verbose == 1))
    # Last: it commits the epoch once everything else has seen it.
    return callbacks + [selection]


def history_columns(history: tuple[dict[str, float], ...]) -> dict[str, list[float]]:
    """Per-epoch logs as one list per logged name (what `plot_curves` takes)."""
    columns: dict[str, list[float]] = {}
    for logs in history:
        for key, value in logs.items():
            columns.setdefault(key, []).append(value)
    return columns


def learn_vocabulary(data_dir: Path, text: configs.TextConfig) -> None:
    """Learn the BiLSTM's WordPiece vocabulary from the training captions (once per run)."""
    path = Path(text.vocabulary)
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    captions = split_captions(data_dir, TRAIN_SPLIT).captions
    learn_wordpiece_vocabulary(captions, text.vocab_size, path)


@contextlib.contextmanager
def precision_policy(mixed_precision: bool) -> Iterator[None]:
    """Keras' global dtype policy for the block ("mixed_float16" or "float32"), then the one before.

    The policy is process-wide; layers take it when they are created and keep it, so it is
    needed only while the model is built.
    """
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed_precision else "float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def build_model(config: configs.TrainConfig, placement: Placement | None = None) -> DualEncoder:
    """The compiled dual encoder for `config` (placement, mixed precision, `PartwiseAdamW`), built under
    `precision_policy` so the caller's global policy is left as it was."""
    placement = placement if placement is not None else make_placement(config.placement)
    with precision_policy(config.mixed_precision), placement.scope():
        model = build_dual_encoder(config.model, placement)
        model.compile(
            optimizer=PartwiseAdamW(
                config.learning_rate,
                config.weight_decay,
                # All of each tower's weights, so a tower unfrozen later still counts as one.
                tower_variables=[*model.vision_tower.weights, *model.text_tower.weights],
                head_lr_multiplier=config.head_lr_multiplier,
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
    for kind, frozen in _frozen(config).items():
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


def train_epochs(
    model: DualEncoder,
    config: configs.TrainConfig,
    paths: RunPaths,
    train: Callable[[range], tf.data.Dataset],
    validation: RetrievalValidation,
    schedule: Schedule,
    *,
    resume: bool,
    verbose: int,
    placement: Placement | None = None,
    shard: Callable[[tf.data.Dataset], tf.data.Dataset] | None = None,
) -> SelectionState:
    """Fit the epochs the run still lacks (from the newest backup when `resume`); the run's final state.

    A backup whose state has stopped, or has every epoch, trains nothing: an export killed
    after the last epoch is redone without retraining. Under "multi-worker" `shard` gives the
    training inputs their sharding, and `placement`'s callbacks run first; each worker validates
    on the whole validation split (`RetrievalValidation`).
    """
    # In the strategy's scope: restoring builds the optimizer, whose variables a strategy must create.
    with placement.scope() if placement is not None else contextlib.nullcontext():
        state = (restore_backup(paths.backup, model) if resume else None) or SelectionState(config.learning_rate)
    # Drops the rows of epochs logged after the backup, which are trained again.
    write_log(paths.log_csv, state.history)
    epochs = range(state.epochs_done, config.epochs)
    if state.stopped or not epochs:
        return state
    selection = ModelSelection(schedule, state, backup_dir=paths.backup, checkpoints=paths.best_weights.parent,
                               log_csv=paths.log_csv)
    train_batches = train(epochs)
    # One pass over the stream is the rest of the run, each epoch in its own seeded order.
    steps_per_epoch = int(train_batches.cardinality()) // len(epochs)
    # Set before `fit` traces the step: the schedule is fixed for the whole run.
    unwrapped_optimizer(model).step_schedule = StepSchedule.for_run(config, steps_per_epoch)
    shard = shard or (lambda dataset: dataset)
    keras_verbose = keras_verbosity(verbose, sys.stdout)
    model.fit(
        shard(model_inputs(train_batches)),
        initial_epoch=epochs.start,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        shuffle=False,
        callbacks=[*worker_callbacks(placement), *_callbacks(paths, config, validation, selection, keras_verbose)],
        verbose=keras_verbose,
    )
    return selection.state


def selection_schedule(config: configs.TrainConfig) -> Schedule:
    """How `config`'s run selects and stops: following ``config.monitor``, with the plateau
    cuts of the learning rate under the "constant" schedule only (a cosine already decays it)."""
    if config.schedule == "cosine":
        return Schedule.following(config.monitor, lr_factor=1.0)
    return Schedule.following(config.monitor)


def score_run(run_dir: Path, data_dir: Path, split: str) -> dict:
    """The run's retrieval report on `split` (`evaluate_split`), asked as ``search.py --evaluate``
    asks it: the exported text encoder against the split's index, built with the exported vision
    encoder (`open_index`) and kept in the run, so a later search of the split reuses it."""
    index = open_index(run_dir, PackedGallery(data_dir, split))
    text_encoder = load_encoder(run_dir / TEXT_ENCODER_DIR)
    return evaluate_split(text_encoder, data_dir, split, index.embeddings, index.labels, index.image_ids)


def run_training(
    config: configs.TrainConfig,
    paths: RunPaths,
    *,
    resume: bool = False,
    cache_dir: Path | None = None,
    use_feature_cache: bool = True,
    verbose: int = 1,
    on_start: Callable[[], None] | None = None,
    schedule: Schedule | None = None,
) -> dict:
    """Train `config` into `paths` (resuming an unfinished run there when `resume`); return the
    report written to ``metrics.json``: `score_run` on the test split, and how training went.

    The data is checked and the model built before the run directory gets its config, so a
    bad dataset or an unreachable TF Hub handle leaves no run behind; `on_start` is called
    then, just before training (train.py points runs/latest at the run there). `schedule`
    defaults to `selection_schedule(config)`. The encoders are exported from the best
    epoch of the whole run; the backup is kept until ``metrics.json`` marks the run finished.
    """
    data_dir = Path(config.data)
    manifest = check_data(config, data_dir)
    test_split = scored_split(manifest, data_dir)
    validation_split = validation_source(manifest, data_dir)
    holdout = None
    if validation_split == HELD_OUT_VALIDATION:
        holdout, validation_split = choose_holdout(data_dir, manifest, config.seed), TRAIN_SPLIT
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
    if not resume:
        configs.save(config, paths.config)
    if on_start is not None:
        on_start()
    if holdout is not None and verbose:
        print(f"{data_dir} has no validation split: validating on {holdout.description} from training; "
              f"the {test_split} split is kept for the final score", flush=True)
    if config.epochs == 0:
        # Zero-shot: the towers are exported and scored as they start (a pretrained preset).
        state = best_weights = None
    else:
        splits = sorted({TRAIN_SPLIT, validation_split})
        caches = (
            feature_caches(model, config, text_preprocessor, data_dir, splits, worker_cache_dir(cache_root(cache_dir), cluster))
            if use_feature_cache
            else {}
        )
        if "image" not in caches:
            pixels = decoded_pixels(data_dir, splits, config.model.vision.image_size)
            if pixels is not None:
                caches[PIXELS] = CachedFeatures(*pixels)
        validation = RetrievalValidation(
            pair_batches(data_dir, validation_split, config, text_preprocessor, caches, training=False, holdout=holdout),
            caches, config.batch_size,
        )
        augmented = dataclasses.replace(config, augment=training_augment(config, data_dir, verbose))
        state = train_epochs(
            model, config, paths,
            lambda epochs: pair_batches(data_dir, TRAIN_SPLIT, augmented, text_preprocessor, caches, training=True,
                                        epochs=epochs, holdout=holdout),
            validation, schedule or selection_schedule(config), resume=resume, verbose=verbose,
            placement=placement, shard=input_sharding(cluster, manifest, data_dir, TRAIN_SPLIT),
        )
        if state.best_epoch is None:
            raise DualEncError(f"no epoch gave a usable {config.monitor} (NaN); lower --learning-rate and start a new run")
        best_weights = best_weights_path(paths.best_weights.parent, state.best_epoch)
        model.load_weights(best_weights)
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
    scores = score_run(paths.root, data_dir, test_split)
    if state is not None:
        plot_curves(history_columns(state.history), paths.curves)
        with atomic_file(paths.best_weights) as staging:
            shutil.copyfile(best_weights, staging)
    report = {
        **scores,
        "validation": validation_split if holdout is None else holdout.description,
        "epochs_trained": 0 if state is None else state.epochs_done,
        "best_epoch": None if state is None else state.best_epoch + 1,
    }
    write_json_atomic(paths.metrics, report)
    if state is not None:
        # Finished: what a resume would need goes.
        shutil.rmtree(paths.backup)
        best_weights.unlink()
    return report
