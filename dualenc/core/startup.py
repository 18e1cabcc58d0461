"""Import TensorFlow without its C++ start-up chatter on the user's terminal.

TensorFlow's native libraries write several lines straight to file descriptor 2 while they load
and while the first device is created (the absl "before InitializeLog" warning, oneDNN and CUDA
stub notices, CPU feature hints). `TF_CPP_MIN_LOG_LEVEL` does not silence all of them, and they
bury the one `error:` line a command prints. `import_tensorflow` loads TensorFlow and creates its
devices with descriptor 2 pointed at a temporary file, then puts it back: the chatter is dropped,
or replayed when the import fails, when `verbose` is asked for, or when the environment variable
`DUALENC_TF_LOG=1` is set. Command-line tools call it before importing any module that imports
TensorFlow, and only after checking what they can check without it.

Quiet runs also set `TF_CPP_MIN_LOG_LEVEL` to 3 (unless the user set it): TensorFlow logs some
run-time notices at its error level, after start-up, such as oneDNN falling back to Eigen for
int64 and bool ops on CPUs without AVX-512, which would land among a search's results. Errors
that stop a command still reach the user, as the Python exceptions TensorFlow raises.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

LOG_ENV = "DUALENC_TF_LOG"
QUIET_TF_LOG_LEVEL = "3"  # TF_CPP_MIN_LOG_LEVEL of a quiet run: native info, warnings and errors off


def import_tensorflow(verbose: bool = False, create_devices: bool = True) -> ModuleType:
    """TensorFlow, imported with its devices created; start-up chatter dropped unless `verbose`
    or `DUALENC_TF_LOG=1`. Without `create_devices` the runtime is left unstarted, as a
    multi-worker strategy needs (it starts it itself)."""
    if not _log_wanted(verbose):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_LOG_LEVEL)
    with native_stderr_dropped(verbose):
        import tensorflow as tf

        if create_devices:
            tf.config.list_logical_devices()
    return tf


@contextlib.contextmanager
def native_stderr_dropped(verbose: bool = False) -> Iterator[None]:
    """For the block, drop what native code writes straight to descriptor 2 (TensorFlow's C++
    logs, libjpeg's warnings about a damaged JPEG), unless `verbose` or `DUALENC_TF_LOG=1`;
    replayed if the block raises."""
    if _log_wanted(verbose):
        yield
        return
    with _stderr_captured():
        yield


def _log_wanted(verbose: bool) -> bool:
    return verbose or os.environ.get(LOG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def _stderr_captured() -> Iterator[None]:
    """Point descriptor 2 at a temporary file for the block; replay what it caught if the block
    raises, so a failed import still explains itself."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            sink.seek(0)
            os.write(2, sink.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
