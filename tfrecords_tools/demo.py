"""Write a small synthetic pedestrian dataset in exactly the CUHK-PEDES layout.

The demo lets the whole pipeline (pack, train, search) run offline in minutes on a CPU::

    out_dir/
      imgs/0001/0001_01.png ...   128 × 64 RGB crops, mostly PNG, every fifth one JPEG
      reid_raw.json               [{"id", "file_path", "captions", "processed_tokens", "split"}]
      attributes.json             {file_path: {"gender", "upper", "upper_color", ...}}
      demo.json                   marker: generator, version, parameters and counts (written last)

An identity is one combination of attributes, drawn without replacement; each has 3–6 images
in different poses, scenes and lighting, each image 1–3 captions (`demo_captions`). `file_path`
is relative to ``imgs/`` as in CUHK-PEDES. Identities are numbered from 1 and split 70/15/15 %
into train, val and test with disjoint identities; train takes the lowest ids so a classifier
over train identities can use ``id - 1`` directly.

Output is byte-identical for the same (identities, seed): every random draw comes from a numpy
Generator seeded by (seed, identity), images are encoded with fixed settings and no metadata,
and JSON is written with sorted keys.
"""

import concurrent.futures
import io
import itertools
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dualenc.core import jsonfiles
from dualenc.core.errors import DualEncError
from dualenc.core.files import atomic_directory
from tfrecords_tools.demo_captions import COLORS, make_caption, tokenize
from tfrecords_tools.demo_render import render_person, sample_look

GENDERS = ("woman", "man")
UPPERS = ("coat", "jacket", "shirt", "sweater")
LOWERS = ("pants", "shorts", "skirt")
BAGS = ("backpack", "handbag", "none")
ATTRIBUTE_VALUES = {
    "gender": GENDERS,
    "upper": UPPERS,
    "upper_color": COLORS,
    "lower": LOWERS,
    "lower_color": COLORS,
    "bag": BAGS,
}

# About 4,000 × 0.7 × 4.5 images × 2 captions ≈ 25,000 training pairs. Measured on the public
# attribute queries (`dualenc.retrieval.attributes`), the same training time buys more from more people
# than from more epochs: 1,000 people × 30 epochs gave precision@9 0.73-0.77 (the model learns
# each outfit's pixels: validation loss rises from epoch 5), 3,000 × 10 gave 0.82, 4,000 × 10 0.84.
DEFAULT_IDENTITIES = 4000
MIN_IDENTITIES = 10
IMAGES_PER_IDENTITY = (3, 6)
CAPTIONS_PER_IMAGE = (1, 3)
SPLIT_PERCENT = {"val": 15, "test": 15}
JPEG_EVERY = 5  # CUHK-PEDES mixes PNG and JPEG; so does the demo: one image in five
# Drawing is spread over worker processes (one per core) from this many identities on.
PARALLEL_FROM = 200
IDENTITIES_PER_TASK = 50
JPEG_QUALITY = 92
PNG_COMPRESS_LEVEL = 6

IMAGES_DIR = "imgs"
REID_RAW_NAME = "reid_raw.json"
ATTRIBUTES_NAME = "attributes.json"
MARKER_NAME = "demo.json"
GENERATOR_NAME = "dualenc-demo"
# Bump when the output for the same parameters changes, so old demo datasets get rebuilt.
GENERATOR_VERSION = 4


def attribute_combinations() -> list[dict[str, str]]:
    """Every drawable identity, in a fixed order. A coat would hide shorts, so that pair is left out."""
    combinations = []
    for values in itertools.product(*ATTRIBUTE_VALUES.values()):
        attributes = dict(zip(ATTRIBUTE_VALUES, values))
        if not (attributes["upper"] == "coat" and attributes["lower"] == "shorts"):
            combinations.append(attributes)
    return combinations


def split_sizes(identities: int) -> dict[str, int]:
    """Identities per split: 15 % each (rounded down, at least one) for val and test, the rest for train."""
    held_out = {split: max(1, identities * percent // 100) for split, percent in SPLIT_PERCENT.items()}
    return {"train": identities - sum(held_out.values()), **held_out}


def make_demo(out_dir: str | Path, identities: int = DEFAULT_IDENTITIES, seed: int = 0) -> Path:
    """Write the demo dataset into `out_dir` (or reuse it) and return `out_dir`.

    A complete demo dataset with the same parameters is returned untouched; one with other
    parameters is replaced. Any other non-empty directory is refused, so nothing foreign is ever
    deleted. The dataset is built in a hidden sibling directory and renamed into place, so an
    interrupted run never leaves a half-written dataset behind a valid marker.
    """
    out_dir = Path(out_dir)
    combinations = attribute_combinations()
    valid_count = isinstance(identities, int) and not isinstance(identities, bool)
    if not (valid_count and MIN_IDENTITIES <= identities <= len(combinations)):
        raise DualEncError(
            f"demo identities must be an integer from {MIN_IDENTITIES} to {len(combinations)}, got {identities!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DualEncError(f"demo seed must be a non-negative integer, got {seed!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise DualEncError(f"demo output {out_dir} is a file; pick an empty or new directory")
    wanted = {"generator": GENERATOR_NAME, "version": GENERATOR_VERSION, "identities": identities, "seed": seed}
    if out_dir.is_dir() and any(out_dir.iterdir()):
        marker = _read_marker(out_dir)
        if marker is None:
            raise DualEncError(
                f"demo output {out_dir} is not empty and holds no demo dataset; pick an empty or new directory"
            )
        if all(marker.get(key) == value for key, value in wanted.items()):
            return out_dir

    # Built beside `out_dir` and swapped in whole (replacing an empty or outdated one).
    with atomic_directory(out_dir) as building:
        counts = _write_dataset(building, identities, seed, combinations)
        _write_json(building / MARKER_NAME, {**wanted, "counts": counts})
    return out_dir


def _read_marker(directory: Path) -> dict | None:
    """The demo marker's content, or None when the directory holds no demo dataset."""
    try:
        marker = jsonfiles.load_file(directory / MARKER_NAME, "demo marker")
    except DualEncError:
        return None
    return marker if isinstance(marker, dict) and marker.get("generator") == GENERATOR_NAME else None


def _write_dataset(root: Path, identities: int, seed: int, combinations: list[dict[str, str]]) -> dict:
    """Draw and write every image, `reid_raw.json` and `attributes.json`; return the counts.

    Identities are drawn in `_draw_identities` tasks, in worker processes when there are enough
    of them to repay a worker's start-up; each draws from its own (seed, identity) generator, so
    the output does not depend on how the work was split.
    """
    chosen = np.random.default_rng(seed).choice(len(combinations), size=identities, replace=False)
    sizes = split_sizes(identities)
    splits = [split for split in ("train", "val", "test") for _ in range(sizes[split])]
    people = [
        (identity, combinations[combination_index], split)
        for identity, (combination_index, split) in enumerate(zip(chosen, splits), start=1)
    ]
    tasks = [(root, seed, people[start : start + IDENTITIES_PER_TASK]) for start in range(0, len(people), IDENTITIES_PER_TASK)]
    workers = min(os.cpu_count() or 1, len(tasks))
    if workers > 1 and identities >= PARALLEL_FROM:
        # Spawned, not forked: a caller such as train.py has TensorFlow's threads running.
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            drawn = list(pool.map(_draw_identities, *zip(*tasks)))
    else:
        drawn = [_draw_identities(*task) for task in tasks]
    entries = [entry for part in drawn for entry, _ in part]
    attributes_by_path = {entry["file_path"]: attributes for part in drawn for entry, attributes in part}
    _write_json(root / REID_RAW_NAME, entries)
    _write_json(root / ATTRIBUTES_NAME, attributes_by_path)
    return {
        split: {
            "identities": sizes[split],
            "images": sum(entry["split"] == split for entry in entries),
            "captions": sum(len(entry["captions"]) for entry in entries if entry["split"] == split),
        }
        for split in ("train", "val", "test")
    }


def _draw_identities(root: Path, seed: int, people: list[tuple[int, dict[str, str], str]]) -> list[tuple[dict, dict]]:
    """Render and write the images of `people` (identity, attributes, split); return their
    (`reid_raw.json` entry, attributes) pairs."""
    drawn = []
    for identity, attributes, split in people:
        rng = np.random.default_rng([seed, identity])
        look = sample_look(attributes, rng)
        image_count = int(rng.integers(IMAGES_PER_IDENTITY[0], IMAGES_PER_IDENTITY[1] + 1))
        for number in range(1, image_count + 1):
            image = render_person(attributes, look, rng)
            extension = "jpg" if (identity + number) % JPEG_EVERY == 0 else "png"
            file_path = f"{identity:04d}/{identity:04d}_{number:02d}.{extension}"
            _write_image(image, root / IMAGES_DIR / file_path)
            captions = _distinct_captions(attributes, rng)
            entry = {
                "id": identity,
                "file_path": file_path,
                "captions": captions,
                "processed_tokens": [tokenize(caption) for caption in captions],
                "split": split,
            }
            drawn.append((entry, dict(attributes)))
    return drawn


def _distinct_captions(attributes: dict[str, str], rng: np.random.Generator) -> list[str]:
    """1–3 captions for one image; a repeated draw is dropped rather than kept twice."""
    wanted = int(rng.integers(CAPTIONS_PER_IMAGE[0], CAPTIONS_PER_IMAGE[1] + 1))
    captions: list[str] = []
    for _ in range(4 * wanted):
        caption = make_caption(attributes, rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == wanted:
            break
    return captions


def _write_image(image: Image.Image, path: Path) -> None:
    """Encode with fixed settings and no metadata so equal pixels give equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    if path.suffix == ".jpg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    else:
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    path.write_bytes(buffer.getvalue())


def _write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
