"""CUHK-PEDES annotations (`reid_raw.json` or `caption_all.json`) → `ImageEntry` lists per split.

Each entry is ``{"id": int, "file_path": "CUHK01/0363004.png", "captions": [str, ...],
"split": "train"|"val"|"test", ...}`` with `file_path` relative to the `imgs/` directory.
`caption_all.json` has the same fields but no `split`; then every entry goes to
`default_split`. A file must give `split` on every entry or on none.

Labels: the identity `id`s of the "train" split, sorted, numbered 0..n-1, then those of the
other splits, sorted, from n on (`train_first_labels`): training sizes its classifier to the
train identities. The real dataset's train ids are its lowest (1..11003), so a label is id − 1
there; gaps in a subset are closed.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from dualenc.core.errors import DualEncError
from dualenc.data.records import normalise_caption
from tfrecords_tools.image_files import ImageDirectory
from tfrecords_tools.writer import (
    SPLIT_NAME,
    ImageEntry,
    empty_caption_skip,
    group_pairs,
    read_json_file,
    train_first_labels,
)


def _checked_entry(annotations: Path, index: int, entry: object, with_split: bool) -> dict:
    where = f"{annotations} entry {index}"
    if not isinstance(entry, dict):
        raise DualEncError(f"{where}: expected an object with id, file_path, captions, got {type(entry).__name__}")
    identity = entry.get("id")
    if isinstance(identity, bool) or not isinstance(identity, int):
        raise DualEncError(f"{where}: field 'id' must be an integer, got {identity!r}")
    file_path = entry.get("file_path")
    if not isinstance(file_path, str) or not file_path.strip():
        raise DualEncError(f"{where}: field 'file_path' must be a non-empty string, got {file_path!r}")
    captions = entry.get("captions")
    if not isinstance(captions, list) or not all(isinstance(caption, str) for caption in captions):
        raise DualEncError(f"{where}: field 'captions' must be a list of strings, got {captions!r:.80}")
    if ("split" in entry) != with_split:
        state = "lacks" if with_split else "has"
        raise DualEncError(f"{where}: {state} field 'split' unlike entry 0; give 'split' on every entry or none")
    if with_split and not (isinstance(entry["split"], str) and SPLIT_NAME.fullmatch(entry["split"])):
        raise DualEncError(f"{where}: field 'split' must be a name of letters, digits and '_', got {entry['split']!r}")
    return entry


def load(annotations: Path, images: Path, default_split: str = "train",
         allow_outside_images: bool = False) -> tuple[dict[str, list[ImageEntry]], list[dict]]:
    """The splits of a CUHK-PEDES annotation file and the captions skipped as empty;
    `DualEncError` for a `file_path` that resolves outside `images`, unless
    `allow_outside_images` (`tfrecords_tools.image_files`)."""
    content = read_json_file(annotations)
    if not isinstance(content, list):
        raise DualEncError(f"{annotations}: expected a JSON list of entries, got {type(content).__name__}")
    with_split = bool(content) and isinstance(content[0], dict) and "split" in content[0]
    entries = [_checked_entry(annotations, index, entry, with_split) for index, entry in enumerate(content)]
    split_of = [entry["split"] if with_split else default_split for entry in entries]
    label_of = train_first_labels(sorted((entry["id"], split) for entry, split in zip(entries, split_of)))
    directory = ImageDirectory(images, allow_outside_images)
    rows, skipped = [], []
    for index, entry in enumerate(entries):
        image_id = PurePosixPath(entry["file_path"].replace("\\", "/")).as_posix()
        path = directory.path(image_id, f"{annotations} entry {index}")
        for caption_index, caption in enumerate(entry["captions"]):
            if not normalise_caption(caption):
                skipped.append(empty_caption_skip(path, f"{annotations} entry {index} caption {caption_index}"))
                continue
            rows.append((split_of[index], image_id, path, caption, label_of[entry["id"]]))
    return group_pairs(rows), skipped
