"""Helpers for the training tests: tiny flags and configs, in-process runs, dataset copies, CSV and
file snapshots.

The packed demo they train on is the session fixture `demo_data` in `tests/conftest.py`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "train.py"
# Small enough for a 2-core CPU: batches of 8 from ~80 training pairs.
TINY_FLAGS = ["--batch-size", "8", "--quiet"]
# The vision tower frozen and its images not augmented (its features cacheable), the BiLSTM text
# tower still trained.
FROZEN_VISION = {"model": {"vision": {"trainable": False}}, "augment": {"flip": False, "translate": 0.0}}
# Epochs of the shared frozen-vision demo run (`frozen_vision_run` in tests/conftest.py).
FROZEN_VISION_EPOCHS = 2


def copy_dataset(source: Path, destination: Path) -> Path:
    """A private copy of a packed dataset that a test may damage."""
    shutil.copytree(source, destination)
    return destination


def write_json(path: Path, values: object) -> Path:
    path.write_text(json.dumps(values))
    return path


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def file_stamps(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and link under `root`: (mtime in ns, link target or "") by relative path."""
    stamps = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or path.is_file():
            target = os.readlink(path) if path.is_symlink() else ""
            stamps[str(path.relative_to(root))] = (path.lstat().st_mtime_ns, target)
    return stamps


def subprocess_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """The environment for a child `python train.py`: quiet TensorFlow, a private cache."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", DUALENC_CACHE=str(cache_dir), **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def train_command(*flags: str) -> list[str]:
    return [sys.executable, str(TRAIN_SCRIPT), *flags]


def frozen_vision_flags(config_dir: Path, data_dir: Path) -> list[str]:
    """train.py flags for `FROZEN_VISION_EPOCHS` epochs on `data_dir` with the vision tower frozen."""
    config = write_json(config_dir / "frozen_vision.json", FROZEN_VISION)
    return ["--data", str(data_dir), "--config", str(config), "--epochs", str(FROZEN_VISION_EPOCHS), *TINY_FLAGS]


@dataclasses.dataclass
class TrainedRun:
    """One finished `train.main` call: its flags, where it ran, its run directory, the model it exported."""

    flags: list[str]
    workdir: Path
    cache_dir: Path
    run_dir: Path
    model: object
    exit_code: int


def train_in_process(workdir: Path, cache_dir: Path, flags: list[str]) -> TrainedRun:
    """`train.main(flags)` run in `workdir`, keeping the DualEncoder it exports for comparison."""
    import dualenc.training.loop
    import train

    workdir.mkdir(parents=True)
    exported = {}
    export_encoders = dualenc.training.loop.export_encoders

    def export_and_keep(run_dir, **kwargs):
        exported["model"] = kwargs["encode_images"].__self__
        export_encoders(run_dir, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.setenv("DUALENC_CACHE", str(cache_dir))
        patch.setattr(dualenc.training.loop, "export_encoders", export_and_keep)
        exit_code = train.main(flags)
    return TrainedRun(flags, workdir, cache_dir, (workdir / "runs" / "latest").resolve(), exported.get("model"), exit_code)
