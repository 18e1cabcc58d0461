"""Split evaluation: distinct images by image_id, and both retrieval directions scored."""

from __future__ import annotations

import numpy as np
import pytest

from dualenc.retrieval import metrics
from dualenc.retrieval.evaluation import SplitEmbeddings, embed_split, retrieval_metrics, retrieval_report
from dualenc.retrieval.metrics import mean_average_precision, recall_at_k, top_k_accuracy


def _reference_scores(queries, gallery, query_labels, gallery_labels, ks):
    """Float64 recall@k and mAP (percent) by full sort: ties broken by gallery index."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    similarities = queries.astype(np.float64) @ gallery.astype(np.float64).T
    hits_at = {k: [] for k in ks}
    precisions = []
    for row, label in enumerate(query_labels):
        order = np.argsort(-similarities[row], kind="stable")
        relevant = gallery_labels[order] == label
        for k in ks:
            hits_at[k].append(relevant[: min(k, len(gallery))].any())
        if relevant.any():
            ranks = np.flatnonzero(relevant)
            precisions.append(np.mean(np.arange(1, len(ranks) + 1) / (ranks + 1)))
    recalls = {k: 100.0 * np.mean(hits_at[k]) for k in ks}
    return recalls, 100.0 * np.mean(precisions)


def _random_split(rng, captions=40, images=15, dim=8, identities=5) -> SplitEmbeddings:
    image_labels = rng.integers(0, identities, images)
    # Most captions share an identity with some image; a few match none.
    caption_labels = np.concatenate([rng.choice(image_labels, captions - 3), [identities + 1] * 3])
    return SplitEmbeddings(
        caption_embeddings=rng.normal(size=(captions, dim)).astype(np.float32),
        caption_labels=caption_labels,
        image_embeddings=rng.normal(size=(images, dim)).astype(np.float32),
        image_labels=image_labels,
        image_ids=[f"img{index}" for index in range(images)],
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_metrics_match_a_float64_reference_in_both_directions(seed):
    split = _random_split(np.random.default_rng(seed))
    scores = retrieval_metrics(split)
    assert sorted(scores) == sorted(f"{d}_{m}" for d in ("t2i", "i2t") for m in ("r1", "r5", "r10", "map"))
    directions = {
        "t2i": (split.caption_embeddings, split.image_embeddings, split.caption_labels, split.image_labels),
        "i2t": (split.image_embeddings, split.caption_embeddings, split.image_labels, split.caption_labels),
    }
    for name, arguments in directions.items():
        recalls, mean_ap = _reference_scores(*arguments, ks=(1, 5, 10))
        for k in (1, 5, 10):
            assert scores[f"{name}_r{k}"] == pytest.approx(recalls[k], abs=1e-9), (name, k)
        assert scores[f"{name}_map"] == pytest.approx(mean_ap, abs=1e-6), name
        # And it is exactly the library's metric functions, direction by direction.
        direct = metrics.recall_at_k(*arguments, ks=(1, 5, 10))
        assert [scores[f"{name}_r{k}"] for k in (1, 5, 10)] == [direct[k] for k in (1, 5, 10)]
        assert scores[f"{name}_map"] == metrics.mean_average_precision(*arguments)


def test_directions_are_not_swapped():
    # Two images of identity 0 and 1; captions: three of identity 0 placed far from image 0.
    split = SplitEmbeddings(
        caption_embeddings=np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], np.float32),
        caption_labels=np.array([0, 0, 0]),
        image_embeddings=np.array([[1.0, 0.0], [0.0, 1.0]], np.float32),
        image_labels=np.array([0, 1]),
        image_ids=["a", "b"],
    )
    scores = retrieval_metrics(split, ks=(1,))
    # Every caption's nearest image is image 1 (wrong identity): text->image R@1 is 0.
    assert scores["t2i_r1"] == 0.0
    # Image 0's nearest caption is identity 0 (all captions are): image->text R@1 is 50%.
    assert scores["i2t_r1"] == 50.0


def test_k_beyond_a_small_gallery_is_clamped_to_its_size():
    split = _random_split(np.random.default_rng(3), captions=12, images=4)
    scores = retrieval_metrics(split, ks=(1, 5, 10))
    recalls, _ = _reference_scores(
        split.caption_embeddings, split.image_embeddings, split.caption_labels, split.image_labels, ks=(4,)
    )
    assert scores["t2i_r5"] == scores["t2i_r10"] == pytest.approx(recalls[4])


class RecordingEncoder:
    """Flattens its inputs into float rows, keeping each call's inputs for inspection."""

    def __init__(self):
        self.calls = []

    def __call__(self, values):
        values = np.asarray(values)
        self.calls.append(values)
        return values.reshape(len(values), -1).astype(np.float32)


def _batches(image_ids_per_batch, rng):
    """Batches of pairs; an image's pixels and label are a function of its image_id."""
    pixels = {}
    batches = []
    for image_ids in image_ids_per_batch:
        images = [pixels.setdefault(image_id, rng.integers(0, 255, size=(2, 2, 3))) for image_id in image_ids]
        batches.append(
            {
                "image": np.stack(images).astype(np.uint8),
                "caption": np.array([rng.normal(size=3) for _ in image_ids], np.float32),
                "label": np.array([int(image_id[3:]) % 3 for image_id in image_ids], np.int64),
                "image_id": np.array([image_id.encode() for image_id in image_ids]),
            }
        )
    return batches, pixels


def test_embed_split_encodes_each_image_id_once_at_its_first_occurrence():
    rng = np.random.default_rng(0)
    ids_per_batch = [["img0", "img1", "img0"], ["img2", "img1", "img3"], ["img3", "img3"]]
    batches, pixels = _batches(ids_per_batch, rng)
    encode_images, encode_texts = RecordingEncoder(), RecordingEncoder()
    split = embed_split(batches, encode_images, encode_texts)

    assert split.image_ids == ["img0", "img1", "img2", "img3"]
    expected_images = np.stack([pixels[image_id].reshape(-1) for image_id in split.image_ids]).astype(np.float32)
    np.testing.assert_array_equal(split.image_embeddings, expected_images)
    np.testing.assert_array_equal(split.image_labels, [0, 1, 2, 0])
    # The last batch holds only seen images, so the image encoder ran on two batches only.
    assert [len(call) for call in encode_images.calls] == [2, 2]
    # Captions are all kept, in order.
    all_captions = np.concatenate([batch["caption"] for batch in batches])
    np.testing.assert_array_equal(split.caption_embeddings, all_captions)
    np.testing.assert_array_equal(split.caption_labels, np.concatenate([batch["label"] for batch in batches]))


def test_embed_split_reads_the_given_keys_for_cached_features():
    rng = np.random.default_rng(1)
    batches, _ = _batches([["img0", "img0", "img4"]], rng)
    for batch in batches:
        batch["image_features"] = np.arange(len(batch["image"]) * 2, dtype=np.float32).reshape(-1, 2)
        batch["caption_features"] = batch.pop("caption")
        del batch["image"]
    split = embed_split(
        batches, RecordingEncoder(), RecordingEncoder(), image_key="image_features", caption_key="caption_features"
    )
    np.testing.assert_array_equal(split.image_embeddings, [[0.0, 1.0], [4.0, 5.0]])
    assert split.caption_embeddings.shape == (3, 3)


def test_embed_split_without_batches_raises():
    with pytest.raises(ValueError, match="no batches"):
        embed_split([], RecordingEncoder(), RecordingEncoder())


def test_retrieval_report_matches_metrics():
    rng = np.random.default_rng(6)
    images = rng.normal(size=(12, 6))
    image_labels = np.arange(12) // 2  # two images per identity
    captions = rng.normal(size=(30, 6))
    caption_labels = rng.integers(0, 6, 30)
    embeddings = SplitEmbeddings(captions, caption_labels, images, image_labels, [str(i) for i in range(12)])
    report = retrieval_report(embeddings, first_caption_embeddings=captions[:12])
    assert report["text_to_image"]["R@5"] == recall_at_k(captions, images, caption_labels, image_labels, ks=(5,))[5]
    assert report["image_to_text"]["mAP"] == mean_average_precision(images, captions, image_labels, caption_labels)
    assert report["top_k_accuracy"] == {"k": 12, "percent": top_k_accuracy(captions[:12], images, np.arange(12), k=12)}
    assert (report["images"], report["captions"]) == (12, 30)
    assert 0 < report["text_to_image"]["R@1"] < 100  # random embeddings: neither trivially right nor wrong


def test_evaluate_split_scores_a_packed_split_against_a_float64_reference(tmp_path, monkeypatch):
    from dualenc.retrieval import evaluation
    from dualenc.retrieval.evaluation import evaluate_split
    from tests.support.colour_run import write_packed_dataset

    rng = np.random.default_rng(7)
    # Nine images of four people, two captions each; the index holds the images in its own
    # order (reversed here), as a gallery index may.
    records = [(f"caption {image} {n}", b"", f"img{image}", image % 4) for image in range(9) for n in range(2)]
    write_packed_dataset(tmp_path / "data", {"test": records})
    vectors = {caption: rng.normal(size=6).astype(np.float32) for caption, *_ in records}
    text_encoder = lambda captions: np.stack([vectors[caption] for caption in captions])  # noqa: E731
    image_ids = [f"img{image}" for image in reversed(range(9))]
    image_labels = np.array([int(image_id[3:]) % 4 for image_id in image_ids])
    images = rng.normal(size=(9, 6)).astype(np.float32)

    report = evaluate_split(text_encoder, tmp_path / "data", "test", images, image_labels, image_ids)
    captions = np.stack([vectors[caption] for caption, *_ in records])
    caption_labels = np.array([label for *_, label in records])
    t2i, t2i_map = _reference_scores(captions, images, caption_labels, image_labels, (1, 5, 10))
    i2t, i2t_map = _reference_scores(images, captions, image_labels, caption_labels, (1, 5, 10))
    assert report["data"] == str(tmp_path / "data") and report["split"] == "test"
    assert (report["images"], report["captions"]) == (9, 18)
    for name, reference, reference_map in (("text_to_image", t2i, t2i_map), ("image_to_text", i2t, i2t_map)):
        assert report[name] == pytest.approx({"R@1": reference[1], "R@5": reference[5], "R@10": reference[10],
                                              "mAP": reference_map}, abs=1e-6)
    assert report["top_k_accuracy"] == {"k": 9, "percent": 100.0}  # k capped at the 9 images: all found
    # At k = 1: does each image's first caption ("caption i 0") rank that image first?
    monkeypatch.setattr(evaluation, "TOP_K_ACCURACY_K", 1)
    at_one = evaluate_split(text_encoder, tmp_path / "data", "test", images, image_labels, image_ids)["top_k_accuracy"]
    first = np.stack([vectors[f"caption {image_id[3:]} 0"] for image_id in image_ids])
    similarities = first.astype(np.float64) @ images.astype(np.float64).T
    expected = 100.0 * np.mean(similarities.argmax(axis=1) == np.arange(9))
    assert at_one == {"k": 1, "percent": pytest.approx(expected)} and 0 < expected < 100


@pytest.mark.parametrize("protocol", [None, "image-text"])
def test_evaluate_split_holds_the_paper_table_against_a_float64_reference(tmp_path, protocol):
    from dualenc.retrieval.evaluation import evaluate_split
    from tests.support.colour_run import write_packed_dataset

    rng = np.random.default_rng(8)
    # Ten images of five people (labels shared: the person protocol unless named), three
    # captions each, packed in an order that interleaves images.
    records = [(f"caption {image} {n}", b"", f"img{image}", image % 5) for n in range(3) for image in range(10)]
    write_packed_dataset(tmp_path / "data", {"test": records})
    vectors = {caption: rng.normal(size=6).astype(np.float32) for caption, *_ in records}
    text_encoder = lambda captions: np.stack([vectors[caption] for caption in captions])  # noqa: E731
    image_ids = [f"img{image}" for image in rng.permutation(10)]
    image_labels = np.array([int(image_id[3:]) % 5 for image_id in image_ids])
    images = rng.normal(size=(10, 6)).astype(np.float32)

    report = evaluate_split(text_encoder, tmp_path / "data", "test", images, image_labels, image_ids, protocol)
    captions = np.stack([vectors[caption] for caption, *_ in records]).astype(np.float64)
    unit_images = images.astype(np.float64) / np.linalg.norm(images, axis=1, keepdims=True)
    similarities = captions / np.linalg.norm(captions, axis=1, keepdims=True) @ unit_images.T  # (30, 10) cosine
    if protocol is None:
        caption_labels = np.array([label for *_, label in records])
        t2i, t2i_map = _reference_scores(captions, images, caption_labels, image_labels, (1, 5, 10))
        order = np.argsort(-similarities, axis=1, kind="stable")
        inp = [np.count_nonzero(image_labels == label) / (np.flatnonzero(image_labels[order[row]] == label)[-1] + 1)
               for row, label in enumerate(caption_labels)]
        assert report["protocol"] == "person"
        assert report["paper"] == {"text_to_image": pytest.approx(
            {"R@1": t2i[1], "R@5": t2i[5], "R@10": t2i[10], "mAP": t2i_map, "mINP": 100 * np.mean(inp)}, abs=1e-6)}
        return
    # Image-text: a caption's hit is its own image; an image's, any of its three captions.
    own = np.array([image_ids.index(image_id) for _, _, image_id, _ in records])
    text_ranks = np.count_nonzero(similarities > similarities[np.arange(30), own][:, None], axis=1)
    image_ranks = [np.count_nonzero(similarities[:, image] > similarities[own == image, image].max()) for image in range(10)]
    expected_t2i = {f"R@{k}": 100 * np.mean(text_ranks < k) for k in (1, 5, 10)}
    expected_i2t = {f"R@{k}": 100 * np.mean(np.array(image_ranks) < k) for k in (1, 5, 10)}
    assert report["protocol"] == "image-text"
    assert report["paper"]["text_to_image"] == pytest.approx(expected_t2i, abs=1e-6)
    assert report["paper"]["image_to_text"] == pytest.approx(expected_i2t, abs=1e-6)
    assert report["paper"]["RSUM"] == pytest.approx(sum(expected_t2i.values()) + sum(expected_i2t.values()), abs=1e-6)
    assert 0 < expected_t2i["R@1"] < 100 and 0 < expected_i2t["R@1"] < 100
