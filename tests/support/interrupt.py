"""A packer killed after a given number of shards: what the resume tests interrupt packing with."""

from __future__ import annotations

import pytest

from tfrecords_tools import writer


class Interrupted(Exception):
    """Stands in for a crash or Ctrl-C in the middle of packing."""


def interrupt_after_shards(patch: pytest.MonkeyPatch, closed_before_crash: int) -> None:
    """Make the packer raise `Interrupted` right after it closes its `closed_before_crash`-th shard."""
    original = writer._SplitWriter.close_shard
    calls = []

    def close_then_crash(self, next_image):
        original(self, next_image)
        calls.append(next_image)
        if len(calls) == closed_before_crash:
            raise Interrupted

    patch.setattr(writer._SplitWriter, "close_shard", close_then_crash)
