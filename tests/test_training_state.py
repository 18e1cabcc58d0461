"""Honest training state (issue 12): logged means are true means, resume replays the same run,
the exported weights are the selected ones, the temperature is bounded, the precision policy
is restored, and a dataset without a validation split validates on held-out training pairs.

Runs call `run_training` in-process on the tiny packed demo with a frozen small CNN; the model
that is exported is captured for comparison with independent references. Training is the
costly part: three tests inspect one short run (`held_out_run`), and runs whose export no
test reads skip it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tests.support.training import csv_rows


def _tiny_config(data_dir: Path, dropout: float = 0.0, **changes):
    from dualenc.training.presets import preset

    config = preset("demo")
    model = dataclasses.replace(
        config.model,
        vision=dataclasses.replace(config.model.vision, trainable=False, image_size=(64, 32)),
        text=dataclasses.replace(config.model.text, vocab_size=200, embedding_dim=16, lstm_units=16, max_tokens=24),
        projection_dim=32,
        dropout=dropout,
    )
    return dataclasses.replace(config, model=model, data=str(data_dir), batch_size=8, **changes)


def _train(config, run_dir: Path, *, export: bool = True, **kwargs):
    """`run_training` into `run_dir`; returns (report, the DualEncoder it exported, the resolved config).

    `export=False` for a run whose encoders no test loads: the model is kept, but not exported
    (seconds of SavedModels and TFLite), and the report lacks the scores read from the export.
    """
    import dualenc.training.loop
    from dualenc.core.runs import RunPaths

    paths = RunPaths(run_dir)
    config = dualenc.training.loop.resolve_config(config, dualenc.training.loop.load_manifest(config.data), paths)
    exported = {}
    export_encoders = dualenc.training.loop.export_encoders

    def export_and_keep(root, **arguments):
        exported["model"] = arguments["encode_images"].__self__
        if export:
            export_encoders(root, **arguments)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dualenc.training.loop, "export_encoders", export_and_keep)
        if not export:
            patch.setattr(dualenc.training.loop, "score_run", lambda *arguments: {})
        report = dualenc.training.loop.run_training(config, paths, **{"verbose": 0, **kwargs})
    return report, exported["model"], config


def _mean_loss(model, config, batches) -> float:
    """The loss of every batch from the model's embeddings, averaged in float64 by NumPy."""
    from dualenc import losses
    from dualenc.training.loop import model_inputs

    values = []
    for batch in model_inputs(batches):
        caption_embeddings, image_embeddings = model(batch, training=False)
        values.append(float(losses.dual_encoder_loss(
            config.model.loss, image_embeddings=image_embeddings, caption_embeddings=caption_embeddings,
            labels=batch["label"], temperature=model.temperature, class_weights=model.class_weights)))
    return float(np.mean(np.asarray(values, np.float64)))


# --- one short run, three questions ------------------------------------------------------------

# Every augmentation, and strongly: the exported encoders must carry none of it.
HEAVY_AUGMENT = {"flip": True, "translate": 0.2, "erase": 0.9, "token_dropout": 0.5}


@dataclasses.dataclass
class HeldOutRun:
    """`held_out_run`: its data and run directory, the pair batches it asked for (split,
    training, holdout), what it printed, its report, the model it exported and its resolved config."""

    data: Path
    run_dir: Path
    requested: list[tuple]
    out: str
    report: dict
    model: object
    config: object

    @property
    def holdout(self):
        """The training identities held out for validation (the first batches asked for are those)."""
        return self.requested[0][2]


@pytest.fixture(scope="module")
def held_out_run(demo_data, tmp_path_factory) -> HeldOutRun:
    """One epoch on the demo without its validation split, shared by three tests that each need
    a finished run: whether logged means are true means, where a run without a validation split
    validates, and whether augmentation stays out of the export. The run is trained with
    `HEAVY_AUGMENT` at a rate so small the weights stay put, so the epoch's train mean is the
    mean loss of its batches under the final weights (no dropout; the frozen CNN is in
    inference mode), and without the feature cache, so training embeds as evaluation does."""
    import contextlib
    import io
    import json

    import dualenc.training.loop
    from dualenc.core.config import AugmentConfig
    from tests.support.training import copy_dataset, write_json

    root = tmp_path_factory.mktemp("held_out")
    data = copy_dataset(demo_data, root / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["splits"]["val"]
    write_json(data / "manifest.json", manifest)

    requested = []
    pair_batches = dualenc.training.loop.pair_batches

    def recording(data_dir, split, config, *args, **kwargs):
        requested.append((split, kwargs["training"], kwargs.get("holdout")))
        return pair_batches(data_dir, split, config, *args, **kwargs)

    config = _tiny_config(data, epochs=1, learning_rate=1e-9, augment=AugmentConfig(**HEAVY_AUGMENT))
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setattr(dualenc.training.loop, "pair_batches", recording)
        report, model, config = _train(config, root / "run", verbose=1, use_feature_cache=False)
    return HeldOutRun(data, root / "run", requested, out.getvalue(), report, model, config)


@pytest.mark.slow
def test_logged_epoch_means_equal_a_separate_evaluation(held_out_run):
    from dualenc.models.preprocessing import build_text_preprocessor
    from dualenc.training.loop import model_inputs, pair_batches, training_augment

    model, config, holdout = held_out_run.model, held_out_run.config, held_out_run.holdout
    data = Path(config.data)
    # Several validation batches, the last one short: the logged value is a mean of batch losses.
    assert holdout.pairs > config.batch_size and holdout.pairs % config.batch_size
    row = csv_rows(held_out_run.run_dir / "training_log.csv")[0]
    text_preprocessor = build_text_preprocessor(config.model.text)
    # The epoch's batches drawn again: their augmentation is a function of the epoch's seed.
    augmented = dataclasses.replace(config, augment=training_augment(config, data, verbose=0))
    train = pair_batches(data, "train", augmented, text_preprocessor, {}, training=True, epochs=range(1),
                         holdout=holdout)
    validation = pair_batches(data, "train", config, text_preprocessor, {}, training=False, holdout=holdout)
    assert float(row["loss"]) == pytest.approx(_mean_loss(model, config, train), rel=1e-4)
    assert float(row["val_loss"]) == pytest.approx(_mean_loss(model, config, validation), rel=1e-4)
    evaluated = model.evaluate(model_inputs(validation), return_dict=True, verbose=0)
    assert float(row["val_loss"]) == pytest.approx(evaluated["loss"], rel=1e-5)
    assert float(row["val_r1_t2i"]) == pytest.approx(evaluated["r1_t2i"], rel=1e-5)


@pytest.mark.slow
def test_augmented_training_leaves_the_exported_encoders_deterministic_and_unaugmented(held_out_run):
    from dualenc.data.images import decode_image
    from dualenc.data.packed import read_batches
    from dualenc.export.encoders import TEXT_ENCODER_DIR, VISION_ENCODER_DIR, load_encoder
    from dualenc.models.preprocessing import build_text_preprocessor

    model, config = held_out_run.model, held_out_run.config
    batch = next(read_batches(Path(config.data), "test", ("image", "caption"), batch_size=16))
    images = [bytes(image) for image in batch["image"]]
    captions = [caption.decode("utf-8") for caption in batch["caption"]]
    vision = load_encoder(held_out_run.run_dir / VISION_ENCODER_DIR)
    text = load_encoder(held_out_run.run_dir / TEXT_ENCODER_DIR)
    pixels = np.stack([decode_image(image, config.model.vision.image_size).numpy() for image in images])
    tokens = build_text_preprocessor(config.model.text)(np.array(captions))
    # The same answer every time, and the model's answer on the images and captions as they are.
    for _ in range(2):
        np.testing.assert_allclose(vision(images), np.asarray(model.encode_images(pixels)), atol=1e-5)
        np.testing.assert_allclose(text(captions), np.asarray(model.encode_texts(tokens)), atol=1e-5)


# --- resume: the same run as without the interruption ------------------------------------------

RESUME_EPOCHS = 8
# Short patience, so that a few epochs see the rate cut and the run stop early (the tiny run's
# validation loss creeps down by thousandths for epochs after the warm-up).
SHORT_SCHEDULE = {"lr_patience": 1, "stop_patience": 3, "min_delta": 0.005}


class Interrupted(Exception):
    """Stands in for a kill: raised where the process would have died."""


def _test_embeddings(model, config):
    from dualenc.models.preprocessing import build_text_preprocessor
    from dualenc.training.loop import model_inputs, pair_batches

    batches = pair_batches(Path(config.data), "test", config, build_text_preprocessor(config.model.text), {}, training=False)
    images, captions = [], []
    for batch in model_inputs(batches):
        captions_part, images_part = model(batch, training=False)
        images.append(np.asarray(images_part))
        captions.append(np.asarray(captions_part))
    return np.concatenate(images), np.concatenate(captions)


def _log_columns(run_dir: Path) -> dict[str, np.ndarray]:
    rows = csv_rows(run_dir / "training_log.csv")
    return {key: np.array([float(row[key]) for row in rows]) for key in rows[0]}


@pytest.mark.slow
def test_a_run_interrupted_after_its_best_epoch_and_during_export_resumes_to_the_same_result(demo_data, tmp_path):
    import dualenc.training.selection
    import dualenc.training.loop
    from dualenc.training.selection import Schedule

    from dualenc.core.config import AugmentConfig

    # Dropout and every augmentation on, and a warm-up: a resumed run must draw the masks and
    # augmentations the uninterrupted one drew, and take the rates it took at each step.
    config = _tiny_config(demo_data, dropout=0.2, epochs=RESUME_EPOCHS, seed=3, monitor="val_loss", schedule="constant",
                          warmup_epochs=1.5,
                          augment=AugmentConfig(flip=True, translate=0.1, erase=0.5, token_dropout=0.1))
    schedule = Schedule.following(config.monitor, **SHORT_SCHEDULE)
    # The reference run: only its log and model are compared, so it need not export.
    report, model, config = _train(config, tmp_path / "whole", export=False, schedule=schedule)
    whole = _log_columns(tmp_path / "whole")
    # The uninterrupted run exercises what resume must replay: a cut in the rate and an early stop.
    assert report["epochs_trained"] < RESUME_EPOCHS
    assert len(set(whole["learning_rate"])) > 1
    # Warm-up over the first epoch and a half: the towers' rate is still rising at the first epoch's end.
    assert whole["scheduled_learning_rate"][0] < whole["learning_rate"][0]
    assert whole["scheduled_learning_rate"][1] == pytest.approx(whole["learning_rate"][1])
    # Killed before committing the epoch after the best (numbered from 1, as epochs_done counts).
    kill_at = report["best_epoch"] + 1

    commit_backup = dualenc.training.selection.commit_backup

    def die_before_commit(backup_dir, model, state):
        if state.epochs_done == kill_at:
            raise Interrupted(f"killed before committing epoch {kill_at}")
        commit_backup(backup_dir, model, state)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dualenc.training.selection, "commit_backup", die_before_commit)
        with pytest.raises(Interrupted):
            _train(config, tmp_path / "resumed", schedule=schedule)
    # The epoch that was not committed is not logged either: it is trained again.
    assert len(csv_rows(tmp_path / "resumed" / "training_log.csv")) == kill_at - 1

    def die_in_export(*args, **kwargs):
        raise Interrupted("killed while exporting")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dualenc.training.loop, "export_encoders", die_in_export)
        with pytest.raises(Interrupted):
            dualenc.training.loop.run_training(config, dualenc.training.loop.RunPaths(tmp_path / "resumed"), resume=True,
                                          verbose=0, schedule=schedule)
    assert not (tmp_path / "resumed" / "metrics.json").exists()

    epochs_trained = []
    with pytest.MonkeyPatch.context() as patch:
        on_epoch_end = dualenc.training.selection.ModelSelection.on_epoch_end
        patch.setattr(dualenc.training.selection.ModelSelection, "on_epoch_end",
                      lambda self, epoch, logs=None: (epochs_trained.append(epoch), on_epoch_end(self, epoch, logs)))
        resumed_report, resumed_model, _ = _train(config, tmp_path / "resumed", schedule=schedule, resume=True)
    # The export is redone without training again.
    assert epochs_trained == []
    assert {key: resumed_report[key] for key in ("epochs_trained", "best_epoch")} == \
        {key: report[key] for key in ("epochs_trained", "best_epoch")}
    # Equal to the bit: the CPU kernels used here are deterministic (a GPU run would need a
    # float tolerance), and the same seeds, data order and dropout draws make the same run.
    resumed = _log_columns(tmp_path / "resumed")
    assert sorted(resumed) == sorted(whole)
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
    for want, got in zip(_test_embeddings(model, config), _test_embeddings(resumed_model, config)):
        np.testing.assert_array_equal(got, want)
    assert not (tmp_path / "resumed" / "backup").exists()
    assert [path.name for path in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["best.weights.h5"]


def test_building_a_mixed_precision_model_leaves_the_global_policy_as_it_was(tmp_path):
    import keras

    from dualenc.core.config import TrainConfig
    from dualenc.training.loop import build_model
    from tests.support.stand_ins import factory_config

    keras.mixed_precision.set_global_policy("bfloat16")
    try:
        model = build_model(TrainConfig(model=factory_config(tmp_path), mixed_precision=True))
        assert keras.mixed_precision.global_policy().name == "bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.image_head.dtype_policy.name == "mixed_float16"
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    assert not model.optimizer.inner_optimizer.use_ema


# --- no validation split: held-out training identities ------------------------------------------


@pytest.mark.slow
def test_without_a_validation_split_training_identities_are_held_out_and_test_scores_only_at_the_end(held_out_run):
    import json

    from dualenc.models.preprocessing import build_text_preprocessor
    from dualenc.training.loop import pair_batches
    from tests.support.packed import read_records

    data, requested, report, config = held_out_run.data, held_out_run.requested, held_out_run.report, held_out_run.config
    train_labels = np.array([record["label"] for record in read_records(data, "train")])
    holdout = held_out_run.holdout
    assert holdout is not None and len(holdout.labels) == 1  # a tenth of 10 identities
    assert f"validating on 1 training identities ({holdout.pairs} of {len(train_labels)} pairs) held out" in held_out_run.out
    assert holdout.pairs == np.isin(train_labels, holdout.labels).sum() > 0
    assert json.loads((held_out_run.run_dir / "config.json").read_text())["validation"] == "train-holdout"
    assert report["split"] == "test" and "held out" in report["validation"]
    # Validation and training came from train; the test split is scored at the end through the
    # exported encoders (`score_run`), never through the training pipeline.
    assert [(split, training) for split, training, _ in requested] == [("train", False), ("train", True)]

    # The held-out pairs are exactly the validation batches, and never in a training epoch.
    text_preprocessor = build_text_preprocessor(config.model.text)
    validation = pair_batches(data, "train", config, text_preprocessor, {}, training=False, holdout=holdout)
    train = pair_batches(data, "train", config, text_preprocessor, {}, training=True, epochs=range(3), holdout=holdout)
    validation_labels = np.concatenate([batch["label"].numpy() for batch in validation])
    seen_in_training = np.concatenate([batch["label"].numpy() for batch in train])
    np.testing.assert_array_equal(np.sort(validation_labels), np.sort(train_labels[np.isin(train_labels, holdout.labels)]))
    assert not np.isin(seen_in_training, holdout.labels).any()
    assert len(seen_in_training) == 3 * ((len(train_labels) - holdout.pairs) // config.batch_size) * config.batch_size


def test_identity_batches_for_cmpm_have_a_known_length_leave_held_out_identities_out_and_resume_in_step(demo_data):
    import tensorflow as tf

    from dualenc.data.manifest import load_manifest
    from dualenc.training.loop import choose_holdout, pair_batches

    config = _tiny_config(demo_data, seed=5)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, loss="cmpm"))
    holdout = choose_holdout(demo_data, load_manifest(demo_data), config.seed)
    count_words = tf.strings.length  # a stand-in text preprocessor: the batches' strings, not the model, matter here

    def batches(epochs: range) -> list[dict]:
        stream = pair_batches(demo_data, "train", config, count_words, {}, training=True, epochs=epochs, holdout=holdout)
        found = [{key: batch[key].numpy() for key in ("label", "image_id")} for batch in stream]
        assert int(stream.cardinality()) == len(found)
        return found

    whole_run, resumed = batches(range(3)), batches(range(1, 3))
    assert len(whole_run) % 3 == 0 and len(whole_run) > 0
    for batch in whole_run:
        labels = batch["label"]
        assert len(set(labels.tolist())) == config.batch_size // 4 and not np.isin(labels, holdout.labels).any()
    assert len(resumed) == 2 * len(whole_run) // 3
    for alone, in_run in zip(resumed, whole_run[len(whole_run) // 3 :]):
        np.testing.assert_array_equal(alone["image_id"], in_run["image_id"])
