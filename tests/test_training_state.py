"""Honest training state (issue 12): logged means are true means, resume replays the same run,
the exported weights are the selected ones, the temperature is bounded, the precision policy
is restored, and a dataset without a validation split validates on held-out training pairs.

Runs call `run_training` in-process on the tiny packed demo with a frozen small CNN; the model
that is exported is captured for comparison with independent references.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tests.support.training import csv_rows


def _tiny_config(data_dir: Path, **changes):
    from dualenc.presets import preset

    config = preset("demo")
    model = dataclasses.replace(
        config.model,
        vision=dataclasses.replace(config.model.vision, trainable=False, image_size=(64, 32)),
        text=dataclasses.replace(config.model.text, vocab_size=200, embedding_dim=16, lstm_units=16, max_tokens=24),
        projection_dim=32,
        dropout=0.0,
    )
    return dataclasses.replace(config, model=model, data=str(data_dir), batch_size=8, **changes)


def _train(config, run_dir: Path, **kwargs):
    """`run_training` into `run_dir`; returns (report, the DualEncoder it exported)."""
    import dualenc.training
    from dualenc.runs import RunPaths

    paths = RunPaths(run_dir)
    config = dualenc.training.resolve_config(config, dualenc.training.load_manifest(config.data), paths)
    exported = {}
    export_encoders = dualenc.training.export_encoders

    def export_and_keep(root, **arguments):
        exported["model"] = arguments["encode_images"].__self__
        export_encoders(root, **arguments)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dualenc.training, "export_encoders", export_and_keep)
        report = dualenc.training.run_training(config, paths, verbose=0, **kwargs)
    return report, exported["model"], config


def _mean_loss(model, config, batches) -> float:
    """The loss of every batch from the model's embeddings, averaged in float64 by NumPy."""
    from dualenc import losses
    from dualenc.training import model_inputs

    values = []
    for batch in model_inputs(batches):
        caption_embeddings, image_embeddings = model(batch, training=False)
        values.append(float(losses.dual_encoder_loss(
            config.model.loss, image_embeddings=image_embeddings, caption_embeddings=caption_embeddings,
            labels=batch["label"], temperature=model.temperature, class_weights=model.class_weights)))
    return float(np.mean(np.asarray(values, np.float64)))


@pytest.mark.slow
def test_logged_epoch_means_equal_a_separate_evaluation(demo_data, tmp_path):
    from dualenc.preprocessing import build_text_preprocessor
    from dualenc.training import pair_batches

    # A rate so small the weights stay put: the epoch's train mean is then the mean loss of
    # the epoch's batches under the final weights (no dropout; the frozen CNN is in inference mode).
    config = _tiny_config(demo_data, epochs=1, learning_rate=1e-9)
    report, model, config = _train(config, tmp_path / "run", use_feature_cache=False)
    row = csv_rows(tmp_path / "run" / "training_log.csv")[0]
    text_preprocessor = build_text_preprocessor(config.model.text)
    train = pair_batches(Path(config.data), "train", config, text_preprocessor, {}, training=True, epochs=range(1))
    validation = pair_batches(Path(config.data), "val", config, text_preprocessor, {}, training=False)
    assert float(row["loss"]) == pytest.approx(_mean_loss(model, config, train), rel=1e-4)
    assert float(row["val_loss"]) == pytest.approx(_mean_loss(model, config, validation), rel=1e-4)
