"""Dataset statistics on a tiny hand-packed dataset: counts, histograms, charts, errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import tensorflow as tf
from PIL import Image

from dualenc.core.errors import DualEncError
from dualenc.data.records import MANIFEST_NAME, serialize_example, shard_name
from tfrecords_tools.stats import write_stats

# Images are never decoded, so they need not be real JPEGs.
NOT_AN_IMAGE = b"\xff\xd8 stats must not decode this"

# (caption, image_id, label) per shard. Word counts: 6, 3, 3 | 5, 4, 4, 7 | 2, 4.
TRAIN_SHARDS = [
    [
        ("a man in a red coat", "p0/a.jpg", 0),
        ("  he   walks   fast  ", "p0/a.jpg", 0),
        ("woman with bag", "p0/b.jpg", 0),
    ],
    [
        ("a girl in blue jeans", "p1/c.jpg", 1),
        ("she carries a phone", "p1/c.jpg", 1),
        ("short hair, white shirt", "p1/c.jpg", 1),
        ("an old man holding a long umbrella", "p2/d.jpg", 2),
    ],
]
VAL_SHARDS = [[("black backpack", "p5/e.jpg", 5), ("grey trousers , sneakers", "p5/e.jpg", 5)]]

EXPECTED = {
    "train": {
        "pairs": 7,
        "images": 4,
        "identities": 3,
        "mean_caption_words": round(32 / 7, 3),
        "images_per_identity": {"1": 2, "2": 1},
        "captions_per_image": {"1": 2, "2": 1, "3": 1},
        "caption_words": {"3": 2, "4": 2, "5": 1, "6": 1, "7": 1},
    },
    "val": {
        "pairs": 2,
        "images": 1,
        "identities": 1,
        "mean_caption_words": 3.0,
        "images_per_identity": {"1": 1},
        "captions_per_image": {"2": 1},
        "caption_words": {"2": 1, "4": 1},
    },
}
CHARTS = ["identities_per_split.png", "images_per_identity.png", "captions_per_image.png", "caption_length.png"]


def _pack(data_dir, splits: dict[str, list[list[tuple[str, str, int]]]]) -> None:
    """Write shards and a manifest the way the packer lays them out."""
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"format_version": 1, "source": {"format": "test"}, "splits": {}, "skipped": []}
    for split, shards in splits.items():
        names = [shard_name(split, index, len(shards)) for index in range(len(shards))]
        for name, rows in zip(names, shards):
            with tf.io.TFRecordWriter(str(data_dir / name)) as writer:
                for caption, image_id, label in rows:
                    writer.write(serialize_example(caption, NOT_AN_IMAGE, image_id, label))
        rows = [row for shard in shards for row in shard]
        manifest["splits"][split] = {
            "pairs": len(rows),
            "images": len({image_id for _, image_id, _ in rows}),
            "ids": len({label for _, _, label in rows}),
            "shards": names,
            "sha256": {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in names},
        }
    (data_dir / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.fixture
def packed(tmp_path):
    data_dir = tmp_path / "packed"
    _pack(data_dir, {"train": TRAIN_SHARDS, "val": VAL_SHARDS})
    return data_dir


def test_counts_and_histograms_match_a_hand_count(packed, capsys):
    stats = write_stats(packed)

    assert stats["splits"] == EXPECTED
    printed = capsys.readouterr().out
    assert "train" in printed and "val" in printed
    train_row = next(line for line in printed.splitlines() if line.startswith("train "))
    assert train_row.split()[:4] == ["train", "7", "4", "3"]


def test_charts_are_png_files_and_stats_json_matches(packed):
    stats = write_stats(packed)

    out_dir = packed / "stats"
    assert stats["charts"] == CHARTS
    for name in CHARTS:
        with Image.open(out_dir / name) as chart:
            assert chart.format == "PNG"
            assert chart.size[0] > 300 and chart.size[1] > 200
    assert json.loads((out_dir / "stats.json").read_text()) == stats
    assert not list(out_dir.glob("*.tmp*"))


def test_out_dir_can_be_chosen(packed, tmp_path):
    out_dir = tmp_path / "elsewhere" / "charts"
    write_stats(packed, out_dir)
    assert sorted(path.name for path in out_dir.iterdir()) == sorted([*CHARTS, "stats.json"])
    assert not (packed / "stats").exists()


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(DualEncError, match="does not exist") as info:
        write_stats(tmp_path / "nowhere")
    assert "nowhere" in str(info.value) and "\n" not in str(info.value)


def test_missing_manifest_says_to_pack_first(tmp_path):
    with pytest.raises(DualEncError, match="not a packed dataset"):
        write_stats(tmp_path)


@pytest.mark.parametrize(
    "manifest_text, words",
    [("{not json", "not valid JSON"), ('{"format_version": 1}', "'splits'"), ('{"format_version": 7, "splits": {}}', "format_version")],
)
def test_bad_manifest_is_one_line(tmp_path, manifest_text, words):
    (tmp_path / MANIFEST_NAME).write_text(manifest_text)
    with pytest.raises(DualEncError, match=words) as info:
        write_stats(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_shard_is_named(packed):
    (packed / shard_name("train", 1, 2)).unlink()
    with pytest.raises(DualEncError, match="train-00001-of-00002.tfrecord"):
        write_stats(packed)


def test_corrupt_shard_is_named(packed):
    shard = packed / shard_name("val", 0, 1)
    shard.write_bytes(shard.read_bytes()[:-9] + b"garbage!!")
    with pytest.raises(DualEncError, match="val-00000-of-00001.tfrecord.*cannot be read") as info:
        write_stats(packed)
    assert "\n" not in str(info.value)
