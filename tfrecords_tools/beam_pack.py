"""The packers as an Apache Beam pipeline: ``python -m tfrecords_tools ... --runner NAME [-- OPTIONS]``.

The same input (`ImageEntry` lists per split from `coco`, `cuhk_pedes` or `folder`) gives the same
output as `tfrecords_tools.writer.pack`: identical shards, byte for byte, under the same names,
and the same ``manifest.json`` (only its ``created`` time differs). The pipeline:

    entries ─ Reshuffle ─ prepare (dualenc.data.images.prepare_images, the local packer's function)
       ├─ (split, position, pairs kept) ─ GroupByKey(split) ─ shard starts ─┐ side input
       ├─ kept images ─ key (split, shard) ─ GroupByKey ─ write one shard ◄─┘
       └─ skipped images ───────────────────────────────────────────────────┴─ result file

Shard boundaries follow the local rule (`shard_starts`): a shard is closed before the kept image
whose pairs would take it past `shard_size`. They depend on which images were skipped, so they
are computed from the small (position, pair count) list of each split, after validation.

Retries: Beam may run a bundle twice, or fail it half-way and run it again. Each shard is one
GroupByKey value written by one call, under a unique hidden temporary name, synced and renamed
to its final name: an attempt that dies leaves at most a hidden ``.tfrecord.partial`` file (never
matched by ``*.tfrecord``; removed when the pack finishes), and two attempts write identical
bytes to the same name, so no record is ever duplicated. The manifest is written by the driver
after the pipeline succeeded, last, as in the local packer. A failed run is finished by running
the same command again (the directory carries the run's fingerprint in ``.pack-journal.json``).

Paths: `out_dir` and the images must be a file system every worker sees (local disk for the
DirectRunner; a shared mount such as NFS or Cloud Storage FUSE on Dataflow or Flink).
"""

from __future__ import annotations

import bisect
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from dualenc.core.startup import import_tensorflow

# Beam workers import this module first; `writer` below imports TensorFlow, quietly once it is loaded.
import_tensorflow()

from dualenc.core import jsonfiles  # noqa: E402
from dualenc.core.errors import DualEncError  # noqa: E402
from dualenc.core.files import move_into_place, probe_writable, write_json_atomic  # noqa: E402
from dualenc.core.locking import directory_lock  # noqa: E402
from dualenc.data.manifest import Manifest  # noqa: E402
from dualenc.data.records import MANIFEST_NAME, shard_name  # noqa: E402
from dualenc.data.images import DEFAULT_MAX_IMAGE_BYTES, StoreSize, prepare_images  # noqa: E402
from tfrecords_tools.writer import (  # noqa: E402
    DEFAULT_SHARD_SIZE,
    JOURNAL_NAME,
    ImageEntry,
    check_options,
    claim_out_dir,
    make_out_dir,
    remove_packer_files,
    report,
    split_summary,
    fingerprint,
)

# Written by the pipeline's last step, read by the driver: every shard written and every skip.
RESULT_NAME = ".beam-pack-result.json"


def shard_starts(kept_pairs: Iterable[tuple[int, int]], shard_size: int) -> list[int]:
    """The position of each shard's first image, ascending, given ``(position, pairs)`` of the
    kept images of a split (any order): the local packer's rule, a new shard before an image that
    would take a non-empty shard past `shard_size` pairs."""
    starts, shard_pairs = [], 0
    for position, pairs in sorted(kept_pairs):
        if not starts or (shard_pairs and shard_pairs + pairs > shard_size):
            starts.append(position)
            shard_pairs = 0
        shard_pairs += pairs
    return starts


def _prepare(item: tuple[str, int, ImageEntry], size: StoreSize,
             max_image_bytes: int) -> tuple[str, int, ImageEntry, bytes | None, str | None]:
    split, position, entry = item
    [(image, reason)] = prepare_images([entry.path], size, max_image_bytes)
    return split, position, entry, image, reason


def _kept_pairs(prepared: tuple) -> tuple[str, tuple[int, int]]:
    split, position, entry, image, _ = prepared
    return split, (position, len(entry.pairs) if image is not None else 0)


def _layout(grouped: tuple[str, Iterable[tuple[int, int]]], shard_size: int) -> tuple[str, list[int]]:
    split, positions = grouped
    return split, shard_starts([item for item in positions if item[1]], shard_size)


def _keyed_by_shard(prepared: tuple, layouts: dict[str, list[int]]) -> tuple[tuple[str, int], tuple[int, ImageEntry, bytes]]:
    split, position, entry, image, _ = prepared
    index = bisect.bisect_right(layouts[split], position) - 1
    return (split, index), (position, entry, image)


def write_shard(keyed: tuple[tuple[str, int], Iterable[tuple[int, ImageEntry, bytes]]], out_dir: str,
                layouts: dict[str, list[int]]) -> dict:
    """Write one shard (its images in position order) to a unique temporary name, sync and
    rename it to its final name; returns what the manifest needs: split, index, name, pairs,
    sha256. Running it twice for the same key writes the same bytes to the same name."""
    tf = import_tensorflow()
    from dualenc.data.pipeline import sha256_of_file
    from dualenc.data.records import serialize_example

    (split, index), images = keyed
    name = shard_name(split, index, len(layouts[split]))
    partial = Path(out_dir) / f".{split}-{index:05d}.{uuid.uuid4().hex}.tfrecord.partial"
    pairs = 0
    try:
        with tf.io.TFRecordWriter(str(partial)) as records:
            for _, entry, image in sorted(images, key=lambda item: item[0]):
                for caption, label in entry.pairs:
                    records.write(serialize_example(caption, image, entry.image_id, label))
                    pairs += 1
        digest = sha256_of_file(partial)
        move_into_place(partial, Path(out_dir) / name)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {"split": split, "index": index, "name": name, "pairs": pairs, "sha256": digest}


def _skip(prepared: tuple) -> dict:
    split, position, _, _, reason = prepared
    return {"split": split, "image": position, "reason": reason}


def _write_result(shards: list[dict], out_dir: str, skips: list[dict]) -> None:
    write_json_atomic(Path(out_dir) / RESULT_NAME, {"shards": shards, "skipped": skips})


def build_pipeline(pipeline, splits: dict[str, list[ImageEntry]], out_dir: Path, size: StoreSize,
                   max_image_bytes: int, shard_size: int, shard_writer: Callable = write_shard) -> None:
    """Add the packing transforms to `pipeline` (see the module docstring). `shard_writer`
    has `write_shard`'s signature; tests pass one that fails once."""
    import apache_beam as beam

    items = [(split, position, entry) for split in sorted(splits) for position, entry in enumerate(splits[split])]
    prepared = (
        pipeline
        | "entries" >> beam.Create(items)
        | "spread over workers" >> beam.Reshuffle()
        | "validate and re-encode" >> beam.Map(_prepare, size, max_image_bytes)
    )
    layouts = beam.pvalue.AsDict(
        prepared
        | "pairs kept" >> beam.Map(_kept_pairs)
        | "by split" >> beam.GroupByKey()
        | "shard starts" >> beam.Map(_layout, shard_size)
    )
    shards = (
        prepared
        | "kept" >> beam.Filter(lambda item: item[3] is not None)
        | "key by shard" >> beam.Map(_keyed_by_shard, layouts)
        | "by shard" >> beam.GroupByKey()
        | "write shard" >> beam.Map(shard_writer, str(out_dir), layouts)
    )
    skips = prepared | "unreadable" >> beam.Filter(lambda item: item[3] is None) | "skip entry" >> beam.Map(_skip)
    (
        shards
        | "all shards" >> beam.combiners.ToList()
        | "result file" >> beam.Map(_write_result, str(out_dir), beam.pvalue.AsList(skips))
    )


def _check_writable(out_dir: Path) -> None:
    """`DualEncError` when `out_dir` cannot be created or written (before any work starts)."""
    if out_dir.exists() and not out_dir.is_dir():
        return  # `make_out_dir` names this case
    try:
        probe_writable(out_dir)
    except OSError as error:
        raise DualEncError(f"--out {out_dir} is not writable ({error.strerror or error}); choose another --out") from None


def _split_states(splits: dict[str, list[ImageEntry]], result: dict) -> dict[str, dict]:
    """The pipeline's result in the local packer's journal shape, per split, checked complete."""
    states = {split: {"shards": [], "tail_skipped": []} for split in splits}
    for shard in sorted(result["shards"], key=lambda shard: (shard["split"], shard["index"])):
        states[shard["split"]]["shards"].append({**shard, "skipped": []})
    for skip in result["skipped"]:
        states[skip["split"]]["tail_skipped"].append({"image": skip["image"], "reason": skip["reason"]})
    for split, state in states.items():
        indices = [shard["index"] for shard in state["shards"]]
        if indices != list(range(len(indices))):
            raise RuntimeError(f"Beam packer bug: split {split} got shards {indices}")
    return states


def pack_with_beam(splits: dict[str, list[ImageEntry]], out_dir: Path, source: dict, options, *,
                   skipped: Sequence[dict] = (), size: StoreSize = StoreSize(),
                   max_image_bytes: int | None = None, shard_size: int | None = None,
                   overwrite: bool = False, shard_writer: Callable = write_shard) -> Manifest:
    """`tfrecords_tools.writer.pack` run as a Beam pipeline with `options` (`PipelineOptions`,
    see `dualenc.beam.options.pipeline_options`); returns the manifest it wrote.

    The driver holds ``--out``'s lock (`dualenc.core.locking`, as the local packer does) from
    claiming the directory to writing the manifest, so neither packer can delete the other's
    shards, with ``--overwrite`` or not.
    """
    import apache_beam as beam

    shard_size = DEFAULT_SHARD_SIZE if shard_size is None else shard_size
    max_image_bytes = DEFAULT_MAX_IMAGE_BYTES if max_image_bytes is None else max_image_bytes
    check_options(splits, size, max_image_bytes, shard_size, None)
    out_dir = Path(out_dir)
    _check_writable(out_dir)
    make_out_dir(out_dir)
    prior_skipped = list(skipped)
    run_fingerprint = fingerprint(splits, source, prior_skipped, size, shard_size, max_image_bytes)
    with directory_lock(out_dir, "packer"):
        claim = claim_out_dir(out_dir, run_fingerprint, overwrite)
        if "manifest" in claim:
            print(f"{out_dir} already holds this dataset, packed and verified; nothing to do", file=sys.stderr)
            return claim["manifest"]
        # A Beam run starts over: shards of an earlier attempt are rewritten, not resumed.
        remove_packer_files(out_dir)
        (out_dir / RESULT_NAME).unlink(missing_ok=True)
        write_json_atomic(out_dir / JOURNAL_NAME, {"fingerprint": run_fingerprint, "splits": {}})

        with beam.Pipeline(options=options) as pipeline:
            build_pipeline(pipeline, splits, out_dir, size, max_image_bytes, shard_size, shard_writer)

        result = jsonfiles.load_file(out_dir / RESULT_NAME, "Beam packer result")
        summaries, image_skips = {}, []
        for split, state in sorted(_split_states(splits, result).items()):
            summaries[split], split_skips = split_summary(splits[split], state)
            image_skips.extend(split_skips)
        manifest = Manifest.create({**source, "fingerprint": run_fingerprint}, summaries,
                                   prior_skipped + image_skips, size.max_side, size.cover)
        manifest.write(out_dir)
        shards = {name for summary in summaries.values() for name in summary.shards}
        remove_packer_files(out_dir, keep=shards | {MANIFEST_NAME})
        (out_dir / RESULT_NAME).unlink(missing_ok=True)
    report(out_dir, manifest)
    return manifest
