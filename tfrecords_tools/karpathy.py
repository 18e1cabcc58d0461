"""Karpathy's caption splits (`dataset_flickr30k.json`, `dataset_coco.json`,
`dataset_flickr8k.json`) → `ImageEntry` lists per split.

The file is ``{"images": [{"filename": str, "filepath": str (COCO only), "split":
"train"|"restval"|"val"|"test", "sentences": [{"raw": str, "tokens": [str, ...], ...}, ...],
"imgid": int, "sentids": [int, ...], ...}, ...], "dataset": "flickr30k"|"coco"|"flickr8k"}``.
An image's file is ``filepath/filename`` relative to the image directory where `filepath` is
given (COCO: ``val2014/COCO_val2014_000000391895.jpg``, so `--images` is the folder holding
``train2014/`` and ``val2014/``), else ``filename`` (Flickr: ``1000092795.jpg`` in
``flickr30k-images/``). Captions are the sentences' `raw` text in file order (`tokens` are
lower-cased and stripped of punctuation, a captioning model's input, not a retrieval query).

Splits as published, one image in one split: Flickr30k's and Flickr8k's test splits hold 1,000
images with five sentences each, COCO's 5,000 images (the "1K" and "5K" test sets of the
retrieval papers and of CLIP_benchmark, whose figures the README quotes); a few COCO images have
six or seven sentences, and `captions_per_image` = 5 keeps the first five, as VSE++ and SCAN
count them. `restval` (COCO's 30,504 val2014 images outside val and test) goes to "train" by
default, as the field trains on 113,287 images; or to "val", or is left out (`RESTVAL_CHOICES`).
`splits` packs only the named splits (e.g. the test split alone, for zero-shot scores). Images
left out by these choices are not listed as skipped: nothing is wrong with them.

Labels: one per image, so its captions share it: the images of "train" numbered 0..n-1 in file
order, then those of the other splits (`train_first_labels`); image-text retrieval scores a
text→image hit only on the image the caption was written for. An image file listed twice is
refused: its captions could not be told apart.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from dualenc.core.errors import DualEncError
from dualenc.data.records import normalise_caption
from tfrecords_tools.image_files import ImageDirectory
from tfrecords_tools.writer import ImageEntry, empty_caption_skip, group_pairs, read_json_file, train_first_labels

SPLITS = ("train", "val", "test")
FILE_SPLITS = ("train", "restval", "val", "test")
RESTVAL_CHOICES = ("train", "val", "drop")
DEFAULT_RESTVAL = "train"  # the field's habit: COCO trains on train + restval (113,287 images)


def _string(where: str, record: dict, field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DualEncError(f"{where} field {field!r} must be a non-empty string, got {value!r:.80}")
    return value


def _image_id(where: str, record: dict) -> str:
    """The image's path relative to the image directory: ``filepath/filename`` or ``filename``."""
    filename = _string(where, record, "filename")
    if "filepath" not in record:
        return PurePosixPath(filename).as_posix()
    return PurePosixPath(_string(where, record, "filepath"), filename).as_posix()


def _captions(where: str, record: dict) -> list[str]:
    sentences = record.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise DualEncError(f"{where} field 'sentences' must be a non-empty list of objects with 'raw', "
                           f"got {sentences!r:.80}")
    captions = []
    for index, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str):
            raise DualEncError(f"{where} field 'sentences'[{index}] must be an object with a string 'raw', "
                               f"got {sentence!r:.80}")
        captions.append(raw)
    return captions


def _split(where: str, record: dict, restval: str) -> str | None:
    """The packed split of the record's image, or None when `restval` = "drop" leaves it out."""
    split = record.get("split")
    if split not in FILE_SPLITS:
        raise DualEncError(f"{where} field 'split' must be one of {', '.join(FILE_SPLITS)}, got {split!r:.80}")
    if split != "restval":
        return split
    return None if restval == "drop" else restval


def _image_records(annotations: Path, content: object) -> list:
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise DualEncError(f"{annotations}: expected a JSON object with a list 'images' "
                           "(Karpathy's dataset_*.json), got " + type(content).__name__)
    dataset = content.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise DualEncError(f"{annotations}: field 'dataset' must be a string, got {dataset!r:.80}")
    return content["images"]


def load(annotations: Path, images: Path, *, restval: str = DEFAULT_RESTVAL,
         splits: tuple[str, ...] = SPLITS, captions_per_image: int | None = None,
         allow_outside_images: bool = False) -> tuple[dict[str, list[ImageEntry]], list[dict], str | None]:
    """The splits of a Karpathy split file, the captions skipped as empty, and the file's
    `dataset` name; `DualEncError` for a malformed record, an image listed twice, or a path that
    resolves outside `images` unless `allow_outside_images` (`tfrecords_tools.image_files`)."""
    if restval not in RESTVAL_CHOICES:
        raise DualEncError(f"--restval must be one of {', '.join(RESTVAL_CHOICES)}, got {restval!r}")
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or not splits:
        raise DualEncError(f"--splits must name some of {', '.join(SPLITS)}, got {','.join(splits)!r}")
    if captions_per_image is not None and captions_per_image < 1:
        raise DualEncError(f"--captions-per-image must be at least 1, got {captions_per_image}")
    content = read_json_file(annotations)
    records = _image_records(annotations, content)
    directory = ImageDirectory(images, allow_outside_images)
    first_index: dict[str, int] = {}
    rows, skipped = [], []
    for index, record in enumerate(records):
        where = f"{annotations}: images[{index}]"
        if not isinstance(record, dict):
            raise DualEncError(f"{where} must be an object with filename, split, sentences, "
                               f"got {type(record).__name__}")
        image_id = _image_id(where, record)
        captions = _captions(where, record)
        split = _split(where, record, restval)
        if image_id in first_index:
            raise DualEncError(f"{where} repeats image {image_id!r} of images[{first_index[image_id]}]; "
                               "each image may be listed once")
        first_index[image_id] = index
        path = directory.path(image_id, where)
        if split not in splits:
            continue
        kept = 0
        for caption_index, caption in enumerate(captions):
            if captions_per_image is not None and kept == captions_per_image:
                break
            if not normalise_caption(caption):
                skipped.append(empty_caption_skip(path, f"{where} sentence {caption_index}"))
                continue
            rows.append((split, image_id, path, caption))
            kept += 1
    label_of = train_first_labels((image_id, split) for split, image_id, _, _ in rows)
    grouped = group_pairs((split, image_id, path, caption, label_of[image_id])
                          for split, image_id, path, caption in rows)
    return grouped, skipped, content.get("dataset")
