"""One epoch of ``python train.py``'s demo recipe, and where its time goes.

The demo preset (`dualenc.training.presets.preset`: a small CNN and a WordPiece BiLSTM trained
from scratch on 64x32 crops) is trained by `dualenc.training.loop.run_training`, the code path
``train.py`` takes, on a packed demo. Timers are wrapped around the parts of an epoch, in this
worker process only (`instrumented`), so what is timed is the real run, not a copy of it:

- steps: from the epoch's start (the end of `ModelSelection.on_epoch_begin`, the last callback
  to start it) to the first epoch-end callback: the optimiser steps with the input pipeline
  feeding them (and, in the first epoch, the tracing of the step).
- validation: `RetrievalValidation.on_epoch_end`, embedding the validation split and scoring it.
- commit: `ModelSelection.on_epoch_end`: the best weights, the backup and the CSV log.
- other: the rest of the epoch (TensorBoard's summaries, Keras' bookkeeping).
- decode: `decoded_pixels`, once before the first epoch: every distinct image decoded into memory.

The last epoch is reported (the first also traces the step and the encoders), and the whole
call besides (vocabulary, model, export, scoring). Then, on one training batch and a fresh model
of the same config, forward + backward of each tower with its head alone and of both with the
loss (a training step less the optimiser's update): which of the two dominates a step. The seed
has no such recipe, so there is no reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

from bench import common

DECODE, VALIDATION, COMMIT = "decode", "validation", "commit"
TOWER_PARTS = ("vision", "text", "both")


class Timeline:
    """Wall-clock spans (start, end) of the wrapped calls, by part, in call order, and each
    epoch's start with its number of steps; times come from `clock` (seconds)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.spans: dict[str, list[tuple[float, float]]] = {}
        self.epoch_starts: list[tuple[float, int]] = []

    def timed(self, part: str, function: Callable) -> Callable:
        """`function`, each call's span recorded under `part`."""

        def timed_call(*args, **kwargs):
            start = self.clock()
            try:
                return function(*args, **kwargs)
            finally:
                self.spans.setdefault(part, []).append((start, self.clock()))

        return timed_call

    def epoch_begin(self, on_epoch_begin: Callable) -> Callable:
        """A callback's `on_epoch_begin`, then the epoch's start and its steps (Keras' ``params``) recorded."""

        def begin(callback, epoch: int, logs: dict | None = None) -> None:
            on_epoch_begin(callback, epoch, logs)
            self.epoch_starts.append((self.clock(), callback.params["steps"]))

        return begin

    def seconds(self, part: str) -> float:
        """Total seconds of `part`'s calls."""
        return sum(end - start for start, end in self.spans.get(part, []))

    def epoch(self, index: int) -> dict:
        """Epoch `index`'s seconds by part (steps, validation, commit, other) and its steps."""
        start, steps = self.epoch_starts[index]
        validation_start, validation_end = self.spans[VALIDATION][index]
        commit_start, commit_end = self.spans[COMMIT][index]
        parts = {"steps_seconds": validation_start - start, "validation_seconds": validation_end - validation_start,
                 "commit_seconds": commit_end - commit_start}
        total = commit_end - start
        return {"epoch_seconds": total, **parts, "other_seconds": total - sum(parts.values()), "steps": steps,
                "step_ms": 1000 * parts["steps_seconds"] / steps}


@contextlib.contextmanager
def instrumented(timeline: Timeline) -> Iterator[None]:
    """For the block, `run_training`'s decode and epoch callbacks timed into `timeline`."""
    from dualenc.training import loop
    from dualenc.training.selection import ModelSelection

    with contextlib.ExitStack() as patches:
        for owner, name, wrapped in (
            (loop, "decoded_pixels", timeline.timed(DECODE, loop.decoded_pixels)),
            (loop.RetrievalValidation, "on_epoch_end", timeline.timed(VALIDATION, loop.RetrievalValidation.on_epoch_end)),
            (ModelSelection, "on_epoch_begin", timeline.epoch_begin(ModelSelection.on_epoch_begin)),
            (ModelSelection, "on_epoch_end", timeline.timed(COMMIT, ModelSelection.on_epoch_end)),
        ):
            patches.enter_context(mock.patch.object(owner, name, wrapped))
        yield


def demo_config(params: dict, paths):
    """The demo preset on `params`' data, epochs and batch (None: the preset's), resolved for the
    run at `paths` (`RunPaths`) as ``train.py`` resolves it: the vocabulary is learnt into the run."""
    from dualenc.data.manifest import load_manifest
    from dualenc.training.loop import resolve_config
    from dualenc.training.presets import preset

    config = preset("demo")
    config = dataclasses.replace(config, data=params["data_dir"], epochs=params["epochs"],
                                 batch_size=params["batch_size"] or config.batch_size)
    return resolve_config(config, load_manifest(config.data), paths)


def median_ms(step: Callable, batch: dict, repeats: int) -> float:
    """Median milliseconds of `repeats` calls of `step` on `batch`, after one call that traces it."""
    float(step(batch))
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        float(step(batch))  # the scalar's value waits for every gradient
        durations.append(time.perf_counter() - start)
    return 1000 * statistics.median(durations)


def tower_steps_ms(config, repeats: int) -> dict[str, float]:
    """Forward + backward milliseconds on one training batch of a fresh model built from `config`:
    the vision tower and its head alone, the text tower and its head alone, and both with the loss."""
    import tensorflow as tf

    from dualenc.data.records import IMAGE, LABEL
    from dualenc.models.model import TOKENS
    from dualenc.models.preprocessing import build_text_preprocessor
    from dualenc.training.loop import TRAIN_SPLIT, build_model, model_inputs, pair_batches

    model = build_model(config)
    text_preprocessor = build_text_preprocessor(config.model.text)
    batches = pair_batches(Path(config.data), TRAIN_SPLIT, config, text_preprocessor, {}, training=True)
    batch = next(iter(model_inputs(batches)))

    def both_loss(inputs: dict) -> tf.Tensor:
        caption_embeddings, image_embeddings = model(inputs, training=True)
        return model.pair_loss(caption_embeddings, image_embeddings, inputs[LABEL])

    losses = {
        "vision": lambda inputs: tf.reduce_sum(model.encode_images(inputs[IMAGE], training=True)),
        "text": lambda inputs: tf.reduce_sum(model.encode_texts(inputs[TOKENS], training=True)),
        "both": both_loss,
    }
    variables = {
        "vision": [*model.vision_tower.trainable_variables, *model.image_head.trainable_variables],
        "text": [*model.text_tower.trainable_variables, *model.caption_head.trainable_variables],
        "both": model.trainable_variables,
    }
    return {part: median_ms(forward_backward(losses[part], variables[part]), batch, repeats) for part in TOWER_PARTS}


def forward_backward(loss_of: Callable, variables: list) -> Callable:
    """A compiled function of a batch: `loss_of` and its gradients for `variables`, summed to one scalar."""
    import tensorflow as tf

    @tf.function
    def step(batch: dict) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_of(batch)
        gradients = tape.gradient(loss, variables)
        return tf.add_n([tf.reduce_sum(gradient) for gradient in gradients if gradient is not None])

    return step


def measure(variant: str, params: dict) -> dict:
    """Train the demo preset `params["epochs"]` epochs through `run_training`; the last epoch's
    parts, the first epoch's and the whole call's seconds, the decode, the towers' step times, and
    the trained run's directory (which the quick run's search service serves)."""
    from dualenc.core.runs import RunPaths
    from dualenc.training.loop import run_training

    scratch = Path(tempfile.mkdtemp(prefix="demo-epoch-", dir=params["scratch"]))
    paths = RunPaths(scratch / "run")
    config = demo_config(params, paths)
    timeline = Timeline()
    with instrumented(timeline), common.Stopwatch() as run_clock:
        run_training(config, paths, cache_dir=scratch / "cache", verbose=0)
    epochs = [timeline.epoch(index) for index in range(len(timeline.epoch_starts))]
    return {
        **epochs[-1],
        "epochs": epochs,
        "first_epoch_seconds": epochs[0]["epoch_seconds"],
        "decode_seconds": timeline.seconds(DECODE),
        "run_seconds": run_clock.seconds,
        "batch_size": config.batch_size,
        "image_size": list(config.model.vision.image_size),
        "tower_step_ms": tower_steps_ms(config, params["repeats"]),
        "cpu_model": common.cpu_model(),
        "run_dir": str(paths.root),
    }


def _row(name: str, metric: str, value: float, peak_mb: float, note: str) -> dict:
    return {"benchmark": name, "metric": metric, "ref": None, "ours": value, "ratio": None, "ref_peak_mb": None,
            "ours_peak_mb": peak_mb, "note": note}


def demo_epoch_rows(params: dict, train_pairs: int, run: common.Runner) -> tuple[dict, list[dict]]:
    """`measure` on the packed demo of `train_pairs` training pairs, taken by `run` (in its own
    process, but in the quick run); the result and the table's rows: the last epoch and its parts,
    the decode, and the towers' step times."""
    result = run("demo_epoch", "ours", params)
    height, width = result["image_size"]
    name = f"demo epoch ({train_pairs} pairs, {height}x{width}, batch {result['batch_size']})"
    peak_mb = common.peak_of([result])
    epochs = len(result["epochs"])
    repeats = params["repeats"]
    rows = [
        _row(name, "epoch_seconds", result["epoch_seconds"], peak_mb,
             f"epoch {epochs} of {epochs} (the first, tracing included: {result['first_epoch_seconds']:.3g} s); "
             f"other {result['other_seconds']:.3g} s; whole run_training {result['run_seconds']:.3g} s; "
             f"{result['cpu_model']}"),
        _row(name, "steps_seconds", result["steps_seconds"], peak_mb,
             f"{result['steps']} steps, {result['step_ms']:.3g} ms/step, input pipeline included"),
        _row(name, "validation_seconds", result["validation_seconds"], peak_mb,
             "RetrievalValidation.on_epoch_end: embed and score the validation split"),
        _row(name, "commit_seconds", result["commit_seconds"], peak_mb,
             "ModelSelection.on_epoch_end: best weights, backup, CSV log"),
        _row(name, "decode_seconds", result["decode_seconds"], peak_mb,
             "decoded_pixels: every distinct image decoded once, before epoch 1"),
    ]
    notes = {"vision": "vision tower + image head alone", "text": "text tower + caption head alone",
             "both": "both towers + loss: a step less the optimiser update"}
    rows += [_row(name, f"{part}_forward_backward_ms", result["tower_step_ms"][part], peak_mb,
                  f"{notes[part]}; one batch, median of {repeats}")
             for part in TOWER_PARTS]
    return result, rows
