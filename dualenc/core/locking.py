"""One writer per directory: an exclusive lock that tells the second comer who holds it.

Two processes writing the same output directory (two identical packer commands, say) would
interleave their files. `directory_lock` takes an advisory `flock` on a hidden file in the
directory and writes the holder's process id and host into it; a second process fails at once
with a `DualEncError` naming them (the host matters on a shared file system). The kernel drops
the lock when its holder dies, even by ``kill -9``, so a stale lock file never blocks a re-run.
POSIX only (``fcntl``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from dualenc.core.errors import DualEncError

LOCK_NAME = ".lock"
# "<pid> <host>\n": a host name has at most 253 characters.
HOLDER_BYTES = 300


def _holder(descriptor: int) -> str:
    """The holder the lock file names: "process 123 on host-a" ("process unknown" while it is
    being written)."""
    written = os.pread(descriptor, HOLDER_BYTES, 0).decode("utf-8", "replace").split()
    if len(written) == 2 and written[0].isdigit():
        return f"process {written[0]} on {written[1]}"
    return "process unknown"


def _same_file(descriptor: int, path: Path) -> bool:
    """Whether `path` still names the file open as `descriptor` (the previous holder may have
    removed it between our open and our lock)."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


@contextlib.contextmanager
def directory_lock(directory: Path, purpose: str) -> Iterator[None]:
    """Hold the lock of the existing `directory` for the block, for `purpose` (a phrase such as
    "packer"); the lock file is removed on leaving.

    Raises `DualEncError` naming the holding process when another one has it, or saying the
    directory cannot be written (read-only, no permission).
    """
    path = directory / LOCK_NAME
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise DualEncError(f"cannot write to {directory} ({error.strerror or error}); "
                               "choose a writable directory") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise DualEncError(f"{directory} is in use by another {purpose} ({holder}); "
                               "wait for it to finish or choose another directory") from None
        if _same_file(descriptor, path):
            break
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode("utf-8"), 0)
        yield
    finally:
        # Removed while still locked, so a newcomer either sees our lock or makes a fresh file.
        path.unlink(missing_ok=True)
        os.close(descriptor)
