"""A folder of images with a caption table (CSV or JSON Lines) → `ImageEntry` lists per split.

One row per pair with `image` (path relative to the image folder) and `caption`, optionally
`label` (an integer, on every row or on none) and `split` (missing or empty → "train"). CSV
files need a header row naming these columns; other columns are refused so a typo ("lable") is
not silently ignored. Labels default to each image's index in first-appearance order, so the
captions of one image share a label.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from dualenc.errors import DualEncError
from dualenc.records import normalise_caption
from tfrecords_tools.writer import SPLIT_NAME, ImageEntry, empty_caption_skip, group_pairs

REQUIRED = ("image", "caption")
OPTIONAL = ("label", "split")
DEFAULT_SPLIT = "train"


def _check_columns(where: str, columns: list[str]) -> None:
    missing = [column for column in REQUIRED if column not in columns]
    unknown = [column for column in columns if column not in REQUIRED + OPTIONAL]
    if missing or unknown:
        problem = f"missing {', '.join(map(repr, missing))}" if missing else f"unknown {', '.join(map(repr, unknown))}"
        raise DualEncError(f"{where}: {problem} column; expected image, caption and optionally label, split")


def _csv_rows(captions: Path, stream) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(stream)
    _check_columns(f"{captions} header (line 1)", [name.strip() for name in reader.fieldnames or []])
    for row in reader:
        if None in row:
            raise DualEncError(f"{captions} line {reader.line_num}: more cells than header columns")
        yield reader.line_num, {name.strip(): value for name, value in row.items() if value is not None}


def _jsonl_rows(captions: Path, stream) -> Iterator[tuple[int, dict]]:
    for line_number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DualEncError(f"{captions} line {line_number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DualEncError(f"{captions} line {line_number}: expected a JSON object, got {type(row).__name__}")
        _check_columns(f"{captions} line {line_number}", list(row))
        yield line_number, row


def _label(where: str, value: object) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise DualEncError(f"{where}: field 'label' must be an integer, got {value!r}")


def load(captions: Path, images: Path) -> tuple[dict[str, list[ImageEntry]], list[dict]]:
    """The splits of a caption table and the rows skipped for empty captions."""
    readers = {".csv": _csv_rows, ".jsonl": _jsonl_rows}
    if captions.suffix.lower() not in readers:
        raise DualEncError(f"--captions {captions}: expected a .csv or .jsonl file")
    try:
        with open(captions, encoding="utf-8", newline="") as stream:
            rows = list(readers[captions.suffix.lower()](captions, stream))
    except FileNotFoundError:
        raise DualEncError(f"captions file {captions} not found") from None
    except UnicodeDecodeError as error:
        raise DualEncError(f"{captions} is not UTF-8 text ({error.reason})") from None
    with_label = bool(rows) and "label" in rows[0][1]
    first_label_line = rows[0][0] if rows else 0
    image_index: dict[str, int] = {}
    pairs, skipped = [], []
    for line_number, row in rows:
        where = f"{captions} line {line_number}"
        for field in REQUIRED:
            if not isinstance(row.get(field), str) or (field == "image" and not row[field].strip()):
                raise DualEncError(f"{where}: field {field!r} must be a non-empty string, got {row.get(field)!r}")
        if ("label" in row) != with_label:
            raise DualEncError(f"{where}: field 'label' given on line {first_label_line} but not here, "
                               "or the reverse; give it on every row or none")
        split = row.get("split") or DEFAULT_SPLIT
        if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
            raise DualEncError(f"{where}: field 'split' must be a name of letters, digits and '_', got {split!r}")
        image_id = PurePosixPath(row["image"].strip()).as_posix()
        path = str(images / image_id)
        if not normalise_caption(row["caption"]):
            skipped.append(empty_caption_skip(path, where))
            continue
        label = _label(where, row["label"]) if with_label else image_index.setdefault(image_id, len(image_index))
        pairs.append((split, image_id, path, row["caption"], label))
    return group_pairs(pairs), skipped
