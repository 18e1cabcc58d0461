"""The manifest of a packed dataset as one typed, validated value, shared by packer and readers.

``manifest.json`` (format version 1) lies beside the shards and looks like::

    {"cover_size": [64, 32],
     "created": "2025-01-01T00:00:00+00:00",
     "format_version": 1,
     "image_size": null,
     "skipped": [{"pairs": 2, "path": "/abs/imgs/a.jpg", "reason": "file not found"}],
     "source": {"annotations": "/abs/reid_raw.json", "fingerprint": "<sha256>",
                "format": "cuhk-pedes", "images": "/abs/imgs"},
     "splits": {"train": {"ids": 1, "images": 2, "pairs": 3,
                          "sha256": {"train-00000-of-00001.tfrecord": "<hex>"},
                          "shards": ["train-00000-of-00001.tfrecord"]}}}

`Manifest.from_json` is the one validation: the packer (deciding whether to resume) and every
reader see the same checks, and a bad field is reported in one line naming the file and the
field (``splits.train.pairs``). ``source``, ``skipped``, ``image_size`` (the packer's
``--max-side``), ``cover_size`` (the model input ``[height, width]`` its ``--preset`` stores images
just large enough to cover; absent when none) and ``created`` are descriptive and may be absent;
the splits are what readers rely on. Written with sorted keys,
so the same content always gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from dualenc.core import jsonfiles
from dualenc.core.errors import DualEncError
from dualenc.core.files import write_json_atomic
from dualenc.data.records import FORMAT_VERSION, MANIFEST_NAME

PACK_HINT = "re-pack the dataset"
# Held-out split names, in the order `default_split` prefers them.
TEST_SPLITS = ("test", "val", "valid", "validation")


def manifest_path(data_dir: str | Path) -> Path:
    """Where the manifest of the packed dataset in `data_dir` lives."""
    return Path(data_dir) / MANIFEST_NAME


class _Fields:
    """Reads typed fields of a JSON object, raising one-line errors naming file and field."""

    def __init__(self, path: Path, prefix: str, content: Any):
        self.path, self.prefix = path, prefix
        if not isinstance(content, dict):
            self.fail(prefix, f"is not an object (got {_type_name(content)})")
        self.content = content

    def fail(self, field: str, problem: str) -> NoReturn:
        raise DualEncError(f"{self.path}: {field} {problem}; {PACK_HINT}")

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def count(self, key: str) -> int:
        value = self.content.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(self.name(key), f"must be a non-negative integer, got {value!r}")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.content.get(key)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.fail(self.name(key), f"must be a list of strings, got {_type_name(value)}")
        return tuple(value)

    def optional(self, key: str, kind: type, default: Any, expected: str) -> Any:
        value = self.content.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            self.fail(self.name(key), f"must be {expected}, got {value!r}")
        return value


def _cover_size(fields: _Fields) -> tuple[int, int] | None:
    """The optional ``cover_size``: two positive integers or absent/null."""
    value = fields.optional("cover_size", list, None, "[height, width] or null")
    if value is None:
        return None
    if len(value) != 2 or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in value):
        fields.fail("cover_size", f"must be [height, width], two positive integers, got {value!r}")
    return (value[0], value[1])


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)


@dataclasses.dataclass(frozen=True)
class SplitSummary:
    """One split: record (`pairs`), distinct image and label (`ids`) counts, shard names in
    reading order and each shard's sha256."""

    pairs: int
    images: int
    ids: int
    shards: tuple[str, ...]
    sha256: Mapping[str, str]

    @classmethod
    def from_json(cls, content: Any, path: Path, split: str) -> SplitSummary:
        """The summary of `split` from its manifest entry; `DualEncError` naming the bad field."""
        fields = _Fields(path, f"splits.{split}", content)
        shards = fields.strings("shards")
        sha256 = content.get("sha256")
        if not isinstance(sha256, dict) or not all(isinstance(value, str) for value in sha256.values()):
            fields.fail(fields.name("sha256"), f"must be an object of shard name to hex digest, got {_type_name(sha256)}")
        for shard in shards:
            if shard not in sha256:
                fields.fail(fields.name("sha256"), f"has no entry for shard {shard!r}")
        return cls(
            pairs=fields.count("pairs"),
            images=fields.count("images"),
            ids=fields.count("ids"),
            shards=shards,
            sha256=MappingProxyType(dict(sha256)),
        )

    def to_json(self) -> dict:
        return {"pairs": self.pairs, "images": self.images, "ids": self.ids,
                "shards": list(self.shards), "sha256": dict(self.sha256)}


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a finished packed directory holds (see the module docstring)."""

    splits: Mapping[str, SplitSummary]
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    skipped: tuple[Mapping[str, Any], ...] = ()
    image_size: int | None = None
    created: str | None = None
    cover_size: tuple[int, int] | None = None

    @classmethod
    def create(cls, source: Mapping[str, Any], splits: Mapping[str, SplitSummary],
               skipped: list[Mapping[str, Any]], image_size: int | None,
               cover_size: tuple[int, int] | None = None) -> Manifest:
        """A new manifest stamped with the current UTC time."""
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(splits=MappingProxyType(dict(splits)), source=MappingProxyType(dict(source)),
                   skipped=tuple(skipped), image_size=image_size, created=created, cover_size=cover_size)

    @classmethod
    def from_json(cls, content: Any, path: Path) -> Manifest:
        """The manifest parsed from `path`'s JSON `content`; `DualEncError` naming the bad field."""
        if not isinstance(content, dict) or content.get("format_version") != FORMAT_VERSION:
            found = content.get("format_version") if isinstance(content, dict) else None
            raise DualEncError(f"{path} has format_version {found!r}, expected {FORMAT_VERSION}; {PACK_HINT}")
        fields = _Fields(path, "", content)
        if not isinstance(content.get("splits"), dict):
            raise DualEncError(f"{path} has no 'splits' object; {PACK_HINT}")
        splits = {name: SplitSummary.from_json(entry, path, name) for name, entry in content["splits"].items()}
        skipped = fields.optional("skipped", list, [], "a list of objects")
        if not all(isinstance(entry, dict) for entry in skipped):
            fields.fail("skipped", "must be a list of objects")
        return cls(
            splits=MappingProxyType(splits),
            source=MappingProxyType(dict(fields.optional("source", dict, {}, "an object"))),
            skipped=tuple(skipped),
            image_size=fields.optional("image_size", int, None, "an integer or null"),
            created=fields.optional("created", str, None, "a string"),
            cover_size=_cover_size(fields),
        )

    def to_json(self) -> dict:
        """The JSON object of `manifest.json`, the inverse of `from_json`."""
        return {
            "format_version": FORMAT_VERSION,
            "source": dict(self.source),
            "splits": {name: summary.to_json() for name, summary in self.splits.items()},
            "skipped": [dict(entry) for entry in self.skipped],
            "image_size": self.image_size,
            "created": self.created,
            **({"cover_size": list(self.cover_size)} if self.cover_size is not None else {}),
        }

    def write(self, data_dir: str | Path) -> Path:
        """Write ``manifest.json`` into `data_dir` atomically, keys sorted; returns its path."""
        return write_json_atomic(manifest_path(data_dir), self.to_json(), sort_keys=True)

    def non_empty_splits(self) -> list[str]:
        """Names of the splits holding at least one pair, sorted."""
        return sorted(name for name, summary in self.splits.items() if summary.pairs)

    def split(self, name: str, data_dir: str | Path, *, allow_empty: bool = False) -> SplitSummary:
        """The summary of split `name` (non-empty unless `allow_empty`), or a `DualEncError`
        naming `data_dir` and listing the non-empty splits."""
        valid = ", ".join(self.non_empty_splits()) or "none"
        if name not in self.splits:
            raise DualEncError(f"{data_dir} has no split {name!r}; valid splits: {valid}")
        if not (allow_empty or self.splits[name].pairs):
            raise DualEncError(f"split {name!r} in {data_dir} is empty; valid splits: {valid}")
        return self.splits[name]


def default_split(manifest: Manifest, data_dir: str | Path) -> str:
    """The split searched, evaluated and finally scored when none is named: "test", else the
    first of val/valid/validation, else the first non-empty split in manifest order.

    The one rule for ``search.py`` and training alike; `DualEncError` naming `data_dir` when no
    split holds a pair.
    """
    names = [name for name, summary in manifest.splits.items() if summary.pairs]
    if not names:
        raise DualEncError(f"packed dataset {data_dir} has no non-empty split; {PACK_HINT}")
    return next((name for name in TEST_SPLITS if name in names), names[0])


def read_manifest_file(path: str | Path) -> Manifest:
    """The validated manifest at `path` (its shards are not looked for; see `load_manifest`)."""
    path = Path(path)
    return Manifest.from_json(jsonfiles.load_file(path, "manifest", hint=PACK_HINT), path)


def load_manifest(data_dir: str | Path) -> Manifest:
    """The validated manifest of the packed dataset in `data_dir`, every listed shard present.

    Raises `DualEncError` when the directory or manifest is missing, the manifest is not JSON,
    has another format version or a malformed field, or a shard it lists is missing.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DualEncError(f"data directory {data_dir} does not exist; pack one with `python -m tfrecords_tools`")
    path = manifest_path(data_dir)
    if not path.is_file():
        raise DualEncError(
            f"{path} not found: {data_dir} is not a packed dataset (or its packing did not finish); "
            "pack it with `python -m tfrecords_tools`"
        )
    manifest = read_manifest_file(path)
    for split, summary in manifest.splits.items():
        for name in summary.shards:
            if not (data_dir / name).is_file():
                raise DualEncError(f"shard {data_dir / name} of split {split!r} listed in {path} is missing; {PACK_HINT}")
    return manifest
