"""Run directories: where a training run writes, how an interrupted one is found again.

A run directory holds ``config.json`` (the resolved `TrainConfig`, written first) and, once
the run has finished, ``metrics.json``. A directory with a config but no metrics is an
unfinished run: the same command resumes it from its newest backup in ``backup/``
(`dualenc.selection`). ``runs/latest`` is a symbolic link to the newest run, replaced atomically.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable
from pathlib import Path

from dualenc import config as configs
from dualenc.errors import DualEncError

CONFIG_FILE = "config.json"
DEFAULT_CACHE = Path("~") / ".cache" / "dualenc"
METRICS_FILE = "metrics.json"
LATEST = "latest"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where the packed demo and feature caches live: `cache_dir`, else ``$DUALENC_CACHE``,
    else ``~/.cache/dualenc``, made absolute."""
    chosen = cache_dir if cache_dir is not None else os.environ.get("DUALENC_CACHE") or DEFAULT_CACHE
    return Path(chosen).expanduser().resolve()


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Every file a run writes, under `root`."""

    root: Path

    config: Path = dataclasses.field(init=False)
    metrics: Path = dataclasses.field(init=False)
    vocabulary: Path = dataclasses.field(init=False)
    backup: Path = dataclasses.field(init=False)
    best_weights: Path = dataclasses.field(init=False)
    log_csv: Path = dataclasses.field(init=False)
    tensorboard: Path = dataclasses.field(init=False)
    curves: Path = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        for name, relative in (
            ("config", CONFIG_FILE),
            ("metrics", METRICS_FILE),
            ("vocabulary", "vocabulary.txt"),
            ("backup", "backup"),
            ("best_weights", "checkpoints/best.weights.h5"),
            ("log_csv", "training_log.csv"),
            ("tensorboard", "logs"),
            ("curves", "curves.png"),
        ):
            object.__setattr__(self, name, self.root / relative)

    @property
    def finished(self) -> bool:
        return self.metrics.is_file()

    def saved_config(self) -> configs.TrainConfig | None:
        return configs.load(configs.TrainConfig, self.config) if self.config.is_file() else None


def choose_run_dir(out: str | Path | None, runs_root: Path, resolved: Callable[["RunPaths"], configs.TrainConfig]) -> tuple[RunPaths, bool]:
    """The run directory for this command and whether it resumes an unfinished run there.

    `resolved(paths)` gives the full config this command would save in `paths` (it may depend
    on the directory, e.g. the vocabulary's path). With `out`: a new or empty directory starts
    a run, an unfinished run with the same config resumes, anything else is refused so nothing
    is overwritten. Without `out`: `runs_root/latest` resumes when it is unfinished and the
    config matches; otherwise a new `runs_root/<timestamp>` starts.
    """
    if out is not None:
        paths = RunPaths(Path(out).resolve())
        if paths.root.exists() and not paths.root.is_dir():
            raise DualEncError(f"--out {out} is a file; pass a directory")
        if paths.root.is_dir() and any(paths.root.iterdir()):
            saved = paths.saved_config()
            if saved is None:
                raise DualEncError(f"--out {out} is not empty and holds no dualenc run; choose a new directory")
            if paths.finished:
                raise DualEncError(f"--out {out} holds a finished run; choose a new directory to keep it")
            if saved != resolved(paths):
                raise DualEncError(
                    f"--out {out} holds an unfinished run with a different configuration; "
                    "rerun with its settings to resume it, or choose a new directory"
                )
            return paths, True
        return paths, False
    latest = runs_root / LATEST
    if latest.is_dir():
        paths = RunPaths(latest.resolve())
        if not paths.finished and paths.saved_config() == resolved(paths):
            return paths, True
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = runs_root / stamp
    suffix = 1
    while root.exists():
        suffix += 1
        root = runs_root / f"{stamp}-{suffix}"
    return RunPaths(root.resolve()), False


def point_latest(runs_root: Path, paths: RunPaths) -> None:
    """Make `runs_root/latest` a relative symbolic link to `paths.root`, atomically."""
    link = runs_root / LATEST
    staging = runs_root / f".{LATEST}.tmp"
    if staging.is_symlink() or staging.exists():
        staging.unlink()
    staging.symlink_to(os.path.relpath(paths.root, runs_root))
    staging.replace(link)
