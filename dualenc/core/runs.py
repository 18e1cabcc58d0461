"""Run directories: where a training run writes, how an interrupted one is found again.

A run directory holds ``config.json`` (the resolved `TrainConfig`, written first) and, once
the run has finished, ``metrics.json``. A directory with a config but no metrics is an
unfinished run: the same command resumes it from its newest backup in ``backup/``
(`dualenc.training.selection`). ``runs/latest`` is a symbolic link to the newest run that started,
replaced atomically.

A training process holds the run directory's lock (`claim_run_dir`, on `dualenc.core.locking`),
which names it (pid, host): a second process aimed at the same directory is refused in one line
instead of interleaving its log with the first; the lock dies with its process, so a killed
run blocks nobody. A claim on a new run that fails before training starts removes what it
created, so a bad start leaves no stray directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from dualenc.core import config as configs
from dualenc.core.errors import DualEncError
from dualenc.core.files import owned_name, remove_leftovers
from dualenc.core.locking import LOCK_NAME, directory_lock

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


def check_writable(path: str | Path, label: str) -> None:
    """`DualEncError` unless this process may create files in `path` (or, while `path` does not
    exist, in its nearest existing parent): checked before a run starts, not mid-way."""
    path = Path(path)
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DualEncError(f"{label} {path}: {existing} is a file, not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DualEncError(
            f"cannot write {label} {path}: {existing} is read-only (or not yours); choose a writable directory"
        )


def _holds_only_lock(root: Path) -> bool:
    return all(entry.name == LOCK_NAME for entry in root.iterdir())


def check_out(out: str | Path) -> tuple[RunPaths, bool]:
    """The run directory `--out` names and whether it holds an unfinished run, after refusing a
    file, a read-only place, a finished run and a directory holding something else. Needs no
    TensorFlow, so train.py calls it before importing it."""
    paths = RunPaths(Path(out).resolve())
    if paths.root.exists() and not paths.root.is_dir():
        raise DualEncError(f"--out {out} is a file; pass a directory")
    if paths.root.is_dir() and not _holds_only_lock(paths.root):
        if not paths.config.is_file():
            raise DualEncError(f"--out {out} is not empty and holds no dualenc run; choose a new directory")
        if paths.finished:
            raise DualEncError(f"--out {out} holds a finished run; choose a new directory to keep it")
        check_writable(paths.root, "--out")
        return paths, True
    check_writable(paths.root, "--out")
    return paths, False


def choose_run_dir(out: str | Path | None, runs_root: Path, resolved: Callable[["RunPaths"], configs.TrainConfig]) -> tuple[RunPaths, bool]:
    """The run directory for this command and whether it resumes an unfinished run there.

    `resolved(paths)` gives the full config this command would save in `paths` (it may depend
    on the directory, e.g. the vocabulary's path). With `out`: a new or empty directory starts
    a run, an unfinished run with the same config resumes, anything else is refused so nothing
    is overwritten. Without `out`: `runs_root/latest` resumes when it is unfinished and the
    config matches; otherwise a new `runs_root/<timestamp>` starts.
    """
    if out is not None:
        paths, unfinished = check_out(out)
        if unfinished and paths.saved_config() != resolved(paths):
            raise DualEncError(
                f"--out {out} holds an unfinished run with a different configuration; "
                "rerun with its settings to resume it, or choose a new directory"
            )
        return paths, unfinished
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


@dataclasses.dataclass
class RunClaim:
    """A run directory this process holds the lock of (`claim_run_dir`); `started()` marks the
    moment training begins, after which a failure keeps the directory for a resume."""

    root: Path
    fresh: bool
    created: bool
    has_started: bool = False

    def started(self) -> None:
        self.has_started = True

    def discard(self) -> None:
        """Remove what this claim added to a new run that never started."""
        if self.created:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for entry in self.root.iterdir():
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def claim_run_dir(root: Path) -> Iterator[RunClaim]:
    """Create `root` if needed and hold its `dualenc.core.locking.directory_lock` for the block.

    Another live process holding it: `DualEncError` naming its pid and host. When the block
    raises before `RunClaim.started()`, a directory that was new is removed and one that was
    empty is emptied again, so a failed start leaves no stray run behind.
    """
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DualEncError(f"cannot create run directory {root} ({error.strerror or error}); "
                           "choose a writable directory") from None
    with directory_lock(root, "training process"):
        claim = RunClaim(root, fresh=_holds_only_lock(root), created=created)
        try:
            yield claim
        except BaseException:
            if claim.fresh and not claim.has_started:
                claim.discard()
            raise


def point_latest(runs_root: Path, paths: RunPaths) -> None:
    """Make `runs_root/latest` a relative symbolic link to `paths.root`, atomically.

    The link is made under a unique name (`owned_name`; making a link is exclusive) and renamed
    over the old one, so two runs starting at once cannot move each other's link; staging links
    of killed processes are removed first."""
    link = runs_root / LATEST
    remove_leftovers(link)
    staging = owned_name(runs_root, LATEST)
    staging.symlink_to(os.path.relpath(paths.root, runs_root))  # exclusive: never replaces another's link
    staging.replace(link)
