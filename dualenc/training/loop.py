"""One training run, start to finish: data checks, model, input pipelines, callbacks, export.

`run_training` is what `train.py` calls once it has built a `TrainConfig` from flags. It
writes everything into a run directory (see `dualenc.core.runs`): the resolved config first, then
per epoch the log, the best weights and a backup (`dualenc.training.selection`), and at the end the two
encoders exported from the best epoch, ``curves.png`` and ``metrics.json`` (retrieval on the
test split; writing it marks the run finished, and only then does the backup go).

Every epoch's batches have a known length and their own seed, so logged means are true means
and a resumed run sees the epochs an uninterrupted one would. Validation never uses the test
split: without a validation split, part of the training identities is held out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from dualenc.core import config as configs
from dualenc import losses
from dualenc.training.curves import plot_curves
from dualenc.data.pipeline import TEST_SPLITS, VALIDATION_SPLITS, verify_checksums
from dualenc.core.errors import DualEncError
from dualenc.retrieval.evaluation import embed_split, retrieval_metrics
from dualenc.export.encoders import export_encoders
from dualenc.training.feature_cache import CachedFeatures, cached_features, tower_fingerprint
from dualenc.core.files import atomic_file, write_json_atomic
from dualenc.data.images import decode_image
from dualenc.data.manifest import Manifest, load_manifest
from dualenc.models.model import CAPTION_FEATURES, IMAGE_FEATURES, TOKENS, DualEncoder, build_dual_encoder
from dualenc.distribute.multiworker import fingerprint, input_sharding, join_run, worker_cache_dir, worker_callbacks
from dualenc.data.packed import record_dataset, split_captions
from dualenc.distribute.placement import make_placement
from dualenc.models.placement import Placement
from dualenc.models.preprocessing import build_text_preprocessor
from dualenc.data.records import CAPTION, FEATURE_SPEC, IMAGE, IMAGE_ID, LABEL, parse_example
from dualenc.core.runs import RunPaths, cache_root
from dualenc.data.sampling import identity_batches
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
# `TrainConfig.validation` when the data has no validation split: part of train is held out.
HELD_OUT_VALIDATION = "train-holdout"
HOLDOUT_FRACTION = 0.1
# K of the P x K identity batches used by CMPM/CMPC (IRRA samples 4 instances per identity).
INSTANCES_PER_IDENTITY = 4


def pick_split(manifest: Manifest, preferred: tuple[str, ...], data_dir: Path) -> str:
    """The first of `preferred` that the dataset has with at least one pair."""
    for split in preferred:
        if split in manifest.splits and manifest.splits[split].pairs:
            return split
    raise DualEncError(f"{data_dir} has no non-empty split among {', '.join(preferred)}; pack one (e.g. --holdout-images)")


def validation_source(manifest: Manifest, data_dir: Path) -> str:
    """The split to validate on, never the test split (kept for the final score): the first
    non-empty validation split, else `HELD_OUT_VALIDATION`."""
    test_split = pick_split(manifest, TEST_SPLITS, data_dir)
    for split in VALIDATION_SPLITS:
        if split != test_split and split in manifest.splits and manifest.splits[split].pairs:
            return split
    return HELD_OUT_VALIDATION


@dataclasses.dataclass(frozen=True)
class Holdout:
    """Training labels set aside for validation: `kind` is "identities", or "images" when every
    image has its own label; `pairs` of the `total` training pairs carry them."""

    labels: tuple[int, ...]
    pairs: int
    total: int
    kind: str

    @property
    def description(self) -> str:
        return f"{len(self.labels)} training {self.kind} ({self.pairs} of {self.total} pairs) held out"


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


def _holdout_filter(holdout: Holdout, held_out: bool) -> Callable[[tf.Tensor], tf.Tensor]:
    """Serialised record -> whether its label is (`held_out`) or is not among the held-out labels."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(holdout.labels, tf.int64), tf.ones(len(holdout.labels), tf.int64)),
        default_value=0,
    )

    def keep(record: tf.Tensor) -> tf.Tensor:
        label = tf.io.parse_single_example(record, {LABEL: FEATURE_SPEC[LABEL]})[LABEL]
        return tf.equal(table.lookup(label), 1 if held_out else 0)

    return keep


def resolve_config(config: configs.TrainConfig, manifest: Manifest, paths: RunPaths) -> configs.TrainConfig:
    """Fill what depends on the data and the run directory: CMPC's class count, the vocabulary
    path, where validation pairs come from."""
    model = config.model
    if losses.needs_class_weights(model.loss):
        model = dataclasses.replace(model, num_classes=manifest.split(TRAIN_SPLIT, config.data).ids)
    if model.text.tower == "bilstm" and model.text.vocabulary is None:
        model = dataclasses.replace(model, text=dataclasses.replace(model.text, vocabulary=str(paths.vocabulary)))
    return dataclasses.replace(config, model=model, validation=validation_source(manifest, Path(config.data)))


def check_data(config: configs.TrainConfig, data_dir: Path) -> Manifest:
    """The manifest, after checking splits, checksums (every split used) and that one batch fits the training split."""
    manifest = load_manifest(data_dir)
    pairs = manifest.split(TRAIN_SPLIT, data_dir).pairs
    if config.batch_size > pairs:
        raise DualEncError(f"--batch-size {config.batch_size} is larger than the {pairs} training pairs in {data_dir}; lower it")
    # The test split too: a damaged one would otherwise fail only after the last epoch.
    used = {TRAIN_SPLIT, validation_source(manifest, data_dir), pick_split(manifest, TEST_SPLITS, data_dir)}
    for split in used - {HELD_OUT_VALIDATION}:
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


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch: a function of the run's seed and the epoch alone, so a
    run resumed at `epoch` shuffles it as the uninterrupted run did."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _known_length(batches: tf.data.Dataset, count: int) -> tf.data.Dataset:
    """`batches` with its length stated: Keras averages an epoch of unknown length over one step too many."""
    return batches.apply(tf.data.experimental.assert_cardinality(count))


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
    """Batches of pairs of `split` with the model's inputs, of known length (Keras' means need it).

    Training: the batches of `epochs` one after the other, each epoch shuffled by `epoch_seed`
    and exactly `len(batches) / len(epochs)` batches long (fit it with that `steps_per_epoch`).
    Losses that learn from identities (CMPM, CMPC) train on P identities x K pairs per batch;
    the others on plain shuffled batches, the last partial batch dropped. Otherwise: every
    pair once, in order. Batches also carry "caption" and "image_id" strings, which
    evaluation uses (`model_inputs` drops them for Keras). With a `holdout`, training leaves
    its labels out and evaluation takes only them.
    """
    image_size = config.model.vision.image_size
    pairs = load_manifest(data_dir).split(split, data_dir).pairs
    select = lambda records: records  # noqa: E731
    if holdout is not None:
        keep = _holdout_filter(holdout, held_out=not training)
        select = lambda records: records.filter(keep)  # noqa: E731
        pairs = pairs - holdout.pairs if training else holdout.pairs
    if training and not losses.needs_labels(config.model.loss) and pairs < config.batch_size:
        raise DualEncError(f"--batch-size {config.batch_size} is larger than the {pairs} training pairs left; lower it")
    seeds = [epoch_seed(config.seed, epoch) for epoch in epochs]
    if training and losses.needs_labels(config.model.loss):
        # Light elements (encoded bytes) are grouped by identity, then decoded per batch.
        records = select(record_dataset(data_dir, split))
        light = records.map(_pair_parser(image_size, caches, decode=False), num_parallel_calls=tf.data.AUTOTUNE)
        batches = identity_batches(
            light, max(1, config.batch_size // INSTANCES_PER_IDENTITY), INSTANCES_PER_IDENTITY, epoch_seeds=seeds
        )
        if "image" not in caches:
            decode = lambda images: tf.map_fn(  # noqa: E731
                lambda image: decode_image(image, image_size), images, fn_output_signature=tf.uint8
            )
            batches = batches.map(lambda batch: {**batch, IMAGE: decode(batch[IMAGE])}, num_parallel_calls=tf.data.AUTOTUNE)
    elif training:
        parse = _pair_parser(image_size, caches, decode=True)
        one_epoch = [
            _known_length(
                select(record_dataset(data_dir, split, shuffle=True, seed=seed))
                .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(config.batch_size, drop_remainder=True),
                pairs // config.batch_size,
            )
            for seed in seeds
        ]
        batches = functools.reduce(tf.data.Dataset.concatenate, one_epoch)
    else:
        pairs_dataset = select(record_dataset(data_dir, split)).map(_pair_parser(image_size, caches, decode=True),
                                                            num_parallel_calls=tf.data.AUTOTUNE)
        batches = _known_length(pairs_dataset.batch(config.batch_size), -(-pairs // config.batch_size))
    batches = batches.map(_with_tokens(text_preprocessor, caches), num_parallel_calls=tf.data.AUTOTUNE)
    return batches.prefetch(tf.data.AUTOTUNE)


def compiled_encoders(model: DualEncoder) -> tuple[Callable, Callable]:
    """The model's `encode_images` and `encode_texts` as graphs. Called eagerly batch by batch, the
    demo's BiLSTM embedded its validation pairs five times slower than a Keras evaluation pass
    over the same pairs (measured: 18.9 s against 3.4 s an epoch, 3,000 demo identities)."""
    return tf.function(model.encode_images, reduce_retracing=True), tf.function(model.encode_texts, reduce_retracing=True)


class RetrievalValidation(keras.callbacks.Callback):
    """Adds validation R@1/5/10 and mAP in both directions to each epoch's logs (``val_t2i_r1`` …).

    Listed first among the callbacks, so the CSV log, checkpoints and curves see the values.
    """

    def __init__(self, batches: tf.data.Dataset, caches: dict[str, CachedFeatures]):
        super().__init__()
        self.batches = batches
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


def _callbacks(paths: RunPaths, config: configs.TrainConfig, validation: RetrievalValidation,
               selection: ModelSelection, verbose: int) -> list:
    callbacks = [
        validation,
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.TensorBoard(str(paths.tensorboard), write_graph=False),
    ]
    if verbose:
        callbacks.append(EpochSummary(config.epochs))
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
    """The compiled dual encoder for `config` (placement, mixed precision, AdamW), built under
    `precision_policy` so the caller's global policy is left as it was."""
    placement = placement if placement is not None else make_placement(config.placement)
    with precision_policy(config.mixed_precision), placement.scope():
        model = build_dual_encoder(config.model, placement)
        model.compile(
            optimizer=keras.optimizers.AdamW(learning_rate=config.learning_rate, weight_decay=config.weight_decay)
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
    shard: Callable[[tf.data.Dataset, str], tf.data.Dataset] | None = None,
) -> SelectionState:
    """Fit the epochs the run still lacks (from the newest backup when `resume`); the run's final state.

    A backup whose state has stopped, or has every epoch, trains nothing: an export killed
    after the last epoch is redone without retraining. Under "multi-worker" `shard` gives each
    split's inputs their sharding ("train" or "validation"), and `placement`'s callbacks run first.
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
    shard = shard or (lambda dataset, role: dataset)
    model.fit(
        shard(model_inputs(train_batches), "train"),
        validation_data=shard(model_inputs(validation.batches), "validation"),
        initial_epoch=epochs.start,
        epochs=config.epochs,
        # One pass over the stream is the rest of the run, each epoch in its own seeded order.
        steps_per_epoch=int(train_batches.cardinality()) // len(epochs),
        shuffle=False,
        callbacks=[*worker_callbacks(placement), *_callbacks(paths, config, validation, selection, verbose)],
        verbose=verbose,
    )
    return selection.state


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
) -> dict[str, float]:
    """Train `config` into `paths` (resuming an unfinished run there when `resume`); return the test metrics.

    The data is checked and the model built before the run directory gets its config, so a
    bad dataset or an unreachable TF Hub handle leaves no run behind; `on_start` is called
    then, just before training (train.py points runs/latest at the run there). `schedule`
    defaults to `Schedule.following(config.monitor)`. The encoders are exported from the best
    epoch of the whole run; the backup is kept until ``metrics.json`` marks the run finished.
    """
    data_dir = Path(config.data)
    manifest = check_data(config, data_dir)
    test_split = pick_split(manifest, TEST_SPLITS, data_dir)
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
        caches = (
            feature_caches(model, config, text_preprocessor, data_dir, sorted({TRAIN_SPLIT, validation_split}),
                           worker_cache_dir(cache_root(cache_dir), cluster))
            if use_feature_cache
            else {}
        )
        validation = RetrievalValidation(
            pair_batches(data_dir, validation_split, config, text_preprocessor, caches, training=False, holdout=holdout), caches
        )
        state = train_epochs(
            model, config, paths,
            lambda epochs: pair_batches(data_dir, TRAIN_SPLIT, config, text_preprocessor, caches, training=True, epochs=epochs,
                                        holdout=holdout),
            validation, schedule or Schedule.following(config.monitor), resume=resume, verbose=verbose,
            placement=placement, shard=input_sharding(cluster, manifest, data_dir, (TRAIN_SPLIT, validation_split)),
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
    test_batches = pair_batches(data_dir, test_split, config, text_preprocessor, {}, training=False)
    metrics = retrieval_metrics(embed_split(test_batches.as_numpy_iterator(), *compiled_encoders(model), caption_key=TOKENS))
    if state is not None:
        plot_curves(history_columns(state.history), paths.curves)
        with atomic_file(paths.best_weights) as staging:
            shutil.copyfile(best_weights, staging)
    report = {
        "split": test_split,
        "validation": validation_split if holdout is None else holdout.description,
        "epochs_trained": 0 if state is None else state.epochs_done,
        "best_epoch": None if state is None else state.best_epoch + 1,
        **metrics,
    }
    write_json_atomic(paths.metrics, report)
    if state is not None:
        # Finished: what a resume would need goes.
        shutil.rmtree(paths.backup)
        best_weights.unlink()
    return report
