"""Attribute retrieval: the public query set, relevance, precision@9 and its chance level.

The precision and chance are checked against references written here independently: a loop
over hand-built rankings, and the exact mean over every possible top-k set (itertools).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from dualenc.retrieval import attributes
from tfrecords_tools import demo

# The checker's own vocabulary, written from the attribute values, not from the query templates.
GENDER_WORDS = {"woman": "woman", "lady": "woman", "man": "man", "guy": "man"}
NEUTRAL_WORDS = {"person", "pedestrian", "someone"}
GARMENT_WORDS = {"coat": "coat", "jacket": "jacket", "shirt": "shirt", "sweater": "sweater",
                 "pants": "pants", "trousers": "pants", "shorts": "shorts", "skirt": "skirt"}
BAG_WORDS = {"backpack": "backpack", "handbag": "handbag"}


def _read(text: str) -> dict[str, str]:
    """What a query's words say, parsed by this checker: colour binds to the garment after it."""
    words = text.replace(",", "").split()
    said: dict[str, str] = {}
    for position, word in enumerate(words):
        if word in GENDER_WORDS:
            said["gender"] = GENDER_WORDS[word]
        elif word in GARMENT_WORDS:
            garment = GARMENT_WORDS[word]
            part = "upper" if garment in demo.UPPERS else "lower"
            said[part] = garment
            if words[position - 1] in demo.COLORS:
                said[f"{part}_color"] = words[position - 1]
        elif word in BAG_WORDS:
            said["bag"] = BAG_WORDS[word]
        elif word == "bag":
            said["bag"] = "none"
    return said


def test_query_set_is_fixed_and_names_one_to_four_attributes():
    queries = attributes.attribute_queries()
    assert len(queries) == attributes.QUERY_COUNT
    assert len({query.text for query in queries}) == len(queries)
    assert [query.text for query in queries] == [query.text for query in attributes.attribute_queries()]
    assert {query.named for query in queries} == {1, 2, 3, 4}
    counts = Counter(query.named for query in queries)
    assert min(counts.values()) >= 0.1 * len(queries), counts
    assert queries[0].text != attributes.attribute_queries(seed=attributes.QUERY_SEED + 1)[0].text


def test_every_query_says_exactly_the_attributes_it_names():
    possible = {tuple(sorted(person.items())) for person in demo.attribute_combinations()}
    for query in attributes.attribute_queries():
        assert _read(query.text) == dict(query.attributes), query.text
        # Some drawable person has all the named attributes.
        assert any(set(query.attributes.items()) <= set(person) for person in possible)
        if "gender" not in query.attributes:
            assert not set(query.text.split()) & set(GENDER_WORDS)


def test_queries_come_in_several_phrasings():
    texts = [query.text for query in attributes.attribute_queries()]
    assert sum(text.startswith("someone") for text in texts) > 5
    assert sum(" wearing " in text for text in texts) > 20
    assert sum(" dressed in " in text for text in texts) > 20
    # Without any person word: "a red coat and black trousers".
    assert sum(not set(text.split()) & (set(GENDER_WORDS) | NEUTRAL_WORDS) for text in texts) > 5


def test_relevance_matches_a_loop():
    rng = np.random.default_rng(0)
    combinations = demo.attribute_combinations()
    gallery = [combinations[index] for index in rng.integers(len(combinations), size=200)]
    queries = attributes.attribute_queries(count=40)
    expected = [[all(item[key] == value for key, value in query.attributes.items()) for item in gallery]
                for query in queries]
    np.testing.assert_array_equal(attributes.relevance(queries, gallery), np.array(expected))


def test_precision_at_k_by_hand():
    relevant = np.array([
        [1, 1, 0, 0, 0, 1],  # 3 relevant, top 2 = {0, 2}: 1 hit of min(2, 3) = 2
        [0, 0, 0, 0, 1, 0],  # 1 relevant, top 2 = {4, 0}: 1 hit of min(2, 1) = 1
        [0, 1, 1, 0, 0, 0],  # 2 relevant, top 2 = {3, 5}: none
    ], dtype=bool)
    top = np.array([[0, 2, 1], [4, 0, 1], [3, 5, 1]])
    np.testing.assert_allclose(attributes.precision_at_k(top, relevant, k=2), [0.5, 1.0, 0.0])


def test_chance_is_the_mean_over_every_possible_top_k():
    relevant = np.array([[1, 1, 0, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 1]], dtype=bool)
    for k in (1, 2, 3, 5):
        exact = []
        for row in relevant:
            scores = [row[list(chosen)].sum() / min(k, row.sum()) for chosen in itertools.combinations(range(7), k)]
            exact.append(np.mean(scores, dtype=np.float64))
        np.testing.assert_allclose(attributes.chance_precision_at_k(relevant, k=k), exact, rtol=1e-12)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    return demo.make_demo(tmp_path_factory.mktemp("gallery") / "raw", identities=30, seed=attributes.GALLERY_SEED)


def _attribute_encoders(gallery_dir, noise: float):
    """Stand-in encoders that see the ground truth: one-hot attribute vectors (plus noise)."""
    truth = json.loads((gallery_dir / demo.ATTRIBUTES_NAME).read_text())
    by_bytes = {(gallery_dir / demo.IMAGES_DIR / path).read_bytes(): item for path, item in truth.items()}
    slots = [(key, value) for key, values in demo.ATTRIBUTE_VALUES.items() for value in values]
    rng = np.random.default_rng(0)

    def one_hot(named: dict) -> np.ndarray:
        vector = np.array([float(named.get(key) == value) for key, value in slots])
        vector += noise * rng.standard_normal(len(slots))
        return vector / np.linalg.norm(vector)

    queries = {query.text: query.attributes for query in attributes.attribute_queries()}
    encode_texts = lambda texts: np.stack([one_hot(queries[text]) for text in texts])  # noqa: E731
    encode_images = lambda blobs: np.stack([one_hot(by_bytes[blob]) for blob in blobs])  # noqa: E731
    return encode_texts, encode_images


def test_an_encoder_that_sees_the_attributes_scores_one_and_noise_scores_chance(gallery):
    report = attributes.evaluate_attributes(*_attribute_encoders(gallery, noise=0.0), gallery)
    assert report["k"] == 9 and report["images"] == len(json.loads((gallery / "attributes.json").read_text()))
    assert 0 < report["queries"] <= attributes.QUERY_COUNT
    assert report["precision"] == pytest.approx(1.0)
    assert sum(part["queries"] for part in report["by_named"].values()) == report["queries"]
    noisy = attributes.evaluate_attributes(*_attribute_encoders(gallery, noise=100.0), gallery)
    assert noisy["chance"] == report["chance"] < 0.5
    assert abs(noisy["precision"] - noisy["chance"]) < 0.1
