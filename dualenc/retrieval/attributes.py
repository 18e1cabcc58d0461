"""Attribute retrieval on the synthetic demo: do queries that name attributes find people who have them?

Identity recall (``dualenc.retrieval.evaluation``) asks whether a caption finds the images of the one
person it was written for. A user instead types a few attributes — "a woman in a red coat" —
and expects every result to have them. This module measures that:

- **Queries**: a fixed public set, drawn with `QUERY_SEED` from the demo's attribute grammar
  (`tfrecords_tools.demo.ATTRIBUTE_VALUES`), never from a dataset. Each names 1–4 attributes
  out of gender, upper garment, its colour, lower garment, its colour and bag (a colour is only
  named with its garment), phrased in one of several ways ("a woman in a red coat", "a man
  wearing black trousers, with a backpack", "a person carrying a handbag", …).
- **Gallery**: unseen people — the demo generator run with another seed (`GALLERY_SEED`), all of
  its images, with ``attributes.json`` as ground truth. An image is relevant to a query when it
  has every named attribute.
- **Score**: precision@9 (a result page of nine) over what each query could attain,
  ``hits in the top 9 / min(9, relevant)``, averaged over the queries that have at least one
  relevant image. Chance is the same for a random ranking: ``9·R/N / min(9, R)`` for R relevant
  images among N, averaged alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from dualenc.retrieval.ranking import top_k
from dualenc.core import jsonfiles
from tfrecords_tools.demo import ATTRIBUTE_VALUES, ATTRIBUTES_NAME, IMAGES_DIR, attribute_combinations

K = 9
QUERY_COUNT = 300
QUERY_SEED = 18
MAX_NAMED = 4
# Unseen people: the demo's default dataset uses seed 0 and `make_demo` numbers identities from 1.
GALLERY_SEED = 1
GALLERY_IDENTITIES = 500
GALLERY_DIR_NAME = "demo-attributes"

GENDER_WORDS = {"woman": ("woman", "lady"), "man": ("man", "guy")}
NEUTRAL_WORDS = ("person", "pedestrian", "someone")
GARMENT_WORDS = {"pants": ("pants", "trousers")}
PLURAL_GARMENTS = ("pants", "shorts")
BAG_PHRASES = {
    "backpack": ("with a backpack", "carrying a backpack"),
    "handbag": ("with a handbag", "carrying a handbag"),
    "none": ("without a bag", "carrying no bag"),
}


@dataclasses.dataclass(frozen=True)
class AttributeQuery:
    """One query: its words and the attributes it names (keys as in ``attributes.json``)."""

    text: str
    attributes: Mapping[str, str]

    @property
    def named(self) -> int:
        return len(self.attributes)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def _garment_phrase(garment: str, color: str | None, rng: np.random.Generator) -> str:
    """ "a red coat", "black trousers", "a skirt" — an article only before a singular garment."""
    words = " ".join(part for part in (color, _pick(rng, GARMENT_WORDS.get(garment, (garment,)))) if part)
    if garment in PLURAL_GARMENTS:
        return words
    return ("an " if words[0] in "aeiou" else "a ") + words


def _named_keys(rng: np.random.Generator) -> list[str]:
    """Which of a person's attributes a query names: 1–`MAX_NAMED` keys, a colour only with its garment."""
    count = int(rng.integers(1, MAX_NAMED + 1))
    while True:
        keys = list(rng.choice(list(ATTRIBUTE_VALUES), size=count, replace=False))
        if all(key.removesuffix("_color") in keys for key in keys if key.endswith("_color")):
            return keys


def phrase_query(attributes: Mapping[str, str], rng: np.random.Generator) -> str:
    """Words for a query naming exactly `attributes` (a subset of one person's), in one of several phrasings."""
    gender = attributes.get("gender")
    subject = _pick(rng, GENDER_WORDS[gender] if gender else NEUTRAL_WORDS)
    subject = subject if subject == "someone" else f"a {subject}"
    clothes = [
        _garment_phrase(attributes[part], attributes.get(f"{part}_color"), rng)
        for part in ("upper", "lower")
        if part in attributes
    ]
    if len(clothes) == 2 and rng.random() < 0.3:
        clothes.reverse()
    bag = _pick(rng, BAG_PHRASES[attributes["bag"]]) if "bag" in attributes else None
    if not clothes:
        return f"{subject} {bag}" if bag else subject
    worn = " and ".join(clothes)
    if gender is None and rng.random() < 0.25:
        # No person word at all, as people often type: "a red coat and black trousers".
        return f"{worn}, {bag}" if bag else worn
    verb = _pick(rng, ("in", "wearing", "dressed in"))
    if bag is None:
        return f"{subject} {verb} {worn}"
    return _pick(rng, (f"{subject} {verb} {worn} {bag}", f"{subject} {bag}, {verb} {worn}"))


def attribute_queries(count: int = QUERY_COUNT, seed: int = QUERY_SEED) -> list[AttributeQuery]:
    """The public query set: `count` queries, each naming 1–4 attributes of a random demo person.

    A person is one of `attribute_combinations` (so no query names an impossible pairing),
    drawn uniformly; the same (count, seed) always gives the same list. Repeated texts are kept
    once.
    """
    rng = np.random.default_rng(seed)
    combinations = attribute_combinations()
    queries: dict[str, AttributeQuery] = {}
    while len(queries) < count:
        person = combinations[rng.integers(len(combinations))]
        keys = _named_keys(rng)
        named = {key: person[key] for key in ATTRIBUTE_VALUES if key in keys}
        text = phrase_query(named, rng)
        queries.setdefault(text, AttributeQuery(text, named))
    return list(queries.values())


def relevance(queries: Sequence[AttributeQuery], gallery: Sequence[Mapping[str, str]]) -> np.ndarray:
    """``(Q, N)`` bool: gallery item n has every attribute that query q names."""
    matrix = np.ones((len(queries), len(gallery)), dtype=bool)
    for row, query in enumerate(queries):
        for key, value in query.attributes.items():
            matrix[row] &= np.array([item[key] == value for item in gallery])
    return matrix


def precision_at_k(top_indices: np.ndarray, relevant: np.ndarray, k: int = K) -> np.ndarray:
    """``(Q,)`` precision of each query's top k over what it could attain: hits / min(k, relevant).

    `top_indices` ``(Q, ≥k)`` are gallery indices best first, `relevant` ``(Q, N)`` bool; every
    query needs at least one relevant item.
    """
    hits = np.take_along_axis(relevant, top_indices[:, :k], axis=1).sum(axis=1)
    return hits / np.minimum(k, relevant.sum(axis=1))


def chance_precision_at_k(relevant: np.ndarray, k: int = K) -> np.ndarray:
    """``(Q,)`` expected `precision_at_k` of a random ranking: k·R/N / min(k, R)."""
    counts = relevant.sum(axis=1)
    return k * counts / relevant.shape[1] / np.minimum(k, counts)


def attribute_gallery(cache: Path) -> Path:
    """The raw demo of unseen people (`GALLERY_SEED`) under `cache`, made on first use."""
    from tfrecords_tools.demo import make_demo

    return Path(make_demo(cache / GALLERY_DIR_NAME, identities=GALLERY_IDENTITIES, seed=GALLERY_SEED))


def demo_cache_of(data_dir: Path) -> Path | None:
    """The cache holding the raw demo that `data_dir` was packed from, or None when it is no demo pack.

    `tfrecords_tools.demo_cache` records the demo marker's hash and the raw annotations
    (``CACHE/demo-raw/reid_raw.json``) in the manifest's source.
    """
    from dualenc.data.manifest import load_manifest

    source = load_manifest(data_dir).source
    if "demo_marker_sha256" not in source:
        return None
    return Path(source["annotations"]).parent.parent


def run_attribute_report(run_dir: Path, data_dir: Path) -> dict | None:
    """`evaluate_attributes` of a run's exported encoders, when it trained on the demo (else None).

    The gallery of unseen people is made beside the run's raw demo on first use.
    """
    from dualenc.export.encoders import TEXT_ENCODER_DIR, VISION_ENCODER_DIR, load_encoder

    cache = demo_cache_of(data_dir)
    if cache is None:
        return None
    gallery_dir = attribute_gallery(cache)
    return evaluate_attributes(
        load_encoder(run_dir / TEXT_ENCODER_DIR, batch_size=256),
        load_encoder(run_dir / VISION_ENCODER_DIR, batch_size=256),
        gallery_dir,
    )


def evaluate_attributes(
    encode_texts: Callable[[list[str]], np.ndarray],
    encode_images: Callable[[list[bytes]], np.ndarray],
    gallery_dir: Path,
    queries: Sequence[AttributeQuery] | None = None,
) -> dict:
    """Mean precision@9 of `queries` (default: the public set) over the raw demo in `gallery_dir`.

    `encode_texts` maps strings and `encode_images` encoded image files to unit embeddings
    (e.g. a run's exported encoders). Returns ``{"k", "queries", "images", "precision",
    "chance", "by_named": {"1": {"queries", "precision", "chance"}, …}}``, precisions as
    fractions.
    """
    queries = list(attribute_queries() if queries is None else queries)
    truth = jsonfiles.load_file(gallery_dir / ATTRIBUTES_NAME, "demo attributes file", hint="re-generate the demo")
    paths = sorted(truth)
    relevant = relevance(queries, [truth[path] for path in paths])
    answerable = relevant.any(axis=1)
    queries = [query for query, keep in zip(queries, answerable) if keep]
    relevant = relevant[answerable]
    image_embeddings = encode_images([(gallery_dir / IMAGES_DIR / path).read_bytes() for path in paths])
    query_embeddings = encode_texts([query.text for query in queries])
    _, top_indices = top_k(query_embeddings @ image_embeddings.T, K)
    precision = precision_at_k(top_indices, relevant)
    chance = chance_precision_at_k(relevant)
    named = np.array([query.named for query in queries])
    return {
        "k": K,
        "queries": len(queries),
        "images": len(paths),
        "precision": float(precision.mean()),
        "chance": float(chance.mean()),
        "by_named": {
            str(count): {
                "queries": int((named == count).sum()),
                "precision": float(precision[named == count].mean()),
                "chance": float(chance[named == count].mean()),
            }
            for count in sorted(set(named.tolist()))
        },
    }
