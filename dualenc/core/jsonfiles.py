"""The one reader of JSON that a user or a file gives us: bounded, and one line for any fault.

Python's `json` fails in ways that are not `json.JSONDecodeError` on input anyone can write: an
integer of more than 4,300 digits (``ValueError`` from ``int``, after the digits were scanned),
nesting deeper than the interpreter's recursion limit (``RecursionError`` — 100,000 ``[`` do it),
and it accepts the non-standard ``NaN`` and ``Infinity``, which no field of ours means. `loads`
measures the nesting before `json` sees the text (so the recursion never starts), refuses
integers longer than `MAX_INTEGER_DIGITS` and non-finite numbers, and raises `DualEncError`
naming the source for every fault. `load_file` also refuses what is not a regular file (a FIFO
would block the open, ``/dev/zero`` never ends) and files larger than a cap, before reading.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dualenc.core.errors import DualEncError
from dualenc.core.files import UnreadableFile, read_regular_file

# Our files nest a few levels (a config, a manifest, COCO's annotations: 3 to 5).
MAX_DEPTH = 100
# Our integers are ids, labels, counts and sizes: int64 has 19 digits.
MAX_INTEGER_DIGITS = 64
# Configs, manifests, journals, markers: a manifest listing 100,000 skipped images is ~20 MB.
DEFAULT_MAX_BYTES = 64 * 2**20
# Bytes measured at a time: bounds the depth check's working memory (~20 bytes a byte).
DEPTH_CHUNK_BYTES = 2**22
QUOTE = ord('"')
# Everything but quotes and brackets, which alone decide the depth once escapes are gone.
_NEITHER_QUOTE_NOR_BRACKET = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_DEPTH_STEP = np.zeros(256, np.int8)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1


def nesting_depth(text: str) -> int:
    """How deeply `text` nests arrays and objects, found without parsing it (so without the
    recursion a deep text would drive `json` into); brackets inside strings do not count.

    Escaped backslashes and escaped quotes are dropped first, so every quote left opens or
    closes a string; then only quotes and brackets are kept (C-speed string operations) and
    their running count is summed in chunks. Where `text` is not JSON the count may differ from
    a parser's, but only after the first fault, where `json` stops.
    """
    if "\\" in text:
        text = text.replace("\\\\", "").replace('\\"', "")
    kept = np.frombuffer(text.encode("utf-8").translate(None, _NEITHER_QUOTE_NOR_BRACKET), np.uint8)
    depth = deepest = 0
    inside = 0  # 1 when the previous chunk ended inside a string
    for start in range(0, kept.size, DEPTH_CHUNK_BYTES):
        chunk = kept[start:start + DEPTH_CHUNK_BYTES]
        quotes = np.cumsum(chunk == QUOTE, dtype=np.int64) + inside
        levels = depth + np.cumsum(np.where(quotes % 2 == 1, 0, _DEPTH_STEP[chunk]), dtype=np.int64)
        deepest, depth, inside = max(deepest, int(levels.max())), int(levels[-1]), int(quotes[-1] % 2)
    return deepest


def check_nesting(text: str, source: str, hint: str = "") -> None:
    """`DualEncError` when `text` nests deeper than `MAX_DEPTH` (`loads` checks this first;
    callers that hand JSON text to another library's parser, as Beam's options do, check it here)."""
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise DualEncError(f"{source} nests arrays or objects {depth} deep, more than the {MAX_DEPTH} "
                           f"any of our JSON needs{_then(hint)}")


def _then(hint: str) -> str:
    return f"; {hint}" if hint else ""


def loads(text: str, source: str, *, hint: str = "", allow_nonfinite: bool = False) -> Any:
    """The value of the JSON `text`; `source` names it in errors ("TF_CONFIG", "config file
    a.json"), `hint` says what to do. `DualEncError` (one line) for text that is not JSON, nests
    deeper than `MAX_DEPTH`, holds an integer of more than `MAX_INTEGER_DIGITS` digits, or,
    unless `allow_nonfinite` (files where a diverged loss may be recorded), NaN or an infinity.
    """
    check_nesting(text, source, hint)

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
            raise DualEncError(f"{source} holds an integer of {len(digits.lstrip('-'))} digits "
                               f"({digits[:20]}...); ours have at most {MAX_INTEGER_DIGITS}{_then(hint)}")
        return int(digits)

    def number(digits: str) -> float:
        value = float(digits)
        if not (allow_nonfinite or math.isfinite(value)):
            raise DualEncError(f"{source} holds the number {digits[:20]}, too large for a float{_then(hint)}")
        return value

    def constant(name: str) -> float:
        if not allow_nonfinite:
            raise DualEncError(f"{source} holds {name}, which is not a number JSON allows{_then(hint)}")
        return float(name.replace("Infinity", "inf"))

    try:
        return json.loads(text, parse_int=integer, parse_float=number, parse_constant=constant)
    except json.JSONDecodeError as error:
        raise DualEncError(f"{source} is not valid JSON ({error.msg} at line {error.lineno} "
                           f"column {error.colno}){_then(hint)}") from None


def load_file(path: str | Path, label: str, *, hint: str = "", max_bytes: int = DEFAULT_MAX_BYTES,
              allow_nonfinite: bool = False) -> Any:
    """`loads` of the UTF-8 file at `path`; `label` ("config file", "annotations file") names it.

    `DualEncError` (one line) also when the file is missing, a directory or anything but a
    regular file (a FIFO is never waited on: it is opened without blocking and refused), larger
    than `max_bytes`, unreadable or not UTF-8.
    """
    path = Path(path)
    where = f"{label} {path}"
    try:
        data = read_regular_file(path, max_bytes)
    except UnreadableFile as refused:
        raise DualEncError({
            "missing": f"{where} does not exist{_then(hint)}",
            "directory": f"{where} is a directory; pass a JSON file",
            "special": f"{where} is not a regular file (a device, FIFO or socket); pass a JSON file",
            "too large": f"{where} holds {refused.size:,} bytes, more than the {max_bytes:,} a {label} may have{_then(hint)}"
            if refused.size else f"{where} holds more than the {max_bytes:,} bytes a {label} may have{_then(hint)}",
            "error": f"cannot read {where} ({refused.reason}){_then(hint)}",
        }[refused.kind]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = f"byte 0x{error.object[error.start]:02x} at offset {error.start}"
        raise DualEncError(f"{where} is not UTF-8 text ({byte}); save it as UTF-8 JSON") from None
    return loads(text, where, hint=hint, allow_nonfinite=allow_nonfinite)
