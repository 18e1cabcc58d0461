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
  means (a TFRecord shard, a resumable download);
- `owned_temporary`, `owned_name`, `remove_leftovers`, `recover_directory`: what survives a killed writer.

Temporary names are unique and created exclusively (``mkstemp`` / ``mkdtemp`` in the target's
directory), so two writers of the same file never rename each other's half-written copy into
place: the last complete one wins. Each name carries its writer's process id and host
(``.{name}.{pid}-{host}-{random}.tmp``), so the next writer of the same target removes what a
killed one left (`remove_leftovers`) without touching the work of a live one. A directory is
swapped in by one ``renameat2(RENAME_EXCHANGE)`` where the file system has it; elsewhere by two
renames (old aside, new in), and a writer killed between them leaves the old directory in a
hidden ``.old`` sibling, which the next write or open puts back (`recover_directory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# mkdtemp makes directories private (0700); a finished result should be as readable as any folder.
DIRECTORY_MODE = 0o755
HASH_BLOCK_BYTES = 1 << 20


def temporary_sibling(path: str | Path) -> Path:
    """``.{name}.tmp``: the fixed temporary name versions before unique names wrote `path` under,
    which the packer still recognises as its own leftover."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


# Names the host in temporary names: a process id says whether its writer lives only on its own host.
HOST_TAG = hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]
# What follows ".{name}." in a temporary (.tmp) or retired (.old) sibling: owner, random part, kind.
OWNED_SUFFIX = re.compile(r"(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[a-z0-9_]+\.(?P<kind>tmp|old)")
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def owned_temporary(parent: str | Path, stem: str, *, directory: bool = False, kind: str = "tmp") -> Path:
    """A new, exclusively created hidden file (or directory) in `parent`:
    ``.{stem}.{pid}-{host}-{random}.{kind}``; `remove_leftovers` clears it once its process is gone."""
    if directory:
        return Path(tempfile.mkdtemp(prefix=f".{stem}.{os.getpid()}-{HOST_TAG}-", suffix=f".{kind}", dir=parent))
    while True:
        path = owned_name(parent, stem, kind)
        try:
            # Not mkstemp: its files are private (0600), and the finished file keeps this mode.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def owned_name(parent: str | Path, stem: str, kind: str = "tmp") -> Path:
    """A fresh name of `owned_temporary`'s form, not created: for what is made exclusively by other
    means (a symbolic link, which fails rather than replace an existing name)."""
    return Path(parent) / f".{stem}.{os.getpid()}-{HOST_TAG}-{os.urandom(6).hex()}.{kind}"


def _owner_is_gone(pid: int, host: str) -> bool:
    """Whether process `pid` of the host tagged `host` has ended (another host's: unknown, so no)."""
    if host != HOST_TAG:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _abandoned(parent: Path, stem: str) -> list[Path]:
    """The ``.{stem}.*`` temporary and retired siblings in `parent` whose writer has ended."""
    prefix = f".{stem}."
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        owned = OWNED_SUFFIX.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        if owned and _owner_is_gone(int(owned["pid"]), owned["host"]):
            found.append(parent / name)
    return sorted(found)


def recover_directory(path: str | Path) -> None:
    """Put back the directory `path` when a writer was killed between moving it aside and moving
    its replacement in (the two-rename swap of `atomic_directory`), then `remove_leftovers`.

    Readers call it before they look (`load_encoder`, the gallery index); where the parent is
    read-only nothing can be repaired, and the reader then reports what it does not find."""
    path = Path(path)
    if not os.path.lexists(path):
        for retired in _abandoned(path.parent, path.name):
            if retired.name.endswith(".old") and (retired / path.name).is_dir():
                # FileNotFoundError: another process put it back first.
                with contextlib.suppress(OSError):
                    os.replace(retired / path.name, path)
                    fsync_path(path.parent)
                break
    remove_leftovers(path)


def remove_leftovers(path: str | Path) -> None:
    """Delete the temporary and retired siblings of `path` that killed writers left behind (their
    process has ended; a live writer's are kept)."""
    path = Path(path)
    for leftover in _abandoned(path.parent, path.name):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # gone already, or a read-only directory
                leftover.unlink()


def is_out_of_space(error: BaseException) -> bool:
    """Whether `error` reports a full disk or an exhausted quota (ENOSPC, EDQUOT): as an
    `OSError`'s errno, or in the message of a library that wraps it (h5py, TensorFlow, FAISS)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    message = str(error)
    return any(os.strerror(code) in message for code in (errno.ENOSPC, errno.EDQUOT))


def sha256_of_file(path: str | Path) -> str:
    """Hex sha256 of the file at `path`, read in blocks (the checksum manifests record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


class UnreadableFile(Exception):
    """Why `read_regular_file` refused a path: `kind` is "missing", "directory", "special" (a
    device, FIFO or socket), "too large" (`size`: its bytes, or None when it grew while read)
    or "error" (`reason`: the OS's words)."""

    def __init__(self, kind: str, *, size: int | None = None, reason: str = ""):
        super().__init__(kind)
        self.kind, self.size, self.reason = kind, size, reason


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of the regular file at `path`, at most `max_bytes`; `UnreadableFile` otherwise.

    Opened without blocking and checked before reading, so a FIFO is never waited on and a
    device never read; a file still growing stops at the limit. The one reader of files a user
    or a file names (images, JSON): callers word the refusal for their field.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UnreadableFile("missing") from None
    except IsADirectoryError:
        raise UnreadableFile("directory") from None
    except OSError as error:
        raise UnreadableFile("error", reason=str(error.strerror or error)) from None
    try:
        status = os.fstat(descriptor)
        if stat.S_ISDIR(status.st_mode):  # before fdopen, which refuses a directory itself
            raise UnreadableFile("directory")
        if not stat.S_ISREG(status.st_mode):
            raise UnreadableFile("special")
        if status.st_size > max_bytes:
            raise UnreadableFile("too large", size=status.st_size)
        with os.fdopen(os.dup(descriptor), "rb") as stream:
            data = stream.read(max_bytes + 1)
    except OSError as error:
        raise UnreadableFile("error", reason=str(error.strerror or error)) from None
    finally:
        os.close(descriptor)
    if len(data) > max_bytes:
        raise UnreadableFile("too large")
    return data


def probe_writable(directory: str | Path) -> None:
    """Create `directory` if needed and write and remove a probe file in it; raises `OSError`
    when that fails, so a job can refuse an unwritable output before it does any work (a
    permission check alone misses read-only mounts and full disks)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-check-{os.getpid()}-{os.urandom(4).hex()}"
    probe.write_bytes(b"")
    probe.unlink()


def reserve_space(path: str | Path) -> None:
    """Allocate every block of the file at `path` now (``posix_fallocate``), so that a full disk
    is an `OSError` (ENOSPC) here instead of a SIGBUS that kills the process when a page of a
    memory-mapped, sparse file is first written. A file system that cannot allocate ahead is left
    as it is."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, os.fstat(descriptor).st_size)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(descriptor)


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
    remove_leftovers(path)
    temporary = owned_temporary(path.parent, path.name)
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

    On leaving the block every file in it is synced, then the new directory takes the place of
    an existing `path` in one exchange (`exchange`; elsewhere: old moved aside, new renamed into
    place) and the old one is deleted. If the block raises, the temporary directory is deleted
    and `path` is left as it was. Temporary names are unique, so two processes writing the same
    `path` do not delete each other's work (the last one wins); what a killed writer left is
    recovered or removed first (`recover_directory`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    building = owned_temporary(path.parent, path.name, directory=True)
    building.chmod(DIRECTORY_MODE)
    try:
        yield building
        fsync_tree(building)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if path.exists() and exchange(building, path):
        fsync_path(path.parent)
        shutil.rmtree(building, ignore_errors=True)  # now the old directory
        return
    retired = None
    if path.exists():
        retired = owned_temporary(path.parent, path.name, directory=True, kind="old")
        os.replace(path, retired / path.name)
    os.replace(building, path)
    fsync_path(path.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic rename (Linux ``renameat2(RENAME_EXCHANGE)``), so
    no moment exists without either; False where the C library or file system lacks it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))
