"""The packer's `main` in a fresh interpreter, to see what it imports before it answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def pack_in_fresh_process(arguments: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m tfrecords_tools ARGUMENTS`` through its `main` in a new Python; stdout is
    ``"<exit code> <whether tensorflow was imported>\\n"``, stderr what the packer printed."""
    program = ("import sys\nfrom tfrecords_tools.__main__ import main\n"
               f"code = main({arguments!r})\nprint(code, 'tensorflow' in sys.modules)\n")
    return subprocess.run([sys.executable, "-c", program], cwd=REPO, env=CHILD_ENV, capture_output=True, text=True,
                          timeout=timeout)
