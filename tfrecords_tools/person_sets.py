"""The person-search sets released as one JSON list of images (ICFG-PEDES, RSTPReid) →
`ImageEntry` lists per split.

Each entry is ``{"id": int, <path field>: str, "captions": [str, ...], "split": str, ...}``,
the path relative to the `imgs/` directory; the sets differ only in the path field's name
(`tfrecords_tools.icfg_pedes`, `tfrecords_tools.rstpreid`). Every entry names its split, one of
`SPLITS` (what IRRA's readers take); a person's images all lie in one split, so the test
identities are people training never saw, and an identity found in two splits is refused. An
image listed twice is merged (its captions in entry order) when both entries name one identity,
refused otherwise.

Labels: the identity `id`s of "train", sorted, numbered 0..n-1, then those of the other splits,
sorted, from n on (`train_first_labels`). The released train ids are 0..n-1 already (IRRA
asserts it), so there a train label is the id itself.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from dualenc.core.errors import DualEncError
from dualenc.data.records import normalise_caption
from tfrecords_tools.image_files import ImageDirectory
from tfrecords_tools.writer import ImageEntry, empty_caption_skip, group_pairs, read_json_file, train_first_labels

SPLITS = ("train", "val", "test")


def _checked_entry(where: str, entry: object, path_field: str) -> dict:
    if not isinstance(entry, dict):
        raise DualEncError(f"{where}: expected an object with id, {path_field}, captions, split, "
                           f"got {type(entry).__name__}")
    identity = entry.get("id")
    if isinstance(identity, bool) or not isinstance(identity, int):
        raise DualEncError(f"{where}: field 'id' must be an integer, got {identity!r:.80}")
    path = entry.get(path_field)
    if not isinstance(path, str) or not path.strip():
        raise DualEncError(f"{where}: field {path_field!r} must be a non-empty string, got {path!r:.80}")
    captions = entry.get("captions")
    if not isinstance(captions, list) or not captions or not all(isinstance(caption, str) for caption in captions):
        raise DualEncError(f"{where}: field 'captions' must be a non-empty list of strings, got {captions!r:.80}")
    if entry.get("split") not in SPLITS:
        raise DualEncError(f"{where}: field 'split' must be one of {', '.join(SPLITS)}, got {entry.get('split')!r:.80}")
    return entry


def _check_one_split_per_identity(annotations: Path, entries: list[dict]) -> None:
    first: dict[int, int] = {}
    for index, entry in enumerate(entries):
        earlier = first.setdefault(entry["id"], index)
        if entries[earlier]["split"] != entry["split"]:
            raise DualEncError(f"{annotations} entry {index}: identity {entry['id']} is in split "
                               f"{entry['split']!r} but in {entries[earlier]['split']!r} at entry {earlier}; "
                               "a person's images belong to one split")


def load_identity_list(annotations: Path, images: Path, path_field: str,
                       allow_outside_images: bool = False) -> tuple[dict[str, list[ImageEntry]], list[dict]]:
    """The splits of a person-search annotation list whose entries name their image in
    `path_field`, and the captions skipped as empty; `DualEncError` for a malformed entry, an
    identity in two splits, an image listed twice with another identity, or a path
    that resolves outside `images` unless `allow_outside_images` (`tfrecords_tools.image_files`)."""
    content = read_json_file(annotations)
    if not isinstance(content, list):
        raise DualEncError(f"{annotations}: expected a JSON list of entries, got {type(content).__name__}")
    entries = [_checked_entry(f"{annotations} entry {index}", entry, path_field)
               for index, entry in enumerate(content)]
    _check_one_split_per_identity(annotations, entries)
    label_of = train_first_labels(sorted((entry["id"], entry["split"]) for entry in entries))
    directory = ImageDirectory(images, allow_outside_images)
    first_index: dict[str, int] = {}
    rows, skipped = [], []
    for index, entry in enumerate(entries):
        where = f"{annotations} entry {index}"
        image_id = PurePosixPath(entry[path_field].replace("\\", "/")).as_posix()
        earlier = first_index.setdefault(image_id, index)
        if entries[earlier]["id"] != entry["id"]:
            raise DualEncError(f"{where}: image {image_id!r} is listed as identity {entry['id']} here and "
                               f"{entries[earlier]['id']} at entry {earlier}; an image shows one person")
        path = directory.path(image_id, where)
        for caption_index, caption in enumerate(entry["captions"]):
            if not normalise_caption(caption):
                skipped.append(empty_caption_skip(path, f"{where} caption {caption_index}"))
                continue
            rows.append((entry["split"], image_id, path, caption, label_of[entry["id"]]))
    return group_pairs(rows), skipped
