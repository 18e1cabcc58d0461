"""Model selection and the run's backup: best-so-far, patience, the plateau schedule, resume.

One component owns everything a run decides from epoch to epoch, so that a run killed at any
point and resumed makes the decisions the uninterrupted run made:

- `Schedule`: what is followed (``TrainConfig.monitor``) and how — cut the learning rate by
  `lr_factor` after `lr_patience` epochs without improvement, stop after `stop_patience`
  (seed 003's ReduceLROnPlateau(0.2, 3) and EarlyStopping(5), as Keras defines them). The
  cut sets the base rate; the per-step schedule (`dualenc.training.optimizer`) scales it.
- `SelectionState`: the run so far — every epoch's logs and learning rate, the best epoch and
  value, the two patience counters, whether the run stopped. `advance` is a pure function of
  the state and one epoch's value.
- `ModelSelection`: the Keras callback that drives it. At each epoch end it writes the best
  weights when the epoch improved, then commits one backup directory (model and optimizer
  weights, the random generators' states and ``state.json``) atomically, then rewrites the
  CSV log from the state. `restore_backup` loads the newest committed backup before `fit`.

The backup is ours rather than Keras' `BackupAndRestore`, whose state lives in private files,
is written in place, and lacks the dropout generators' states (a resumed run would draw the
first epoch's dropout masks again). Best weights are kept per epoch
(``checkpoints/best-epoch-NNN.weights.h5``) and a file is deleted only once a committed backup
no longer names it, so a restored state always finds the weights it chose.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np

from dualenc.core.files import atomic_directory, atomic_file, move_into_place
from dualenc.core import jsonfiles
from dualenc.training.optimizer import PartwiseAdamW, unwrapped_optimizer

STATE_FILE = "state.json"
WEIGHTS_FILE = "training.weights.h5"
# Keras names each `keras.random.SeedGenerator` state variable so; dropout draws its masks from them.
SEED_STATE_NAME = "seed_generator_state"
STATE_VERSION = 1
# The log's name for the towers' learning rate at an epoch's last step (`PartwiseAdamW`).
SCHEDULED_RATE = "scheduled_learning_rate"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How the monitored value drives the run (see the module docstring).

    `mode` is "min" for losses and "max" for retrieval scores; an epoch improves when its value
    beats the best so far by more than `min_delta` (the first epoch always does, NaN never does).
    """

    monitor: str
    mode: str
    lr_factor: float = 0.2
    lr_patience: int = 3
    stop_patience: int = 5
    min_delta: float = 0.0

    @classmethod
    def following(cls, monitor: str, **changes: Any) -> Schedule:
        """The schedule for `monitor`: losses should fall, retrieval scores rise."""
        return cls(monitor=monitor, mode="min" if monitor.endswith("loss") else "max", **changes)

    def improves(self, value: float, best: float | None) -> bool:
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta


@dataclasses.dataclass(frozen=True)
class SelectionState:
    """What the run has decided after `epochs_done` epochs (epochs are counted from 0).

    `history` holds each finished epoch's logs (with its ``learning_rate``); `learning_rate` is
    the rate for the next epoch; `wait` counts epochs since the best, `lr_wait` epochs since the
    best or the last cut.
    """

    learning_rate: float
    history: tuple[dict[str, float], ...] = ()
    best_epoch: int | None = None
    best_value: float | None = None
    wait: int = 0
    lr_wait: int = 0
    stopped: bool = False

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    @property
    def learning_rates(self) -> list[float]:
        """The rate each finished epoch trained with."""
        return [logs["learning_rate"] for logs in self.history]

    def to_json(self) -> dict:
        return {"version": STATE_VERSION, **dataclasses.asdict(self), "history": list(self.history)}

    @classmethod
    def from_json(cls, content: dict) -> SelectionState:
        values = {key: value for key, value in content.items() if key != "version"}
        return cls(**{**values, "history": tuple(values["history"])})


def advance(state: SelectionState, logs: dict[str, float], schedule: Schedule, *, halted: bool = False) -> tuple[SelectionState, bool]:
    """The state after one more epoch with `logs`, and whether that epoch is the new best.

    `halted`: something else stopped the run this epoch (NaN loss). Raises KeyError when the
    logs lack the monitored value.
    """
    value = float(logs[schedule.monitor])
    epoch = state.epochs_done
    history = state.history + ({**logs, "learning_rate": state.learning_rate},)
    if schedule.improves(value, state.best_value):
        return dataclasses.replace(state, history=history, best_epoch=epoch, best_value=value, wait=0, lr_wait=0,
                                   stopped=halted), True
    wait, lr_wait, learning_rate = state.wait + 1, state.lr_wait + 1, state.learning_rate
    if lr_wait >= schedule.lr_patience:
        learning_rate, lr_wait = learning_rate * schedule.lr_factor, 0
    stopped = halted or wait >= schedule.stop_patience
    return SelectionState(learning_rate, history, state.best_epoch, state.best_value, wait, lr_wait, stopped), False


def best_weights_path(checkpoints: Path, epoch: int) -> Path:
    """Where the weights of `epoch` (from 0) are kept while it is the best: ``best-epoch-NNN.weights.h5``."""
    return checkpoints / f"best-epoch-{epoch + 1:03d}.weights.h5"


def save_weights_atomic(model: keras.Model, path: Path) -> Path:
    """`model.save_weights` to `path` under a temporary name, then renamed (Keras wants the ``.weights.h5`` ending)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name.removesuffix('.weights.h5')}.tmp.weights.h5")
    model.save_weights(staging)
    return move_into_place(staging, path)


def _seed_states(model: keras.Model) -> list[keras.Variable]:
    return [variable for variable in model.variables if variable.name == SEED_STATE_NAME]


def write_log(path: Path, history: tuple[dict[str, float], ...]) -> None:
    """The CSV log (``epoch`` and every logged value, one row per epoch), rewritten atomically."""
    fields = ["epoch"] + sorted({key for logs in history for key in logs})
    with atomic_file(path) as staging, open(staging, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        for epoch, logs in enumerate(history):
            writer.writerow({"epoch": epoch, **logs})


def _backups(backup_dir: Path) -> list[Path]:
    """Committed backups, oldest first (``epoch-NNNN``; temporary names start with a dot)."""
    if not backup_dir.is_dir():
        return []
    return sorted(path for path in backup_dir.iterdir() if path.name.startswith("epoch-") and path.is_dir())


def restore_backup(backup_dir: Path, model: keras.Model) -> SelectionState | None:
    """Load the newest committed backup into `model` (weights, optimizer, random generators); its state.

    None when there is none (the run starts from its first epoch).
    """
    backups = _backups(backup_dir)
    if not backups:
        return None
    newest = backups[-1]
    state = SelectionState.from_json(jsonfiles.load_file(newest / STATE_FILE, "backup state", allow_nonfinite=True,
                                                         hint="delete the backup folder to start over"))
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(newest / WEIGHTS_FILE)
    seeds = np.load(newest / "seed_states.npy")
    for variable, value in zip(_seed_states(model), seeds):
        variable.assign(value)
    return state


def commit_backup(backup_dir: Path, model: keras.Model, state: SelectionState) -> None:
    """Write model, optimizer, generator states and `state` as one new backup; drop the older ones."""
    with atomic_directory(backup_dir / f"epoch-{state.epochs_done:04d}") as staging:
        model.save_weights(staging / WEIGHTS_FILE)
        np.save(staging / "seed_states.npy", np.array([np.asarray(variable) for variable in _seed_states(model)]))
        (staging / STATE_FILE).write_text(json.dumps(state.to_json(), indent=2))
    for older in _backups(backup_dir)[:-1]:
        shutil.rmtree(older)


class ModelSelection(keras.callbacks.Callback):
    """Drives `advance` each epoch, keeps the best weights and commits the backup (list it last).

    After `fit`, `state` is the whole run's and `best_weights` the file of its best epoch.
    """

    def __init__(self, schedule: Schedule, state: SelectionState, *, backup_dir: Path, checkpoints: Path, log_csv: Path):
        super().__init__()
        self.schedule = schedule
        self.state = state
        self.backup_dir = backup_dir
        self.checkpoints = checkpoints
        self.log_csv = log_csv

    @property
    def best_weights(self) -> Path | None:
        return None if self.state.best_epoch is None else best_weights_path(self.checkpoints, self.state.best_epoch)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.model.optimizer.learning_rate = self.state.learning_rate

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = {key: float(value) for key, value in (logs or {}).items()}
        optimizer = unwrapped_optimizer(self.model)
        if isinstance(optimizer, PartwiseAdamW):
            # Where the per-step schedule has taken the towers' rate by the epoch's end.
            logs[SCHEDULED_RATE] = optimizer.scheduled_learning_rate()
        self.state, improved = advance(self.state, logs, self.schedule, halted=self.model.stop_training)
        if improved:
            save_weights_atomic(self.model, self.best_weights)
        commit_backup(self.backup_dir, self.model, self.state)
        write_log(self.log_csv, self.state.history)
        keep = self.best_weights
        for stale in self.checkpoints.glob("best-epoch-*.weights.h5"):
            if stale != keep:
                stale.unlink()
        self.model.stop_training = self.state.stopped
