"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Every writer in dualenc and tfrecords_tools (configs, manifests, journals, metrics, charts)
writes to a hidden temporary sibling and renames it over the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_json_atomic(path: str | Path, content: Any, *, sort_keys: bool = False) -> None:
    """Write `content` as indented UTF-8 JSON to `path`, flushed to disk before the rename."""
    path = Path(path)
    temporary = _temporary(path)
    with open(temporary, "w", encoding="utf-8") as stream:
        json.dump(content, stream, indent=2, ensure_ascii=False, sort_keys=sort_keys)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def save_figure_atomic(figure: Any, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as a PNG at `path` and close it (also when saving fails)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    temporary = _temporary(path)
    try:
        # The temporary name hides the extension, so the format is named.
        figure.savefig(temporary, format="png", dpi=dpi)
    finally:
        plt.close(figure)
    os.replace(temporary, path)
    return path


def write_bytes_atomic(path: str | Path, content: bytes) -> None:
    """Write `content` to `path`, flushed to disk before the rename."""
    path = Path(path)
    temporary = _temporary(path)
    with open(temporary, "wb") as stream:
        stream.write(content)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `path` to fill; on success it replaces `path` whole.

    A failure inside the block removes the temporary directory and leaves `path` as it was.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    previous = path.with_name(f".{path.name}.old")
    for leftover in (temporary, previous):
        shutil.rmtree(leftover, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if path.exists():
        path.rename(previous)
    temporary.rename(path)
    shutil.rmtree(previous, ignore_errors=True)
