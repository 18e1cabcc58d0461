"""Describe a synthetic pedestrian in CUHK-PEDES-style English, from its attributes.

Captions vary the sentence pattern, the synonyms and which attributes they name, but each one
names at least one garment, and every word about gender, colour, garment or bag is true of the
picture. A garment is sometimes named without its colour ("a man in a jacket and blue shorts"),
as people do: a caption that always gave colours would let a model tell people apart by colour
alone and never learn what a jacket or a backpack looks like. Colour words are the attribute values themselves, except
that grey is sometimes spelt "gray" (both spellings are common in CUHK-PEDES). A colour word is
always followed, within a few words, by the garment it colours ("a long red coat", "a pair of
black trousers"), and hair or skin colour is never mentioned, so a colour word is unambiguous.
"""

import re
from typing import Mapping

import numpy as np

GENDER_NOUNS = {"woman": ("woman", "lady", "girl", "female"), "man": ("man", "guy", "gentleman", "male")}
NEUTRAL_NOUNS = ("person", "pedestrian")
SUBJECT_PRONOUNS = {"woman": "she", "man": "he"}
POSSESSIVE_PRONOUNS = {"woman": "her", "man": "his"}
# Every garment's possible colour (an attribute value of `tfrecords_tools.demo`).
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey")
COLOR_SPELLINGS = {"grey": ("grey", "gray")}

# "{color}" marks the colour word; singular garments get "a"/"an" in front.
UPPER_PHRASES = {
    "coat": ("{color} coat", "long {color} coat", "{color} overcoat", "{color} coat that reaches the knees"),
    "jacket": ("{color} jacket", "short {color} jacket", "{color} zip jacket", "{color} jacket with a zip"),
    "shirt": (
        "{color} shirt", "short sleeved {color} shirt", "{color} collared shirt", "{color} shirt with short sleeves"
    ),
    "sweater": ("{color} sweater", "{color} jumper", "long sleeved {color} sweater", "{color} knit pullover"),
}
LOWER_PHRASES = {
    "pants": ("{color} pants", "{color} trousers", "long {color} pants", "a pair of {color} trousers"),
    "shorts": ("{color} shorts", "a pair of {color} shorts", "{color} shorts above the knee"),
    "skirt": ("{color} skirt", "{color} knee length skirt", "flared {color} skirt"),
}
SINGULAR_LOWERS = ("skirt",)
BAG_NOUNS = {"backpack": ("backpack", "rucksack"), "handbag": ("handbag", "purse")}

# Which attributes a caption names: (upper, lower, bag) with their weights. Always at least one
# garment, so a caption never describes a person by their bag alone.
NAMED_ITEMS = (
    ((True, True, True), 0.35),
    ((True, True, False), 0.25),
    ((True, False, True), 0.10),
    ((False, True, True), 0.05),
    ((True, False, False), 0.15),
    ((False, True, False), 0.10),
)
GENDER_NAMED_PROBABILITY = 0.85
COLORLESS_PROBABILITY = 0.3  # per named garment


def tokenize(caption: str) -> list[str]:
    """Lower-cased word tokens with punctuation dropped, as CUHK-PEDES' `processed_tokens`."""
    return re.findall(r"[a-z]+", caption.lower())


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _color_word(color: str, rng: np.random.Generator) -> str:
    return _pick(rng, COLOR_SPELLINGS.get(color, (color,)))


def _fill_color(template: str, color: str, rng: np.random.Generator) -> str:
    """The garment phrase with its colour word, or (`COLORLESS_PROBABILITY`) without one."""
    if rng.random() < COLORLESS_PROBABILITY:
        return template.replace("{color} ", "")
    return template.format(color=_color_word(color, rng))


def _bag_with(bag: str, rng: np.random.Generator) -> str:
    """A trailing modifier: "with a backpack", "carrying a purse", "without a bag"."""
    if bag == "none":
        return _pick(rng, ("without a bag", "with no bag", "carrying no bag"))
    return _pick(rng, ("with", "carrying")) + " " + _with_article(_pick(rng, BAG_NOUNS[bag]))


def _bag_predicate(bag: str, possessive: str, rng: np.random.Generator) -> str:
    """A verb phrase: "carries a backpack", "has a purse in her hand", "does not carry a bag"."""
    if bag == "none":
        return _pick(rng, ("carries no bag", "does not carry a bag", "has no bag"))
    noun = _with_article(_pick(rng, BAG_NOUNS[bag]))
    where = {"backpack": f" on {possessive} back", "handbag": f" in {possessive} hand"}[bag]
    return _pick(rng, ("carries", "has", "is carrying")) + " " + noun + (where if rng.random() < 0.4 else "")


def _clothes(attributes: Mapping[str, str], name_upper: bool, name_lower: bool, rng: np.random.Generator) -> str:
    """The named garments joined into one noun phrase, e.g. "a red coat over black trousers"."""
    phrases = []
    if name_upper:
        template = _pick(rng, UPPER_PHRASES[attributes["upper"]])
        phrases.append(_with_article(_fill_color(template, attributes["upper_color"], rng)))
    if name_lower:
        template = _pick(rng, LOWER_PHRASES[attributes["lower"]])
        phrase = _fill_color(template, attributes["lower_color"], rng)
        phrases.append(_with_article(phrase) if attributes["lower"] in SINGULAR_LOWERS else phrase)
    if len(phrases) == 1:
        return phrases[0]
    if rng.random() < 0.2:
        return f"{phrases[0]} over {phrases[1]}"
    if rng.random() < 0.25:
        phrases.reverse()
    return f"{phrases[0]} and {phrases[1]}"


def make_caption(attributes: Mapping[str, str], rng: np.random.Generator) -> str:
    """One caption for an image with these attributes (keys as in `attributes.json`)."""
    choices = [items for items, _ in NAMED_ITEMS]
    weights = np.array([weight for _, weight in NAMED_ITEMS])
    name_upper, name_lower, name_bag = choices[rng.choice(len(choices), p=weights / weights.sum())]
    gender = attributes["gender"]
    noun = _pick(rng, GENDER_NOUNS[gender] if rng.random() < GENDER_NAMED_PROBABILITY else NEUTRAL_NOUNS)
    # A pronoun would reveal the gender, so captions that leave it out repeat the noun instead.
    named_gender = noun not in NEUTRAL_NOUNS
    pronoun = SUBJECT_PRONOUNS[gender] if named_gender else f"the {noun}"
    possessive = POSSESSIVE_PRONOUNS[gender] if named_gender else "the"
    clothes = _clothes(attributes, name_upper, name_lower, rng)
    bag = attributes["bag"]

    article_noun = _with_article(noun)
    if name_bag:
        with_bag, predicate = _bag_with(bag, rng), _bag_predicate(bag, possessive, rng)
        patterns = (
            f"{article_noun} in {clothes} {with_bag}",
            f"{article_noun} wearing {clothes}, {with_bag}",
            f"the {noun} is wearing {clothes} and {predicate}",
            f"this {noun} wears {clothes}. {pronoun} {predicate}",
            f"{article_noun} dressed in {clothes} {with_bag}",
            f"{article_noun} {with_bag}. {pronoun} has on {clothes}",
        )
    else:
        patterns = (
            f"{article_noun} in {clothes}",
            f"{article_noun} wearing {clothes}",
            f"the {noun} is wearing {clothes}",
            f"this {noun} wears {clothes}",
            f"{article_noun} dressed in {clothes}",
            f"the {noun} has on {clothes}",
        )
    sentence = _pick(rng, patterns)
    return ". ".join(part[0].upper() + part[1:] for part in sentence.split(". ")) + "."


# The nouns each garment's phrases use, for reading a caption back (`named_attributes`).
UPPER_NOUNS = {"coat": ("coat", "overcoat"), "jacket": ("jacket",), "shirt": ("shirt",),
               "sweater": ("sweater", "jumper", "pullover")}
LOWER_NOUNS = {"pants": ("pants", "trousers"), "shorts": ("shorts",), "skirt": ("skirt",)}
NO_BAG_WORD = "bag"  # only "without a bag", "with no bag", "does not carry a bag" … use it


def named_attributes(caption: str) -> dict[str, str]:
    """The attributes `caption` names, keys as in ``attributes.json``: the inverse of `make_caption`.

    A colour word colours the next garment noun (`make_caption` always puts it before its
    garment, within the phrase); "bag" alone appears only in phrases saying there is none.
    """
    words = tokenize(caption)
    nouns = {**{noun: ("upper", garment) for garment, options in UPPER_NOUNS.items() for noun in options},
             **{noun: ("lower", garment) for garment, options in LOWER_NOUNS.items() for noun in options}}
    genders = {noun: gender for gender, options in GENDER_NOUNS.items() for noun in options}
    bags = {noun: bag for bag, options in BAG_NOUNS.items() for noun in options}
    spellings = {spelling: color for color, options in COLOR_SPELLINGS.items() for spelling in options}
    named: dict[str, str] = {}
    color = None
    for word in words:
        if word in genders:
            named["gender"] = genders[word]
        elif word in bags:
            named["bag"] = bags[word]
        elif word == NO_BAG_WORD:
            named["bag"] = "none"
        elif word in nouns:
            part, garment = nouns[word]
            named[part] = garment
            if color is not None:
                named[f"{part}_color"] = color
            color = None
        elif word in COLORS or word in spellings:
            color = spellings.get(word, word)
    return named
