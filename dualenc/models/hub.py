"""TensorFlow Hub handles → local SavedModel directories, failing in one actionable line.

A handle is either a local SavedModel directory (used as is) or a URL that
``tensorflow_hub.resolve`` downloads into its cache (``TFHUB_CACHE_DIR``, or a temporary
directory by default) and returns from there on later runs. Offline machines therefore work
with a pre-filled cache or a local directory; anything else becomes a `DualEncError`.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

from dualenc.core.errors import DualEncError, first_line

# Seconds a single network read may stall before the download counts as failed; a blocked
# network that drops packets would otherwise hang resolve() for minutes.
NETWORK_TIMEOUT_SECONDS = 30.0

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


def _failure(handle: str, reason: str) -> DualEncError:
    return DualEncError(
        f"cannot load TF Hub handle {handle} ({reason}); download it elsewhere and pass the local "
        "directory with --text-encoder/--text-preprocessor or set TFHUB_CACHE_DIR"
    )


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound blocking socket operations for the duration, restoring the previous default."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if previous is None else min(previous, seconds))
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _check_saved_model(handle: str, directory: Path) -> None:
    if not any((directory / name).is_file() for name in SAVED_MODEL_FILES):
        raise _failure(handle, f"{directory} holds no saved_model.pb")


def resolve_handle(handle: str) -> str:
    """The local SavedModel directory for `handle` (a local directory or a TF Hub URL)."""
    if "://" not in handle:
        directory = Path(handle).expanduser()
        if not directory.is_dir():
            raise _failure(handle, "no such local directory")
        _check_saved_model(handle, directory)
        return str(directory)

    import tensorflow_hub  # imported here: it is slow to import and only URLs need it

    try:
        with _socket_timeout(NETWORK_TIMEOUT_SECONDS):
            directory = Path(tensorflow_hub.resolve(handle))
    except Exception as exc:  # urllib, HTTP, tarfile and hub's own errors all mean "not available"
        raise _failure(handle, first_line(exc)) from None
    _check_saved_model(handle, directory)
    return str(directory)
