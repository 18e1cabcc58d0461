"""Beam test helpers: the DirectRunner options the tests use and a shard writer that fails once.

Worker processes import this module by name, so what they call must live here, not in a test.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from tfrecords_tools.beam_pack import write_shard

# Two worker processes, as the issue asks: each bundle may land in either.
DIRECT_OPTIONS = ("--direct_num_workers=2", "--direct_running_mode=multi_processing")


def direct_options():
    """`PipelineOptions` for the DirectRunner with `DIRECT_OPTIONS`."""
    from dualenc.beam.options import pipeline_options

    return pipeline_options("DirectRunner", list(DIRECT_OPTIONS))


def fail_once_writer(marker: str, keyed, out_dir: str, layouts: dict) -> dict:
    """`write_shard`, except that the first call for shard 0 (while `marker` does not exist)
    writes its shard, leaves half a temporary file behind as a killed worker would, and fails."""
    (split, index), images = keyed
    if index == 0 and not Path(marker).exists():
        Path(marker).write_text(split)
        write_shard(keyed, out_dir, layouts)
        stray = Path(out_dir) / f".{split}-{index:05d}.{uuid.uuid4().hex}.tfrecord.partial"
        stray.write_bytes(b"\0" * 100)
        raise RuntimeError("bundle forced to fail once")
    return write_shard(keyed, out_dir, layouts)
