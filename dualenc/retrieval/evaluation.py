"""Retrieval evaluation of a split: embed its captions and distinct images, then score both directions.

Text -> image: every caption queries the split's distinct images; image -> text: every distinct
image queries all captions. A hit is any same-label item (seed 000's identity rule; on COCO and
folders the label is the image itself, so it is the usual one-true-match protocol).

Beside those full tables, each report holds the table papers print for the set's protocol
(`paper_table`), chosen from the split (`choose_protocol`) unless named:

- "image-text" (COCO, Flickr30k: several captions per image, each image its own label):
  text→image R@1/5/10 (a hit is the caption's own image), image→text R@1/5/10 (a hit is any
  of the image's captions) and RSUM, the sum of the six;
- "person" (CUHK-PEDES, ICFG-PEDES, RSTPReid: identities shared by several images):
  text→image R@1/5/10, mAP and mINP, a hit being any image of the described person (IRRA's
  evaluation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from dualenc.core.errors import DualEncError
from dualenc.data.packed import first_positions, split_captions
from dualenc.retrieval.metrics import (
    mean_average_precision,
    mean_inverse_negative_penalty,
    recall_at_k,
    top_k_accuracy,
)

KS = (1, 5, 10)
# Seed 003 scores each image's first caption by whether its image is among the top 100.
TOP_K_ACCURACY_K = 100
PROTOCOLS = ("image-text", "person")


@dataclasses.dataclass(frozen=True)
class SplitEmbeddings:
    """Unit embeddings of a split: one row per caption, one per distinct image (by image_id)."""

    caption_embeddings: np.ndarray  # (C, D)
    caption_labels: np.ndarray  # (C,)
    image_embeddings: np.ndarray  # (I, D)
    image_labels: np.ndarray  # (I,)
    image_ids: list[str]
    # Each caption's image, what the image-text protocol matches on; when None, labels stand
    # for images (true of image-text sets, where each image is its own label).
    caption_image_ids: list[str] | None = None


def embed_split(
    batches: Iterable[Mapping],
    encode_images: Callable,
    encode_texts: Callable,
    image_key: str = "image",
    caption_key: str = "caption",
) -> SplitEmbeddings:
    """Embed batches of pairs (dicts with `image_key`, `caption_key`, "label", "image_id").

    Each distinct image_id is encoded once, at its first occurrence, so a split with several
    captions per image yields a gallery without duplicates.
    """
    caption_parts, caption_labels, image_parts, image_labels, image_ids, caption_image_ids = [], [], [], [], [], []
    seen: set[str] = set()
    for batch in batches:
        caption_parts.append(np.asarray(encode_texts(batch[caption_key])))
        labels = np.asarray(batch["label"]).reshape(-1)
        caption_labels.append(labels)
        ids = [value.decode("utf-8") for value in np.asarray(batch["image_id"]).reshape(-1)]
        caption_image_ids += ids
        first = first_positions(ids, seen)
        image_ids += [ids[row] for row in first]
        if first:
            images = np.asarray(batch[image_key])[first]
            image_parts.append(np.asarray(encode_images(images)))
            image_labels.append(labels[first])
    if not caption_parts:
        raise ValueError("embed_split got no batches")
    return SplitEmbeddings(
        caption_embeddings=np.concatenate(caption_parts),
        caption_labels=np.concatenate(caption_labels),
        image_embeddings=np.concatenate(image_parts),
        image_labels=np.concatenate(image_labels),
        image_ids=image_ids,
        caption_image_ids=caption_image_ids,
    )


def _recalls(queries: np.ndarray, gallery: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
             ks: tuple[int, ...] = KS) -> dict[str, float]:
    """`recall_at_k` as {"R@k": percent}, each k larger than the gallery clamped to its size."""
    clamped = {k: min(k, len(gallery)) for k in ks}
    recalls = recall_at_k(queries, gallery, query_labels, gallery_labels, ks=sorted(set(clamped.values())))
    return {f"R@{k}": recalls[clamped[k]] for k in ks}


def retrieval_metrics(embeddings: SplitEmbeddings, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """R@k (percent) and mAP (percent) in both directions, keyed ``t2i_r1`` … ``i2t_map``.

    k larger than a gallery is clamped to its size, so tiny validation splits still report.
    """
    directions = {
        "t2i": (embeddings.caption_embeddings, embeddings.image_embeddings, embeddings.caption_labels, embeddings.image_labels),
        "i2t": (embeddings.image_embeddings, embeddings.caption_embeddings, embeddings.image_labels, embeddings.caption_labels),
    }
    results = {}
    for name, (queries, gallery, query_labels, gallery_labels) in directions.items():
        recalls = _recalls(queries, gallery, query_labels, gallery_labels, ks)
        for k in ks:
            results[f"{name}_r{k}"] = recalls[f"R@{k}"]
        results[f"{name}_map"] = mean_average_precision(queries, gallery, query_labels, gallery_labels)
    return results


def check_protocol(protocol: str) -> str:
    """`protocol` if it is one of `PROTOCOLS`, else a one-line `DualEncError`."""
    if protocol not in PROTOCOLS:
        raise DualEncError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    return protocol


def choose_protocol(image_labels: Sequence[int]) -> str:
    """"person" when some label is shared by two or more distinct images (identities, as in
    CUHK-PEDES), else "image-text" (each image its own label, as COCO and Flickr30k are packed)."""
    labels = np.asarray(image_labels).reshape(-1)
    return "person" if len(np.unique(labels)) < len(labels) else "image-text"


def _image_keys(embeddings: SplitEmbeddings) -> tuple[np.ndarray, np.ndarray]:
    """(caption keys (C,), image keys (I,)) equal exactly for a caption and its own image: gallery
    rows by image_id (-1 for a caption whose image the gallery lacks), or labels when the
    captions' images are not known."""
    if embeddings.caption_image_ids is None:
        return np.asarray(embeddings.caption_labels), np.asarray(embeddings.image_labels)
    rows = {image_id: row for row, image_id in enumerate(embeddings.image_ids)}
    caption_rows = np.array([rows.get(image_id, -1) for image_id in embeddings.caption_image_ids], np.int64)
    return caption_rows, np.arange(len(embeddings.image_ids))


def paper_table(embeddings: SplitEmbeddings, protocol: str) -> dict:
    """The scores papers print for `protocol` (see the module docstring), in percent.

    "image-text": {"text_to_image": {"R@1", "R@5", "R@10"}, "image_to_text": {…}, "RSUM"}.
    "person": {"text_to_image": {"R@1", "R@5", "R@10", "mAP", "mINP"}}.
    k larger than a gallery is clamped to its size, as in `retrieval_metrics`.
    """
    captions, images = embeddings.caption_embeddings, embeddings.image_embeddings
    if check_protocol(protocol) == "person":
        arguments = (captions, images, embeddings.caption_labels, embeddings.image_labels)
        return {"text_to_image": {**_recalls(*arguments), "mAP": mean_average_precision(*arguments),
                                  "mINP": mean_inverse_negative_penalty(*arguments)}}
    caption_keys, image_keys = _image_keys(embeddings)
    text_to_image = _recalls(captions, images, caption_keys, image_keys)
    image_to_text = _recalls(images, captions, image_keys, caption_keys)
    return {"text_to_image": text_to_image, "image_to_text": image_to_text,
            "RSUM": sum(text_to_image.values()) + sum(image_to_text.values())}


def retrieval_report(embeddings: SplitEmbeddings, first_caption_embeddings: np.ndarray,
                     protocol: str | None = None) -> dict:
    """Both seeds' protocols and the paper table in one report (what ``search.py --evaluate`` prints).

    Seed 000: `retrieval_metrics` as ``text_to_image`` / ``image_to_text`` {"R@k", "mAP"}.
    Seed 003: top-k accuracy of each image's first caption (``first_caption_embeddings[i]``
    belongs to image row i) against the whole image gallery, k = `TOP_K_ACCURACY_K` capped
    at the gallery size. ``protocol`` (`choose_protocol`'s when None) and ``paper``, its
    `paper_table`.
    """
    protocol = choose_protocol(embeddings.image_labels) if protocol is None else check_protocol(protocol)
    scores = retrieval_metrics(embeddings)
    images = len(embeddings.image_embeddings)
    accuracy_k = min(TOP_K_ACCURACY_K, images)

    def direction(prefix: str) -> dict[str, float]:
        return {**{f"R@{k}": scores[f"{prefix}_r{k}"] for k in KS}, "mAP": scores[f"{prefix}_map"]}

    return {
        "images": images,
        "captions": len(embeddings.caption_embeddings),
        "protocol": protocol,
        "paper": paper_table(embeddings, protocol),
        "text_to_image": direction("t2i"),
        "image_to_text": direction("i2t"),
        "top_k_accuracy": {
            "k": accuracy_k,
            "percent": top_k_accuracy(first_caption_embeddings, embeddings.image_embeddings, np.arange(images), k=accuracy_k),
        },
    }


def evaluate_split(
    text_encoder: Callable[[list[str]], np.ndarray],
    data_dir: str | Path,
    split: str,
    image_embeddings: np.ndarray,
    image_labels: Sequence[int],
    image_ids: Sequence[str],
    protocol: str | None = None,
) -> dict:
    """The retrieval report of a packed split: ``data``, ``split`` and `retrieval_report`'s keys.

    The one evaluation of a trained run, shared by ``train.py`` (its ``metrics.json``) and
    ``search.py --evaluate``. `text_encoder` is the run's exported text encoder (captions ->
    unit rows (N, D)); the images are the split's distinct images as its gallery index holds
    them (embeddings (I, D), labels, ids). Every caption of `split` queries the images; each
    image's first caption in packing order is its top-k accuracy query. `protocol` picks the
    paper table ("image-text" or "person"; by default `choose_protocol` of the images' labels).
    """
    captions = split_captions(data_dir, split)
    first_caption = {captions.image_ids[row]: captions.captions[row] for row in first_positions(captions.image_ids, set())}
    embeddings = SplitEmbeddings(
        caption_embeddings=text_encoder(captions.captions),
        caption_labels=np.asarray(captions.labels),
        image_embeddings=np.asarray(image_embeddings),
        image_labels=np.asarray(image_labels),
        image_ids=list(image_ids),
        caption_image_ids=captions.image_ids,
    )
    report = retrieval_report(embeddings, text_encoder([first_caption[image_id] for image_id in image_ids]), protocol)
    return {"data": str(data_dir), "split": split, **report}
