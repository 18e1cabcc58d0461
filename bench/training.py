"""Training with frozen backbones: every epoch through the backbones (seed 003) vs the feature cache.

Same model, data, batch and optimiser for both: a frozen MobileNetV2 (random weights, since
ImageNet weights cannot be downloaded here; speed does not depend on the values) and a frozen
tiny BERT (the test fixture, standing in for the seed's frozen small BERT), soft-target loss,
trainable projection heads. Batches come from `dualenc.training.loop.pair_batches`:

``seed``: no caches, so each step decodes the images and runs both frozen towers again.
``ours``: `dualenc.training.loop.feature_caches` computes both towers' features once (timed as
part of the first epoch), then epochs look them up.

Epoch times come from a callback around `model.fit`; the first epoch also holds tracing.
A 30-epoch run is extrapolated as first + 29 × median(later epochs).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import Stopwatch

EXTRAPOLATED_EPOCHS = 30


def _config(params: dict):
    from dualenc.core import config as configs

    model = configs.ModelConfig(
        vision=configs.VisionConfig("mobilenet_v2", None, trainable=False, image_size=tuple(params["image_size"])),
        text=configs.TextConfig("bert", preprocessor=params["preprocessor"], encoder=params["encoder"], trainable=False),
    )
    return configs.TrainConfig(model=model, data=params["data_dir"], epochs=params["epochs"],
                               batch_size=params["batch_size"])


def measure(variant: str, params: dict) -> dict:
    """Train `params["epochs"]` epochs; per-epoch seconds and the 30-epoch extrapolation."""
    import keras

    from dualenc.models.preprocessing import build_text_preprocessor
    from dualenc.training.loop import build_model, feature_caches, model_inputs, pair_batches

    config = _config(params)
    data_dir = Path(params["data_dir"])
    keras.utils.set_random_seed(config.seed)
    model = build_model(config)
    text_preprocessor = build_text_preprocessor(config.model.text)
    epoch_seconds: list[float] = []

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory(dir=params["scratch"]) as cache_dir:
        with Stopwatch() as cache_clock:
            caches = (
                feature_caches(model, config, text_preprocessor, data_dir, ["train"], Path(cache_dir))
                if variant == "ours"
                else {}
            )
        batches = model_inputs(pair_batches(data_dir, "train", config, text_preprocessor, caches, training=True))
        model.fit(batches, epochs=config.epochs, shuffle=False, callbacks=[EpochClock()], verbose=0)
    later = sorted(epoch_seconds[1:])
    later_median = later[len(later) // 2] if len(later) % 2 else (later[len(later) // 2 - 1] + later[len(later) // 2]) / 2
    first = cache_clock.seconds + epoch_seconds[0]
    return {
        "cache_seconds": cache_clock.seconds,
        "first_epoch_seconds": first,
        "later_epoch_seconds": later_median,
        "epoch_seconds": epoch_seconds,
        "run_30_seconds": first + (EXTRAPOLATED_EPOCHS - 1) * later_median,
    }
