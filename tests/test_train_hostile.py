"""train.py on a full disk: one `error:` line naming it, never a traceback."""

from __future__ import annotations

import errno
import os

import train
from dualenc.core import config as configs
from tests.support.training import TINY_FLAGS


def test_a_full_disk_during_a_run_is_one_line(demo_data, tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        # As h5py reports it when a checkpoint cannot be written: the errno only in the message.
        raise OSError(f"Unable to synchronously create file (file write failed: errno = {errno.ENOSPC}, "
                      f"error message = '{os.strerror(errno.ENOSPC)}')")

    monkeypatch.setattr(configs, "save", disk_full)
    exit_code = train.main(["--data", str(demo_data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY_FLAGS])
    captured = capsys.readouterr()
    assert exit_code == 2, captured
    assert captured.err.startswith("error: the disk is full") and captured.err.count("\n") == 1, captured.err
    assert "rerun the same command" in captured.err
