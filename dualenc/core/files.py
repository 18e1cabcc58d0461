"""Atomic writes: a reader sees the old file (or directory) or the whole new one, never half of it.

Every result file of dualenc and tfrecords_tools (configs, manifests, journals, shards, metrics,
charts, indexes, downloads) is written the same way: to a hidden temporary sibling, flushed to
disk with ``fsync``, then renamed over the target, and the parent directory is synced so the
rename itself survives a power cut. Without the ``fsync`` a crash shortly after the rename can
leave the *new* name pointing at an empty or partial file on many file systems.

- `atomic_file` / `atomic_directory`: context managers yielding the temporary path for any
  library that writes by path (``np.save``, ``faiss.write_index``, ``tf.saved_model.save``);
- `write_bytes_atomic`, `write_text_atomic`, `write_json_atomic`, `save_figure_atomic`: the
  common cases on top of `atomic_file`;
- `move_into_place`: the last step alone, for a file written under a temporary name by other
  means (a TFRecord shard, a resumable download).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# mkdtemp makes directories private (0700); a finished result should be as readable as any folder.
DIRECTORY_MODE = 0o755
HASH_BLOCK_BYTES = 1 << 20


def temporary_sibling(path: str | Path) -> Path:
    """The hidden temporary name `atomic_file` writes `path` under: ``.{name}.tmp`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def sha256_of_file(path: str | Path) -> str:
    """Hex sha256 of the file at `path`, read in blocks (the checksum manifests record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def probe_writable(directory: str | Path) -> None:
    """Create `directory` if needed and write and remove a probe file in it; raises `OSError`
    when that fails, so a job can refuse an unwritable output before it does any work (a
    permission check alone misses read-only mounts and full disks)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-check-{os.getpid()}-{os.urandom(4).hex()}"
    probe.write_bytes(b"")
    probe.unlink()


def fsync_path(path: str | Path) -> None:
    """Flush a file's or directory's content (a directory: its entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: str | Path) -> None:
    """`fsync_path` every file and directory under `root` (inclusive), deepest first; a file
    `root` alone."""
    if not os.path.isdir(root):
        fsync_path(root)
        return
    for directory, _, names in os.walk(root, topdown=False):
        for name in names:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(directory)


def move_into_place(source: str | Path, target: str | Path) -> Path:
    """Sync the finished file `source`, rename it to `target` (same file system), sync the directory."""
    target = Path(target)
    fsync_path(source)
    os.replace(source, target)
    fsync_path(target.parent)
    return target


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path` (synced).

    If the block raises, the temporary file is removed and `path` keeps its old content.
    """
    path = Path(path)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        move_into_place(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_file(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` as UTF-8 to `path` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, content: Any, *, sort_keys: bool = False, indent: int = 2) -> Path:
    """Write `content` as indented UTF-8 JSON (one trailing newline) to `path` atomically."""
    text = json.dumps(content, indent=indent, ensure_ascii=False, sort_keys=sort_keys)
    return write_text_atomic(path, text + "\n")


def save_figure_atomic(figure: Any, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as a PNG at `path` atomically and close it (also when saving fails)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as temporary:
            # The temporary name hides the extension, so the format is named.
            figure.savefig(temporary, format="png", dpi=dpi)
    finally:
        plt.close(figure)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a new empty temporary sibling directory of `path` to fill; on success it replaces `path`.

    On leaving the block every file in it is synced, an existing `path` is moved aside, the new
    directory renamed into place and the old one deleted. If the block raises, the temporary
    directory is deleted and `path` is left as it was. Temporary names are unique, so two
    processes writing the same `path` do not delete each other's work (the last one wins).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    building.chmod(DIRECTORY_MODE)
    try:
        yield building
        fsync_tree(building)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    retired = None
    if path.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, retired / path.name)
    os.replace(building, path)
    fsync_path(path.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
