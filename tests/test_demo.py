"""The synthetic demo dataset: CUHK-PEDES schema, captions true to the pictures, determinism, safety."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualenc.core.errors import DualEncError
from tfrecords_tools import demo, demo_captions, demo_render

IDENTITIES = 24
SEED = 3

# The caption checker's own word lists, written from the attribute vocabulary rather than from
# the generator's templates: any word here must agree with attributes.json wherever it appears.
COLOR_WORDS = {color: color for color in demo.COLORS} | {"gray": "grey"}
GARMENT_WORDS = {
    "coat": "coat", "overcoat": "coat", "jacket": "jacket", "shirt": "shirt",
    "sweater": "sweater", "jumper": "sweater", "pullover": "sweater",
    "pants": "pants", "trousers": "pants", "shorts": "shorts", "skirt": "skirt",
}
GENDER_WORDS = {
    "woman": "woman", "lady": "woman", "girl": "woman", "female": "woman", "she": "woman", "her": "woman",
    "man": "man", "guy": "man", "gentleman": "man", "male": "man", "he": "man", "his": "man", "him": "man",
}
BAG_WORDS = {"backpack": "backpack", "rucksack": "backpack", "handbag": "handbag", "purse": "handbag"}
NEGATIONS = {"no", "not", "without"}
# Words the generator might plausibly use but must not, because the checker could not verify them.
UNCHECKED_WORDS = {"hair", "skin", "shoes", "boots", "dress", "hat", "bags", "clothes"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return demo.make_demo(tmp_path_factory.mktemp("demo") / "raw", identities=IDENTITIES, seed=SEED)


def _load(dataset: Path) -> tuple[list[dict], dict]:
    entries = json.loads((dataset / demo.REID_RAW_NAME).read_text(encoding="utf-8"))
    attributes = json.loads((dataset / demo.ATTRIBUTES_NAME).read_text(encoding="utf-8"))
    return entries, attributes


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_reid_raw_and_attributes_follow_the_cuhk_pedes_schema(dataset):
    entries, attributes = _load(dataset)
    assert sorted(path.name for path in dataset.iterdir()) == ["attributes.json", "demo.json", "imgs", "reid_raw.json"]
    assert isinstance(entries, list) and len(entries) >= 3 * IDENTITIES
    for entry in entries:
        assert set(entry) == {"id", "file_path", "captions", "processed_tokens", "split"}
        assert type(entry["id"]) is int and entry["split"] in ("train", "val", "test")
        assert not Path(entry["file_path"]).is_absolute() and (dataset / "imgs" / entry["file_path"]).is_file()
        assert 1 <= len(entry["captions"]) <= 3 and len(set(entry["captions"])) == len(entry["captions"])
        assert all(isinstance(caption, str) and caption for caption in entry["captions"])
        # Lower-cased words, punctuation dropped, one token list per caption.
        expected_tokens = [[word for word in re.split(r"[^a-z]+", caption.lower()) if word] for caption in entry["captions"]]
        assert entry["processed_tokens"] == expected_tokens
    assert sorted(attributes) == sorted(entry["file_path"] for entry in entries)
    for values in attributes.values():
        assert set(values) == set(demo.ATTRIBUTE_VALUES)
        for field, value in values.items():
            assert value in demo.ATTRIBUTE_VALUES[field], (field, value)
    image_files = sorted(str(path.relative_to(dataset / "imgs")) for path in (dataset / "imgs").rglob("*") if path.is_file())
    assert image_files == sorted(attributes)


def test_vocabularies_match_the_brief_and_every_module_covers_them():
    assert set(demo.GENDERS) == {"woman", "man"}
    assert set(demo.UPPERS) == {"coat", "jacket", "shirt", "sweater"}
    assert set(demo.LOWERS) == {"pants", "shorts", "skirt"}
    assert set(demo.BAGS) == {"backpack", "handbag", "none"}
    assert set(demo.COLORS) == {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey"}
    assert set(demo_render.COLOR_RGB) == set(demo.COLORS)
    assert set(demo_captions.UPPER_PHRASES) == set(demo.UPPERS)
    assert set(demo_captions.LOWER_PHRASES) == set(demo.LOWERS)
    assert set(demo_captions.GENDER_NOUNS) == set(demo.GENDERS)


def test_identities_are_one_based_one_combination_each_and_splits_are_disjoint(dataset):
    entries, attributes = _load(dataset)
    assert {entry["id"] for entry in entries} == set(range(1, IDENTITIES + 1))
    combination_of = {}
    ids_by_split = {"train": set(), "val": set(), "test": set()}
    for entry in entries:
        combination = tuple(sorted(attributes[entry["file_path"]].items()))
        assert combination_of.setdefault(entry["id"], combination) == combination
        ids_by_split[entry["split"]].add(entry["id"])
    assert len(set(combination_of.values())) == IDENTITIES
    assert all(ids_by_split.values())
    assert not ids_by_split["train"] & ids_by_split["val"]
    assert not ids_by_split["train"] & ids_by_split["test"]
    assert not ids_by_split["val"] & ids_by_split["test"]
    # Train takes the lowest ids, so `id - 1` is a class index over train identities.
    assert ids_by_split["train"] == set(range(1, len(ids_by_split["train"]) + 1))
    images_per_identity = np.bincount([entry["id"] for entry in entries])[1:]
    assert images_per_identity.min() >= 3 and images_per_identity.max() <= 6
    marker = json.loads((dataset / demo.MARKER_NAME).read_text(encoding="utf-8"))
    assert marker["identities"] == IDENTITIES and marker["seed"] == SEED
    assert sum(split["images"] for split in marker["counts"].values()) == len(entries)


def _check_caption(caption: str, truth: dict) -> None:
    """Every gender, colour, garment and bag word in `caption` must agree with `truth`."""
    tokens = [word for word in re.split(r"[^a-z]+", caption.lower()) if word]
    assert not UNCHECKED_WORDS & set(tokens), caption
    slot_of = {truth["upper"]: "upper", truth["lower"]: "lower"}
    garments = 0
    for position, token in enumerate(tokens):
        if token in GENDER_WORDS:
            assert GENDER_WORDS[token] == truth["gender"], caption
        if token in GARMENT_WORDS:
            assert GARMENT_WORDS[token] in slot_of, caption
            garments += 1
        if token in BAG_WORDS:
            assert BAG_WORDS[token] == truth["bag"], caption
        if token == "bag":
            negated = bool(NEGATIONS & set(tokens[max(0, position - 3) : position]))
            assert negated == (truth["bag"] == "none"), caption
        if token in COLOR_WORDS:
            following = [GARMENT_WORDS[word] for word in tokens[position + 1 : position + 5] if word in GARMENT_WORDS]
            assert following and following[0] in slot_of, f"colour without a worn garment: {caption}"
            assert truth[slot_of[following[0]] + "_color"] == COLOR_WORDS[token], caption
    assert garments >= 1, caption


def test_captions_only_say_what_the_attributes_say(dataset):
    entries, attributes = _load(dataset)
    for entry in entries:
        for caption in entry["captions"]:
            _check_caption(caption, attributes[entry["file_path"]])


def test_caption_checker_catches_wrong_captions():
    truth = {"gender": "woman", "upper": "coat", "upper_color": "red", "lower": "pants", "lower_color": "black", "bag": "none"}
    _check_caption("A woman in a long red coat and black trousers without a bag.", truth)
    for wrong in (
        "A man in a red coat.",
        "A woman in a black coat.",
        "A woman in a red jacket.",
        "A woman in a red coat carrying a backpack.",
        "She carries a bag and wears red pants.",
        "A woman with long hair.",
    ):
        with pytest.raises(AssertionError):
            _check_caption(wrong, truth)


def test_captions_vary_in_wording_and_in_what_they_name():
    rng = np.random.default_rng(0)
    truth = {"gender": "man", "upper": "jacket", "upper_color": "grey", "lower": "shorts", "lower_color": "blue", "bag": "backpack"}
    captions = [demo_captions.make_caption(truth, rng) for _ in range(300)]
    words = {word for caption in captions for word in demo_captions.tokenize(caption)}
    assert {"gray", "grey", "backpack", "rucksack", "man", "guy", "person", "he", "his"} <= words
    assert len(set(captions)) > 150
    assert any("shorts" not in caption for caption in captions)
    assert any("jacket" not in caption for caption in captions)
    assert any("backpack" not in caption and "rucksack" not in caption for caption in captions)
    for caption in captions:
        _check_caption(caption, truth)


def test_images_are_128_by_64_rgb_in_both_formats_and_show_the_garment_colours(dataset):
    entries, attributes = _load(dataset)
    palette_names = list(demo_render.COLOR_RGB)
    palette = np.array([demo_render.COLOR_RGB[name] for name in palette_names], dtype=np.float64)
    formats = set()
    for entry in entries:
        with Image.open(dataset / "imgs" / entry["file_path"]) as image:
            formats.add(image.format)
            assert image.format == {".png": "PNG", ".jpg": "JPEG"}[Path(entry["file_path"]).suffix]
            assert image.mode == "RGB" and image.size == (64, 128)
            pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
        # Each pixel votes for its nearest palette colour; the worn colours must get a clear share.
        nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(axis=-1), axis=1)
        truth = attributes[entry["file_path"]]
        assert np.sum(nearest == palette_names.index(truth["upper_color"])) >= 300, entry["file_path"]
        assert np.sum(nearest == palette_names.index(truth["lower_color"])) >= 120, entry["file_path"]
    assert formats == {"PNG", "JPEG"}


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(dataset, tmp_path):
    again = demo.make_demo(tmp_path / "again", identities=IDENTITIES, seed=SEED)
    assert _file_hashes(again) == _file_hashes(dataset)
    other = demo.make_demo(tmp_path / "other", identities=IDENTITIES, seed=SEED + 1)
    other_hashes = _file_hashes(other)
    assert other_hashes[demo.REID_RAW_NAME] != _file_hashes(dataset)[demo.REID_RAW_NAME]
    shared_images = set(other_hashes) & set(_file_hashes(dataset)) - {demo.ATTRIBUTES_NAME, demo.REID_RAW_NAME}
    assert all(other_hashes[name] != _file_hashes(dataset)[name] for name in shared_images if name.startswith("imgs"))


def test_existing_identical_dataset_is_reused_untouched(dataset):
    before = {path: path.stat().st_mtime_ns for path in dataset.rglob("*")}
    assert demo.make_demo(dataset, identities=IDENTITIES, seed=SEED) == dataset
    assert {path: path.stat().st_mtime_ns for path in dataset.rglob("*")} == before


def test_demo_with_other_parameters_is_replaced_and_nothing_is_left_beside_it(tmp_path):
    out_dir = tmp_path / "raw"
    demo.make_demo(out_dir, identities=10, seed=0)
    demo.make_demo(out_dir, identities=12, seed=5)
    marker = json.loads((out_dir / demo.MARKER_NAME).read_text(encoding="utf-8"))
    assert (marker["identities"], marker["seed"]) == (12, 5)
    entries, _ = _load(out_dir)
    assert {entry["id"] for entry in entries} == set(range(1, 13))
    assert [path.name for path in tmp_path.iterdir()] == ["raw"]


def test_empty_directory_is_filled(tmp_path):
    out_dir = tmp_path / "empty"
    out_dir.mkdir()
    demo.make_demo(out_dir, identities=10)
    assert (out_dir / demo.MARKER_NAME).is_file()


def test_foreign_directory_is_refused_and_left_alone(tmp_path):
    out_dir = tmp_path / "photos"
    out_dir.mkdir()
    (out_dir / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(DualEncError) as info:
        demo.make_demo(out_dir, identities=10)
    message = str(info.value)
    assert "\n" not in message and str(out_dir) in message and "empty" in message
    assert [path.name for path in out_dir.iterdir()] == ["holiday.jpg"]
    assert [path.name for path in tmp_path.iterdir()] == ["photos"]


@pytest.mark.parametrize(
    "identities, seed, words",
    [(9, 0, ["identities", "9", "10"]), (True, 0, ["identities", "True"]), (10, -1, ["seed", "-1"]), (10, 1.5, ["seed"])],
)
def test_bad_parameters_are_refused_in_one_line(tmp_path, identities, seed, words):
    with pytest.raises(DualEncError) as info:
        demo.make_demo(tmp_path / "raw", identities=identities, seed=seed)
    assert "\n" not in str(info.value) and all(word in str(info.value) for word in words)
    assert not (tmp_path / "raw").exists()


def test_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "raw"
    target.write_text("not a directory")
    with pytest.raises(DualEncError, match="is a file"):
        demo.make_demo(target, identities=10)


def test_interrupted_build_leaves_no_dataset(tmp_path, monkeypatch):
    def fail_halfway(root, *args):
        (root / demo.REID_RAW_NAME).write_text("[]")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_dataset", fail_halfway)
    with pytest.raises(KeyboardInterrupt):
        demo.make_demo(tmp_path / "raw", identities=10)
    assert list(tmp_path.iterdir()) == []


def test_default_size_gives_about_twenty_five_thousand_training_pairs():
    sizes = demo.split_sizes(demo.DEFAULT_IDENTITIES)
    assert sum(sizes.values()) == demo.DEFAULT_IDENTITIES
    mean_images = sum(demo.IMAGES_PER_IDENTITY) / 2
    mean_captions = sum(demo.CAPTIONS_PER_IMAGE) / 2
    assert 22000 <= sizes["train"] * mean_images * mean_captions <= 28000
    assert demo.split_sizes(10) == {"train": 8, "val": 1, "test": 1}
