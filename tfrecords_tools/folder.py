"""A folder of images with a caption table (CSV or JSON Lines) → `ImageEntry` lists per split.

One row per pair with `image` (path relative to the image folder) and `caption`, optionally
`label` (an integer from 0 to 2**63 − 1, TFRecord's int64, on every row or on none) and `split`
(missing or empty → "train"). CSV files need a header row naming these columns; other columns
are refused so a typo ("lable") is not silently ignored. Without labels each image gets its own,
so the captions of one image share it: the images of the "train" split numbered 0..n-1 in order
of first appearance, then the others (`train_first_labels`).

A CSV quote left open would swallow the rows after it into one caption. Python's reader in
strict mode refuses a quote still open at the end of the file or closed in mid-field; a quoted
caption that spans lines and holds what look like rows (``b.jpg,a dog``) is refused too, naming
the line the quote opened on. Fields may be as long as in JSON Lines (Python's default CSV limit
is 128 KiB).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from dualenc.core import jsonfiles
from dualenc.core.errors import DualEncError
from dualenc.data.images import SUPPORTED_SUFFIXES
from dualenc.data.records import normalise_caption
from tfrecords_tools.image_files import ImageDirectory
from tfrecords_tools.writer import SPLIT_NAME, ImageEntry, empty_caption_skip, group_pairs, train_first_labels

REQUIRED = ("image", "caption")
OPTIONAL = ("label", "split")
DEFAULT_SPLIT = "train"
LABEL_RANGE = range(0, 2**63)  # TFRecord stores labels as int64; identities count from 0
CSV_FIELD_LIMIT = 2**31 - 1  # the largest the csv module accepts on every platform
# What Python's strict CSV reader says of a quote left open: at the end of the file, or closed
# by a later quote that is not followed by a delimiter.
QUOTE_ERRORS = ("unexpected end of data", "expected after '\"'")
LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _check_columns(where: str, columns: list[str]) -> None:
    missing = [column for column in REQUIRED if column not in columns]
    unknown = [column for column in columns if column not in REQUIRED + OPTIONAL]
    if missing or unknown:
        problem = f"missing {', '.join(map(repr, missing))}" if missing else f"unknown {', '.join(map(repr, unknown))}"
        raise DualEncError(f"{where}: {problem} column; expected image, caption and optionally label, split")


def _swallowed_row(caption: str) -> str | None:
    """A line after the first of a multi-line `caption` that looks like a row of the table (its
    first cell an image file name), as a quote left open would leave it; None when there is none."""
    for line in caption.splitlines()[1:]:
        cell = line.split(",", 1)[0].strip().lower()
        if "," in line and cell.endswith(SUPPORTED_SUFFIXES):
            return line
    return None


def _csv_rows(captions: Path, stream) -> Iterator[tuple[int, dict]]:
    # Raised, never lowered: a process-wide setting of the csv module.
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.DictReader(stream, strict=True)
    row_start = 2  # where the row being read starts (blank lines before it aside)
    try:
        _check_columns(f"{captions} header (line 1)", [name.strip() for name in reader.fieldnames or []])
        for row in reader:
            breaks = sum(len(LINE_BREAK.findall(value)) for value in row.values() if isinstance(value, str))
            row_start = reader.line_num - breaks
            where = f"{captions} line {row_start}"
            if None in row:
                raise DualEncError(f"{where}: more cells than header columns")
            swallowed = _swallowed_row(row.get("caption") or "")
            if swallowed is not None:
                raise DualEncError(f"{where}: the quoted caption opened here runs on over later rows "
                                   f"({swallowed.strip()!r:.60}); close the quote, or write a quote inside a "
                                   'caption as ""')
            yield row_start, {name.strip(): value for name, value in row.items() if value is not None}
            row_start = reader.line_num + 1
    except csv.Error as error:
        if not any(sign in str(error) for sign in QUOTE_ERRORS):
            raise DualEncError(f"{captions} line {row_start}: not valid CSV ({error})") from None
        raise DualEncError(f"{captions} line {row_start}: a quote opened on this row is not closed where a "
                           f'cell ends ({error}); close it, or write a quote inside a caption as ""') from None


def _jsonl_rows(captions: Path, stream) -> Iterator[tuple[int, dict]]:
    for line_number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        row = jsonfiles.loads(line, f"{captions} line {line_number}")
        if not isinstance(row, dict):
            raise DualEncError(f"{captions} line {line_number}: expected a JSON object, got {type(row).__name__}")
        _check_columns(f"{captions} line {line_number}", list(row))
        yield line_number, row


def _label(where: str, value: object) -> int:
    label = None
    if isinstance(value, str):
        try:
            label = int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        label = value
    if label is None:
        raise DualEncError(f"{where}: field 'label' must be an integer, got {value!r:.80}")
    if label not in LABEL_RANGE:
        raise DualEncError(f"{where}: field 'label' {str(label):.40} is outside 0..2**63-1 (TFRecord's int64); "
                           "number the identities from 0")
    return label


def load(captions: Path, images: Path,
         allow_outside_images: bool = False) -> tuple[dict[str, list[ImageEntry]], list[dict]]:
    """The splits of a caption table and the rows skipped for empty captions; `DualEncError`
    for an `image` that resolves outside `images`, unless `allow_outside_images`
    (`tfrecords_tools.image_files`)."""
    readers = {".csv": _csv_rows, ".jsonl": _jsonl_rows}
    if captions.suffix.lower() not in readers:
        raise DualEncError(f"--captions {captions}: expected a .csv or .jsonl file")
    try:
        with open(captions, encoding="utf-8-sig", newline="") as stream:  # -sig: a BOM, as Excel writes
            rows = list(readers[captions.suffix.lower()](captions, stream))
    except FileNotFoundError:
        raise DualEncError(f"captions file {captions} not found") from None
    except UnicodeDecodeError as error:
        raise DualEncError(f"{captions} is not UTF-8 text ({error.reason})") from None
    except OSError as error:
        raise DualEncError(f"cannot read captions file {captions} ({error.strerror or error})") from None
    with_label = bool(rows) and "label" in rows[0][1]
    first_label_line = rows[0][0] if rows else 0
    directory = ImageDirectory(images, allow_outside_images)
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
        path = directory.path(image_id, where)
        if not normalise_caption(row["caption"]):
            skipped.append(empty_caption_skip(path, where))
            continue
        pairs.append((split, image_id, path, row["caption"], _label(where, row["label"]) if with_label else None))
    if not with_label:
        label_of = train_first_labels((image_id, split) for split, image_id, *_ in pairs)
        pairs = [(split, image_id, path, caption, label_of[image_id]) for split, image_id, path, caption, _ in pairs]
    return group_pairs(pairs), skipped
