"""The best text->image identity R@1 the demo's captions allow, whatever the model.

A demo caption names only some of its person's attributes (`tfrecords_tools.demo_captions`), and a
demo identity is nothing but its attributes, so several people of a split often fit one caption
("a woman in a red coat"). Nothing in the caption tells them apart. A model that reads every
named attribute perfectly ranks the images of all the people who fit first, in no particular
order among them, so its R@1 for that caption is, in expectation, the true person's share of
those images::

    ceiling(caption) = images(true person) / sum(images(p) for every person p who fits it)

`identity_ceiling` averages it over a split's captions, as R@1 averages over them. It bounds
what the recipe can reach on the demo (`dualenc.training.presets`): a score near it says the
model reads the captions as well as they can be read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dualenc.core import jsonfiles
from tfrecords_tools.demo import ATTRIBUTES_NAME, REID_RAW_NAME
from tfrecords_tools.demo_captions import named_attributes


def identity_ceiling(captions: Sequence[tuple[str, int]], people: Mapping[int, Mapping[str, str]],
                     images: Mapping[int, int]) -> float:
    """Mean `ceiling` (percent) of `captions`, each (caption, its person's id), among `people`
    (id -> attributes) with `images` (id -> how many gallery images each has)."""
    ids = np.array(sorted(people))
    image_counts = np.array([images[person] for person in ids], dtype=np.float64)
    keys = sorted({key for attributes in people.values() for key in attributes})
    values = {key: np.array([people[person][key] for person in ids]) for key in keys}
    shares = []
    for caption, person in captions:
        fits = np.ones(len(ids), dtype=bool)
        for key, value in named_attributes(caption).items():
            fits &= values[key] == value
        shares.append(images[person] / image_counts[fits].sum())
    return 100.0 * float(np.mean(shares))


def demo_split_ceiling(raw_dir: Path, split: str) -> float:
    """`identity_ceiling` of `split` of the raw demo in `raw_dir` (``reid_raw.json`` and ``attributes.json``)."""
    hint = "re-generate the demo"
    entries = [entry for entry in jsonfiles.load_file(raw_dir / REID_RAW_NAME, "demo annotations", hint=hint)
               if entry["split"] == split]
    truth = jsonfiles.load_file(raw_dir / ATTRIBUTES_NAME, "demo attributes file", hint=hint)
    people = {entry["id"]: truth[entry["file_path"]] for entry in entries}
    images: dict[int, int] = {}
    for entry in entries:
        images[entry["id"]] = images.get(entry["id"], 0) + 1
    return identity_ceiling([(caption, entry["id"]) for entry in entries for caption in entry["captions"]], people, images)


def demo_pack_ceiling(data_dir: Path, split: str) -> float | None:
    """`demo_split_ceiling` of `split` of the raw demo that `data_dir` was packed from; None
    when `data_dir` is no demo pack (`dualenc.retrieval.attributes.demo_cache_of`)."""
    from dualenc.data.manifest import load_manifest

    source = load_manifest(data_dir).source
    if "demo_marker_sha256" not in source:
        return None
    return demo_split_ceiling(Path(source["annotations"]).parent, split)
