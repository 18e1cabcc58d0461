"""MS-COCO caption annotations (`captions_train2014.json`) → `ImageEntry` lists per split.

The file is ``{"images": [{"id": int, "file_name": str}, ...], "annotations": [{"image_id":
int, "caption": str}, ...]}``; `file_name` is relative to the image directory. Images keep the
order of the `images` list, captions the order of `annotations`.

Splits, one of:
- everything in `split` (default "train");
- `holdout_images` images, drawn with a fixed seed, in "valid" and the rest in `split`;
- Karpathy's `dataset_coco.json` (``{"images": [{"cocoid": int, "split": str}, ...]}``):
  train and restval → "train", val → "val", test → "test". Images it does not list are
  reported as skipped.

Labels: one per image, so the captions of an image share it: the images of the "train" split
numbered 0..n-1 in `images` order, then those of the other splits (`train_first_labels`).

An `id` listed twice in `images` is refused: captions name images by id, so they could not be
told apart.
"""

from __future__ import annotations

import random
from pathlib import Path, PurePosixPath

from dualenc.core.errors import DualEncError
from dualenc.data.records import normalise_caption
from tfrecords_tools.image_files import ImageDirectory
from tfrecords_tools.writer import ImageEntry, empty_caption_skip, group_pairs, read_json_file, train_first_labels

HOLDOUT_SPLIT = "valid"
HOLDOUT_SEED = 0
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _records(path: Path, content: object, key: str, fields: dict[str, type]) -> list[dict]:
    """`content[key]`, checked to be a list of objects with `fields` of the given types."""
    if not isinstance(content, dict) or not isinstance(content.get(key), list):
        raise DualEncError(f"{path}: expected a JSON object with a list {key!r}")
    for index, record in enumerate(content[key]):
        if not isinstance(record, dict):
            raise DualEncError(f"{path}: {key}[{index}] must be an object, got {type(record).__name__}")
        for field, kind in fields.items():
            value = record.get(field)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise DualEncError(f"{path}: {key}[{index}] field {field!r} must be {kind.__name__}, got {value!r:.80}")
    return content[key]


def _file_names(annotations: Path, image_records: list[dict]) -> dict[int, str]:
    """Image id → file name relative to the image directory; `DualEncError` for a repeated id."""
    file_names, first_index = {}, {}
    for index, record in enumerate(image_records):
        image = record["id"]
        if image in first_index:
            raise DualEncError(f"{annotations}: images[{index}] repeats id {image} of images[{first_index[image]}]; "
                               "each image needs its own id")
        first_index[image] = index
        file_names[image] = PurePosixPath(record["file_name"]).as_posix()
    return file_names


def _karpathy_splits(karpathy: Path) -> dict[int, str]:
    records = _records(karpathy, read_json_file(karpathy), "images", {"cocoid": int, "split": str})
    splits = {}
    for index, record in enumerate(records):
        if record["split"] not in KARPATHY_SPLITS:
            raise DualEncError(f"{karpathy}: images[{index}] field 'split' is {record['split']!r}; "
                               f"expected one of {', '.join(KARPATHY_SPLITS)}")
        splits[record["cocoid"]] = KARPATHY_SPLITS[record["split"]]
    return splits


def load(annotations: Path, images: Path, *, split: str = "train", holdout_images: int | None = None,
         captions_per_image: int | None = None, karpathy: Path | None = None,
         allow_outside_images: bool = False) -> tuple[dict[str, list[ImageEntry]], list[dict]]:
    """The splits of a COCO caption file and the entries skipped (empty captions, images
    missing from the Karpathy file); `DualEncError` for a `file_name` that resolves outside
    `images`, unless `allow_outside_images` (`tfrecords_tools.image_files`)."""
    if holdout_images is not None and karpathy is not None:
        raise DualEncError("--holdout-images and --karpathy both choose splits; give one of them")
    if captions_per_image is not None and captions_per_image < 1:
        raise DualEncError(f"--captions-per-image must be at least 1, got {captions_per_image}")
    content = read_json_file(annotations)
    image_records = _records(annotations, content, "images", {"id": int, "file_name": str})
    caption_records = _records(annotations, content, "annotations", {"image_id": int, "caption": str})
    file_names = _file_names(annotations, image_records)
    directory = ImageDirectory(images, allow_outside_images)
    paths = {image: directory.path(name, f"{annotations}: image id {image}") for image, name in file_names.items()}
    captions: dict[int, list[str]] = {image: [] for image in file_names}
    skipped = []
    for index, record in enumerate(caption_records):
        if record["image_id"] not in file_names:
            raise DualEncError(f"{annotations}: annotations[{index}] field 'image_id' {record['image_id']} "
                               "matches no entry of 'images'")
        if not normalise_caption(record["caption"]):
            path = paths[record["image_id"]]
            skipped.append(empty_caption_skip(path, f"{annotations} annotations[{index}]"))
        elif captions_per_image is None or len(captions[record["image_id"]]) < captions_per_image:
            captions[record["image_id"]].append(record["caption"])
    captioned = [image for image in file_names if captions[image]]
    split_of = {image: split for image in captioned}
    if holdout_images is not None:
        if not 0 < holdout_images < len(captioned):
            raise DualEncError(f"--holdout-images must be between 1 and {len(captioned) - 1} "
                               f"(the captioned images in {annotations}), got {holdout_images}")
        for image in random.Random(HOLDOUT_SEED).sample(captioned, holdout_images):
            split_of[image] = HOLDOUT_SPLIT
    if karpathy is not None:
        karpathy_split = _karpathy_splits(karpathy)
        for image in captioned:
            if image in karpathy_split:
                split_of[image] = karpathy_split[image]
            else:
                del split_of[image]
                skipped.append({"path": paths[image],
                                "reason": f"not listed in Karpathy splits {karpathy}",
                                "pairs": len(captions[image])})
    label_of = train_first_labels((image, split_of[image]) for image in captioned if image in split_of)
    rows = [(split_of[image], file_names[image], paths[image], caption, label_of[image])
            for image in label_of for caption in captions[image]]
    return group_pairs(rows), skipped
