"""Run a command that sees one directory read-only, as on a read-only mount.

Permission bits do not stop root (tests often run as root in containers), so the directory is
bind-mounted read-only in a private mount namespace (``unshare``): the kernel then refuses every
write with ``EROFS``, whoever asks, and the mount vanishes with the command. Where namespaces
are not allowed, a non-root user gets the directory with its write bits cleared instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# "$0" is the directory, "$@" the command.
_MOUNT_READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def _unshare_prefix(directory: Path) -> list[str]:
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _MOUNT_READ_ONLY, str(directory)]


def _namespaces_work(directory: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*_unshare_prefix(directory), "true"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[list[str]]:
    """Yield a command prefix under which `directory` is read-only (prepend it to argv)."""
    if _namespaces_work(directory):
        yield _unshare_prefix(directory)
        return
    if os.geteuid() == 0:
        pytest.skip("needs mount namespaces (unshare) to make a directory read-only for root")
    mode = directory.stat().st_mode
    directory.chmod(0o555)
    try:
        yield []
    finally:
        directory.chmod(mode)
