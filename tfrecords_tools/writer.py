"""Serialise image-caption pairs into sharded TFRecords: the one place that writes shards.

The source modules (`coco`, `cuhk_pedes`, `folder`) turn annotations into `ImageEntry` lists per
split; `pack` reads and validates the images in a pool of threads, writes the records and the
manifest.

Shards hold whole images: a shard is closed before the image whose pairs would take it past
`shard_size` records (an image with more pairs than that gets a shard of its own). Each pair
stores its own copy of the image, so `shard_size` also bounds the images stored per shard.

Crash safety and resume: a shard is written to ``.{split}-{index}.tfrecord.partial``, synced and
renamed to ``.{split}-{index}.tfrecord.done`` when closed, and recorded (pair count, sha256, next image) in
``.pack-journal.json``. The final names carry the shard count, known only when a split is done,
so the renames to ``{split}-{index}-of-{count}.tfrecord`` happen then. A re-run with the same
fingerprint keeps the journalled shards whose checksums still match and continues after them;
because shard boundaries depend only on the input, the result equals a clean run's. Hidden
temporary names never match ``*.tfrecord``, so they cannot be mistaken for shards.

Bad input and a hostile system: everything stored has passed Pillow's checks in the threads
and then TensorFlow's own decoder here (`dualenc.data.images.tensorflow_problems`), so training never
meets an image it cannot decode. A JPEG stored as it is is decoded once, by TensorFlow only
(``check_pixels=False``: Pillow reads its header); a refused one gets Pillow's reason when Pillow
refuses it too (`dualenc.data.images.pillow_reason`). One packer at a time holds ``--out``
(`dualenc.core.locking`); a second is told the holder's pid. A full disk ends the run with one line and
removes the open shard's ``.partial``; the finished shards stay journalled, so re-running resumes.
TensorFlow is imported only after the options and ``--out`` were checked, so those mistakes are
reported at once.

Why threads, not processes: Pillow decodes, resizes and encodes without holding the GIL, and with
JPEGs left to TensorFlow's (multi-threaded) check the pool mostly reads files and headers. Spawned
worker processes cost ~0.25 s of CPU each to start (more than packing 200 photos' share of the
work) and copied every image's bytes twice between processes; a thread pool costs neither, and
ends with the packer whatever kills it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from dualenc.core import jsonfiles
from dualenc.core.errors import DualEncError
from dualenc.core.files import move_into_place, sha256_of_file, temporary_sibling, write_json_atomic
from dualenc.data.images import StoreSize, pillow_reason, tensorflow_problems
from dualenc.core.locking import directory_lock
from dualenc.data.manifest import Manifest, SplitSummary, manifest_path, read_manifest_file
from dualenc.data.records import FORMAT_VERSION, MANIFEST_NAME, serialize_example, shard_name
from dualenc.core.startup import import_tensorflow, native_stderr_dropped
from dualenc.data.images import DEFAULT_MAX_IMAGE_BYTES, prepare_images

if TYPE_CHECKING:
    import tensorflow as tf

DEFAULT_SHARD_SIZE = 2000  # seed 003's shards held 2,000 images
IMAGES_PER_TASK = 8
TASKS_IN_FLIGHT_PER_WORKER = 4  # bounds the image bytes waiting in memory
# Images TensorFlow decodes per check (in parallel, `tensorflow_problems`): enough to amortise
# building the tf.data map, few enough that their bytes stay a few tens of MB.
TENSORFLOW_CHECK_IMAGES = 512
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SKIPS_SHOWN = 5
PATH_KEYS = ("annotations", "images", "karpathy")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")
# The split `train.py` trains on (dualenc.training.loop.TRAIN_SPLIT); its labels size the CMPC classifier.
TRAIN_SPLIT = "train"
# The resume journal: what an unfinished run has completed so far (removed when it finishes).
JOURNAL_NAME = ".pack-journal.json"
# Annotation files are read whole: COCO's with Karpathy's splits are ~150 MB; 1 GiB bounds the
# memory a parsed file takes (several times its size).
ANNOTATIONS_MAX_BYTES = 2**30


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One image of a split and its pairs.

    `image_id` is the path relative to the source's image root (stored in each record), `path`
    the file to read, `pairs` the (caption, label) tuples in annotation order.
    """

    image_id: str
    path: str
    pairs: tuple[tuple[str, int], ...]


def group_pairs(rows: Iterable[tuple[str, str, str, str, int]]) -> dict[str, list[ImageEntry]]:
    """Group (split, image_id, path, caption, label) rows into `ImageEntry` lists per split.

    Images keep the order of their first row, captions their row order, so output is
    deterministic.
    """
    grouped: dict[str, dict[str, tuple[str, list]]] = {}
    for split, image_id, path, caption, label in rows:
        images = grouped.setdefault(split, {})
        images.setdefault(image_id, (path, []))[1].append((caption, label))
    return {
        split: [ImageEntry(image_id, path, tuple(pairs)) for image_id, (path, pairs) in images.items()]
        for split, images in grouped.items()
    }


def train_first_labels(keys: Iterable[tuple[Hashable, str]]) -> dict[Hashable, int]:
    """A label per identity key from (key, split) pairs: the keys seen in the "train" split get
    0..n-1, then the others n, n+1, ..., each group in order of first appearance.

    Training sizes the CMPC classifier to the train split's identities (the manifest's ``ids``),
    so that split's labels must be exactly 0..n-1, whatever other splits hold.
    """
    pairs = list(keys)
    ordered = [key for key, split in pairs if split == TRAIN_SPLIT] + [key for key, _ in pairs]
    return {key: label for label, key in enumerate(dict.fromkeys(ordered))}


def read_json_file(path: Path) -> object:
    """The parsed JSON annotation file at `path` (`dualenc.core.jsonfiles`: `DualEncError` naming
    it when it is missing, not a regular file, over `ANNOTATIONS_MAX_BYTES`, or not sane JSON)."""
    return jsonfiles.load_file(path, "annotations file", max_bytes=ANNOTATIONS_MAX_BYTES)


def empty_caption_skip(path: str, where: str) -> dict:
    """The `skipped` entry for a caption that is empty after whitespace normalisation."""
    return {"path": path, "reason": f"empty caption ({where})", "pairs": 1}


def fingerprint(splits: dict[str, list[ImageEntry]], source: dict, skipped: list[dict],
                size: StoreSize, shard_size: int, max_image_bytes: int) -> str:
    """sha256 over what determines the output: pairs, labels, options, annotation-level skips
    and the `source` keys other than its paths (left out so a moved dataset still resumes).
    Image bytes are not hashed (too slow for COCO): replacing an image file in place needs
    `--overwrite`."""
    content = {
        "format_version": FORMAT_VERSION,
        "max_image_bytes": max_image_bytes,
        "resize": size.max_side,
        "shard_size": shard_size,
        "source": {key: value for key, value in source.items() if key not in PATH_KEYS},
        "skipped": skipped,
        "splits": {
            split: [[entry.image_id, [list(pair) for pair in entry.pairs]] for entry in entries]
            for split, entries in sorted(splits.items())
        },
    }
    if size.cover is not None:  # absent otherwise, so packs made before covers existed still resume
        content["cover"] = list(size.cover)
    serialised = json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(serialised).hexdigest()


def _temporary_name(split: str, index: int, state: str) -> str:
    return f".{split}-{index:05d}.tfrecord.{state}"


def _is_packer_file(path: Path) -> bool:
    name = path.name
    return (
        name.endswith(".tfrecord")
        or (name.startswith(".") and (name.endswith(".tfrecord.partial") or name.endswith(".tfrecord.done")))
        or name in (JOURNAL_NAME, MANIFEST_NAME, temporary_sibling(MANIFEST_NAME).name, temporary_sibling(JOURNAL_NAME).name)
    )


def remove_packer_files(out_dir: Path, keep: set[str] = frozenset()) -> None:
    for path in sorted(out_dir.iterdir()):
        if path.is_file() and _is_packer_file(path) and path.name not in keep:
            path.unlink()


def _shards_match(out_dir: Path, checksums: dict[str, str]) -> bool:
    return all((out_dir / name).is_file() and sha256_of_file(out_dir / name) == digest
               for name, digest in checksums.items())


def _read_journal(path: Path) -> dict | None:
    """The journal at `path`, or None when there is none.

    A file that is not a JSON object was not written by this packer (it writes atomically), so it
    is reported rather than silently replaced.
    """
    if not path.exists():
        return None
    content = jsonfiles.load_file(path, "packer journal", hint="remove it or pass --overwrite")
    if not isinstance(content, dict):
        raise DualEncError(f"{path} is not a packer file (not a JSON object); remove it or pass --overwrite")
    return content


def _manifest_or_none(out_dir: Path) -> Manifest | None:
    """The finished manifest in `out_dir`, or None when there is none."""
    path = manifest_path(out_dir)
    if not path.exists():
        return None
    try:
        return read_manifest_file(path)
    except DualEncError as error:
        raise DualEncError(f"{error} (or pass --overwrite to replace it)") from None


def _bookkeeping_or_none(read: Callable[[Path], Any], path: Path, overwrite: bool) -> Any:
    """`read(path)`, or None when that fails and `overwrite` allows replacing the file."""
    try:
        return read(path)
    except DualEncError:
        if overwrite:
            return None
        raise


def claim_out_dir(out_dir: Path, run_fingerprint: str, overwrite: bool) -> dict:
    """Decide what to do with `out_dir`: returns the finished manifest to reuse (key
    "manifest") or the journal to continue (key "journal").

    The same fingerprint always resumes or reuses; a different dataset is replaced only with
    `overwrite` (which deletes only files named like the packer's own).
    """
    manifest = _bookkeeping_or_none(_manifest_or_none, out_dir, overwrite)
    journal = _bookkeeping_or_none(_read_journal, out_dir / JOURNAL_NAME, overwrite)
    if manifest is not None and manifest.source.get("fingerprint") == run_fingerprint:
        checksums = {name: digest for split in manifest.splits.values() for name, digest in split.sha256.items()}
        if _shards_match(out_dir, checksums):
            return {"manifest": manifest}
    elif journal is not None and journal.get("fingerprint") == run_fingerprint:
        return {"journal": journal}
    elif not overwrite:
        if manifest is not None:
            raise DualEncError(f"{out_dir} already holds a different packed dataset (see its manifest.json); "
                               "choose another --out or pass --overwrite to replace it")
        if journal is not None:
            raise DualEncError(f"{out_dir} holds an unfinished run over different input ({JOURNAL_NAME}); "
                               "re-run it with its own arguments, choose another --out, or pass --overwrite")
        if any(path.name.endswith(".tfrecord") for path in out_dir.iterdir()):
            raise DualEncError(f"{out_dir} holds .tfrecord files without a manifest.json; "
                               "choose another --out or pass --overwrite to replace them")
    remove_packer_files(out_dir)
    return {"journal": {"fingerprint": run_fingerprint, "splits": {}}}


def make_out_dir(out_dir: Path) -> None:
    """Create `out_dir`; `DualEncError` when it is a file or cannot be created."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DualEncError(f"--out {out_dir} is a file; give a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DualEncError(f"cannot create --out {out_dir} ({error.strerror or error}); "
                           "choose a writable directory") from None


def _pillow_prepared(entries: list[ImageEntry], size: StoreSize, max_image_bytes: int,
                     pool: concurrent.futures.Executor | None, workers: int) -> Iterator[tuple[bytes | None, str | None]]:
    """(bytes, None) or (None, reason) per entry after Pillow's checks (JPEGs kept as is: header
    only), in order; at most a few tasks per worker in flight so finished images never pile up
    in memory."""
    tasks = [([entry.path for entry in entries[start:start + IMAGES_PER_TASK]], size, max_image_bytes, False)
             for start in range(0, len(entries), IMAGES_PER_TASK)]
    if pool is None:
        for task in tasks:
            yield from prepare_images(*task)
        return
    max_pending = workers * TASKS_IN_FLIGHT_PER_WORKER
    pending: collections.deque = collections.deque()
    for task in tasks:
        pending.append(pool.submit(prepare_images, *task))
        if len(pending) >= max_pending:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def _tensorflow_checked(results: list[tuple[bytes | None, str | None]],
                        verbose: bool) -> list[tuple[bytes | None, str | None]]:
    """`results` with each image TensorFlow cannot decode turned into (None, reason), Pillow's
    reason where Pillow refuses it too; libjpeg's warnings about damaged JPEGs are kept off the
    terminal unless `verbose`."""
    with native_stderr_dropped(verbose):
        problems = iter(tensorflow_problems([image for image, _ in results if image is not None]))
    checked = []
    for image, reason in results:
        problem = None if image is None else next(problems)
        checked.append((image, reason) if problem is None else (None, pillow_reason(image) or problem))
    return checked


def _prepared(entries: list[ImageEntry], size: StoreSize, max_image_bytes: int,
              pool: concurrent.futures.Executor | None, workers: int,
              verbose: bool) -> Iterator[tuple[bytes | None, str | None]]:
    """(bytes, None) or (None, reason) per entry, in order: Pillow's checks and re-encoding in
    the threads, then TensorFlow's decoder over each batch of what would be stored."""
    batch = []
    for result in _pillow_prepared(entries, size, max_image_bytes, pool, workers):
        batch.append(result)
        if len(batch) == TENSORFLOW_CHECK_IMAGES:
            yield from _tensorflow_checked(batch, verbose)
            batch = []
    yield from _tensorflow_checked(batch, verbose)


class _SplitWriter:
    """Writes one split's shards, journalling each closed shard."""

    def __init__(self, out_dir: Path, split: str, journal: dict, split_state: dict):
        self.out_dir = out_dir
        self.split = split
        self.journal = journal
        self.state = split_state
        self.records: tf.io.TFRecordWriter | None = None
        self.shard_pairs = 0
        self.shard_images = 0
        self.pending_skips: list[dict] = []

    def add(self, entry: ImageEntry, image: bytes) -> None:
        import tensorflow as tf

        if self.records is None:
            self.records = tf.io.TFRecordWriter(str(self._partial()))
        for caption, label in entry.pairs:
            self.records.write(serialize_example(caption, image, entry.image_id, label))
        self.shard_pairs += len(entry.pairs)
        self.shard_images += 1

    def _partial(self) -> Path:
        return self.out_dir / _temporary_name(self.split, len(self.state["shards"]), "partial")

    def abandon(self) -> None:
        """Drop the open shard (the run failed): close it if it still closes, remove its file."""
        import tensorflow as tf

        if self.records is not None:
            try:
                self.records.close()
            except (OSError, tf.errors.OpError):
                pass  # a full disk fails the close too; the file goes either way
            self.records = None
        self._partial().unlink(missing_ok=True)

    def skip(self, position: int, reason: str) -> None:
        self.pending_skips.append({"image": position, "reason": reason})

    def close_shard(self, next_image: int) -> None:
        """Finish the open shard; images before `next_image` are accounted for."""
        if self.records is None:
            return
        self.records.close()
        index = len(self.state["shards"])
        partial = self._partial()
        digest = sha256_of_file(partial)
        move_into_place(partial, self.out_dir / _temporary_name(self.split, index, "done"))
        self.state["shards"].append({"pairs": self.shard_pairs, "images": self.shard_images,
                                     "sha256": digest, "next_image": next_image,
                                     "skipped": self.pending_skips})
        write_json_atomic(self.out_dir / JOURNAL_NAME, self.journal)
        self.records, self.shard_pairs, self.shard_images, self.pending_skips = None, 0, 0, []


def _resume_point(out_dir: Path, split: str, split_state: dict) -> int:
    """Keep the journalled shards that still match their checksums (a prefix); return the
    position of the first image not yet written."""
    kept = []
    for index, shard in enumerate(split_state["shards"]):
        done = out_dir / _temporary_name(split, index, "done")
        if not (done.is_file() and sha256_of_file(done) == shard["sha256"]):
            break
        kept.append(shard)
    split_state["shards"] = kept
    keep = {_temporary_name(split, index, "done") for index in range(len(kept))}
    for path in out_dir.iterdir():
        if path.name.startswith(f".{split}-") and path.name not in keep:
            path.unlink()
    return kept[-1]["next_image"] if kept else 0


def _finalise_split(out_dir: Path, split: str, journal: dict) -> None:
    """Give the split's closed shards their final names; journalled first and idempotent, so a
    run interrupted while renaming finishes the renames next time."""
    split_state = journal["splits"][split]
    count = len(split_state["shards"])
    for index, shard in enumerate(split_state["shards"]):
        shard["name"] = shard_name(split, index, count)
    split_state["complete"] = True
    write_json_atomic(out_dir / JOURNAL_NAME, journal)
    for index, shard in enumerate(split_state["shards"]):
        done = out_dir / _temporary_name(split, index, "done")
        if done.exists():
            move_into_place(done, out_dir / shard["name"])


def _skip_reasons(split_state: dict) -> dict[int, str]:
    """Position → reason of each image of a finished split that was skipped."""
    return {skip["image"]: skip["reason"]
            for skips in [shard["skipped"] for shard in split_state["shards"]] + [split_state["tail_skipped"]]
            for skip in skips}


def _label_gap_warning(entries: list[ImageEntry], split_state: dict) -> str | None:
    """A warning when the stored labels of the finished train split are not 0..n-1, else None.

    The packers number labels so, but an unreadable image leaves a gap, as can a table's own
    labels; `train.py --loss cmpc` sizes its classifier to the n identities and cannot use them.
    """
    reasons = _skip_reasons(split_state)
    labels = {label for position, entry in enumerate(entries) if position not in reasons for _, label in entry.pairs}
    if labels == set(range(len(labels))):
        return None
    return (f"warning: the {len(labels)} identities of split {TRAIN_SPLIT!r} have labels up to {max(labels)}, "
            f"not 0..{len(labels) - 1} (skipped images or the annotations' own labels leave gaps); "
            "`train.py --loss cmpc` cannot train on them: renumber the labels from 0 without gaps")


def split_summary(entries: list[ImageEntry], split_state: dict) -> tuple[SplitSummary, list[dict]]:
    """The manifest entry of a finished split and its skipped images."""
    reasons = _skip_reasons(split_state)
    kept = [entry for position, entry in enumerate(entries) if position not in reasons]
    pairs = sum(len(entry.pairs) for entry in kept)
    written = sum(shard["pairs"] for shard in split_state["shards"])
    if pairs != written:
        raise RuntimeError(f"packer bug: {written} records written for {pairs} pairs")
    summary = SplitSummary(
        pairs=pairs,
        images=len(kept),
        ids=len({label for entry in kept for _, label in entry.pairs}),
        shards=tuple(shard["name"] for shard in split_state["shards"]),
        sha256={shard["name"]: shard["sha256"] for shard in split_state["shards"]},
    )
    skipped = [{"path": entries[position].path, "reason": reason, "pairs": len(entries[position].pairs)}
               for position, reason in sorted(reasons.items())]
    return summary, skipped


def _write_split(out_dir: Path, split: str, entries: list[ImageEntry], journal: dict,
                 size: StoreSize, max_image_bytes: int, shard_size: int,
                 pool: concurrent.futures.Executor | None, workers: int,
                 verbose: bool) -> tuple[SplitSummary, list[dict]]:
    split_state = journal["splits"].setdefault(split, {"shards": [], "tail_skipped": [], "complete": False})
    if split_state["complete"]:
        _finalise_split(out_dir, split, journal)
        if _shards_match(out_dir, {shard["name"]: shard["sha256"] for shard in split_state["shards"]}):
            return split_summary(entries, split_state)
        for shard in split_state["shards"]:
            (out_dir / shard["name"]).unlink(missing_ok=True)
        split_state.update(shards=[], tail_skipped=[], complete=False)
    start = _resume_point(out_dir, split, split_state)
    writer = _SplitWriter(out_dir, split, journal, split_state)
    total_pairs = sum(len(entry.pairs) for entry in entries)
    done_pairs = sum(len(entry.pairs) for entry in entries[:start])
    # disable=None: no redrawn bar when stderr is not a terminal (CI logs, nohup); the split's
    # summary line still follows.
    with tqdm(total=total_pairs, initial=done_pairs, unit="pair", desc=f"packing {split}",
              file=sys.stderr, dynamic_ncols=True, disable=None) as progress:
        remaining = entries[start:]
        try:
            for position, entry, (image, reason) in zip(range(start, len(entries)), remaining,
                                                         _prepared(remaining, size, max_image_bytes, pool, workers, verbose)):
                if image is None:
                    writer.skip(position, reason)
                else:
                    if writer.shard_pairs and writer.shard_pairs + len(entry.pairs) > shard_size:
                        writer.close_shard(next_image=position)
                    writer.add(entry, image)
                progress.update(len(entry.pairs))
            writer.close_shard(next_image=len(entries))
        except BaseException:
            writer.abandon()
            raise
    split_state["tail_skipped"] = writer.pending_skips
    _finalise_split(out_dir, split, journal)
    return split_summary(entries, split_state)


def check_options(splits: dict[str, list[ImageEntry]], size: StoreSize, max_image_bytes: int,
                  shard_size: int, workers: int | None) -> None:
    for flag, value in (("--max-side", size.max_side), ("--max-image-bytes", max_image_bytes),
                        ("--shard-size", shard_size), ("--workers", workers)):
        if value is not None and value < 1:
            raise DualEncError(f"{flag} must be at least 1, got {value}")
    for split in splits:
        if not SPLIT_NAME.fullmatch(split):
            raise DualEncError(f"split name {split!r} may use only letters, digits and '_'")
    if not any(splits.values()):
        raise DualEncError("the annotations list no image-caption pairs to pack")


def report(out_dir: Path, manifest: Manifest) -> None:
    for split, summary in manifest.splits.items():
        print(f"{split}: {summary.pairs} pairs, {summary.images} images, {summary.ids} ids "
              f"in {len(summary.shards)} shard(s)", file=sys.stderr)
    skipped = manifest.skipped
    if skipped:
        pairs = sum(skip["pairs"] for skip in skipped)
        shown = "; ".join(f"{skip['path']}: {skip['reason']}" for skip in skipped[:SKIPS_SHOWN])
        more = f"; and {len(skipped) - SKIPS_SHOWN} more" if len(skipped) > SKIPS_SHOWN else ""
        print(f"skipped {len(skipped)} image(s) ({pairs} pairs): {shown}{more} "
              f"(all listed in {manifest_path(out_dir)})", file=sys.stderr)


def _disk_full(error: BaseException, tf: Any) -> bool:
    """Whether `error` says the disk (or the user's quota) is full: an `OSError` from Python,
    or the `ResourceExhaustedError` TensorFlow's record writer raises for ENOSPC."""
    if isinstance(error, OSError):
        return error.errno in DISK_FULL
    return isinstance(error, tf.errors.ResourceExhaustedError)


def _write_all(splits: dict[str, list[ImageEntry]], out_dir: Path, journal: dict, size: StoreSize,
               max_image_bytes: int, shard_size: int, workers: int,
               verbose: bool) -> tuple[dict[str, SplitSummary], list[dict]]:
    """Write every split's shards; returns their summaries and the images skipped."""
    image_count = sum(len(entries) for entries in splits.values())
    pool = (concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="pack-reader")
            if workers > 1 and image_count > IMAGES_PER_TASK else None)
    summaries, image_skips = {}, []
    try:
        for split in sorted(splits):
            summaries[split], split_skips = _write_split(out_dir, split, splits[split], journal, size,
                                                          max_image_bytes, shard_size, pool, workers, verbose)
            image_skips.extend(split_skips)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return summaries, image_skips


def pack(splits: dict[str, list[ImageEntry]], out_dir: Path, source: dict, *,
         skipped: Iterable[dict] = (), size: StoreSize = StoreSize(),
         max_image_bytes: int | None = None, shard_size: int | None = None,
         workers: int | None = None, overwrite: bool = False, verbose: bool = False) -> Manifest:
    """Pack `splits` into shards and `manifest.json` in `out_dir`; returns the manifest.

    `source` describes the input (``format``, absolute ``annotations``/``images`` paths, and any
    content identifiers, which join the fingerprint); `skipped` lists entries the source module
    already dropped. Images larger than `size` allows are stored scaled down to it.
    `shard_size` defaults to `DEFAULT_SHARD_SIZE`, `max_image_bytes` to
    `dualenc.data.images.DEFAULT_MAX_IMAGE_BYTES`. Images are read and validated in
    `workers` threads (default: one per core); one that is not a regular file or holds more than
    `max_image_bytes` is skipped (`tfrecords_tools.image_files`). A directory holding the same fingerprint is
    resumed or, when finished, reused as is; another dataset is refused unless `overwrite`.
    `verbose` lets TensorFlow's native log lines through (`dualenc.core.startup`).
    """
    shard_size = DEFAULT_SHARD_SIZE if shard_size is None else shard_size
    max_image_bytes = DEFAULT_MAX_IMAGE_BYTES if max_image_bytes is None else max_image_bytes
    check_options(splits, size, max_image_bytes, shard_size, workers)
    prior_skipped = list(skipped)
    run_fingerprint = fingerprint(splits, source, prior_skipped, size, shard_size, max_image_bytes)
    make_out_dir(out_dir)
    with directory_lock(out_dir, "packer"):
        claim = claim_out_dir(out_dir, run_fingerprint, overwrite)
        if "manifest" in claim:
            print(f"{out_dir} already holds this dataset, packed and verified; nothing to do", file=sys.stderr)
            return claim["manifest"]
        journal = claim["journal"]
        tf = import_tensorflow(verbose)
        try:
            summaries, image_skips = _write_all(splits, out_dir, journal, size, max_image_bytes, shard_size,
                                                workers or os.cpu_count() or 1, verbose)
            manifest = Manifest.create({**source, "fingerprint": run_fingerprint}, summaries,
                                       prior_skipped + image_skips, size.max_side, size.cover)
            manifest.write(out_dir)
        except (OSError, tf.errors.ResourceExhaustedError) as error:
            if not _disk_full(error, tf):
                raise
            finished = sum(len(split["shards"]) for split in journal["splits"].values())
            raise DualEncError(f"no space left on the disk of --out {out_dir}; free some space and re-run "
                               f"the same command: it resumes after the {finished} finished shard(s)") from None
        shards = {name for summary in summaries.values() for name in summary.shards}
        remove_packer_files(out_dir, keep=shards | {manifest_path(out_dir).name})
    report(out_dir, manifest)
    if TRAIN_SPLIT in splits:
        warning = _label_gap_warning(splits[TRAIN_SPLIT], journal["splits"][TRAIN_SPLIT])
        if warning is not None:
            print(warning, file=sys.stderr)
    return manifest
