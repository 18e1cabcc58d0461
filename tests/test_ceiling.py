"""The demo's identity ceiling: captions read back to the attributes they name, and the bound
checked against a simulated attribute-perfect ranker."""

import re

import numpy as np
import pytest

from dualenc.retrieval.ceiling import identity_ceiling
from tfrecords_tools.demo import ATTRIBUTE_VALUES, attribute_combinations
from tfrecords_tools.demo_captions import (LOWER_NOUNS, LOWER_PHRASES, UPPER_NOUNS, UPPER_PHRASES, make_caption,
                                           named_attributes)


def test_each_garment_phrase_uses_exactly_its_own_nouns():
    for phrases, nouns in ((UPPER_PHRASES, UPPER_NOUNS), (LOWER_PHRASES, LOWER_NOUNS)):
        assert set(phrases) == set(nouns)
        for garment, templates in phrases.items():
            for template in templates:
                words = re.findall(r"[a-z]+", template)
                found = {other for other, options in nouns.items() for noun in options if noun in words}
                assert found == {garment}, template


def test_named_attributes_are_true_and_every_attribute_gets_named():
    rng = np.random.default_rng(5)
    combinations = attribute_combinations()
    named_keys = set()
    for index in rng.choice(len(combinations), size=2000):
        attributes = combinations[index]
        caption = make_caption(attributes, rng)
        named = named_attributes(caption)
        assert named, caption
        assert all(attributes[key] == value for key, value in named.items()), (caption, named, attributes)
        named_keys |= set(named)
    assert named_keys == set(ATTRIBUTE_VALUES)


def test_named_attributes_reads_colours_to_their_garments():
    caption = "A lady wearing a long gray coat and red trousers, carrying no bag."
    assert named_attributes(caption) == {"gender": "woman", "upper": "coat", "upper_color": "grey", "lower": "pants",
                                         "lower_color": "red", "bag": "none"}
    assert named_attributes("A person in a jacket and blue shorts.") == {"upper": "jacket", "lower": "shorts",
                                                                       "lower_color": "blue"}


def test_hand_computed_ceiling():
    people = {1: {"gender": "woman", "upper": "coat", "upper_color": "red", "lower": "pants", "lower_color": "blue"},
              2: {"gender": "woman", "upper": "coat", "upper_color": "red", "lower": "skirt", "lower_color": "black"},
              3: {"gender": "man", "upper": "coat", "upper_color": "red", "lower": "pants", "lower_color": "blue"}}
    images = {1: 2, 2: 1, 3: 1}
    # Fits 1 and 2: person 1 holds 2 of their 3 images. Then only person 1 fits. Then all three.
    captions = [("A woman in a red coat.", 1), ("A woman in a red coat and blue pants.", 1), ("A person in a coat.", 3)]
    assert identity_ceiling(captions, people, images) == pytest.approx(100 * (2 / 3 + 1 + 1 / 4) / 3)


def test_ceiling_equals_a_simulated_attribute_perfect_ranker():
    rng = np.random.default_rng(11)
    combinations = attribute_combinations()
    people = {person: combinations[index] for person, index in enumerate(rng.choice(len(combinations), 60, replace=False))}
    images = {person: int(rng.integers(1, 5)) for person in people}
    gallery = np.array([person for person in people for _ in range(images[person])])
    captions = [(make_caption(people[person], rng), int(person)) for person in rng.choice(list(people), 80)]
    hits = []
    for caption, person in captions:
        named = named_attributes(caption)
        fits = np.array([all(people[other][key] == value for key, value in named.items()) for other in gallery])
        for _ in range(400):  # random order among the images that fit: their scores tie
            scores = fits + rng.random(len(gallery)) * 0.5
            hits.append(gallery[np.argmax(scores)] == person)
    assert identity_ceiling(captions, people, images) == pytest.approx(100 * np.mean(hits), abs=1.5)
