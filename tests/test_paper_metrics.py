"""The tables papers print: mINP and the person protocol against a float64 NumPy reference and
against IRRA's `rank` formula, the image-text protocol (R@1/5/10 both ways, RSUM) against a
reference that matches captions to their own images, and the protocol chosen from the split."""

from __future__ import annotations

import numpy as np
import pytest

from dualenc.core.errors import DualEncError
from dualenc.retrieval import metrics
from dualenc.retrieval.evaluation import SplitEmbeddings, choose_protocol, paper_table, retrieval_report

CHUNK_SIZES = [1, 5, 1024]


def _similarities(queries, gallery):
    """Float64 cosine similarities (Q, G)."""
    queries = np.asarray(queries, np.float64)
    gallery = np.asarray(gallery, np.float64)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return queries @ gallery.T


def reference_minp(queries, gallery, query_labels, gallery_labels):
    """From the definition: rank every item by a full stable sort, find the last relevant one."""
    order = np.argsort(-_similarities(queries, gallery), axis=1, kind="stable")
    penalties = []
    for row, label in enumerate(query_labels):
        relevant_positions = np.flatnonzero(gallery_labels[order[row]] == label)
        if relevant_positions.size:
            penalties.append(relevant_positions.size / (relevant_positions[-1] + 1))
    return 100.0 * np.mean(penalties)


def irra_rank(similarity, query_labels, gallery_labels, max_rank=10):
    """IRRA's `utils/metrics.py` `rank` re-stated in NumPy from its definition: CMC curve (percent,
    ranks 1..max_rank), mAP and mINP over a descending sort of each row."""
    indices = np.argsort(-similarity, axis=1, kind="stable")
    matches = gallery_labels[indices] == query_labels[:, None]  # (Q, G)
    cmc = np.minimum(matches[:, :max_rank].cumsum(axis=1), 1).mean(axis=0) * 100
    cumulative = matches.cumsum(axis=1)
    last = np.array([np.flatnonzero(row)[-1] for row in matches])
    minp = np.mean(cumulative[np.arange(len(matches)), last] / (last + 1.0)) * 100
    precision = cumulative / np.arange(1.0, matches.shape[1] + 1) * matches
    mean_ap = np.mean(precision.sum(axis=1) / matches.sum(axis=1)) * 100
    return cmc, mean_ap, minp


def _person_problem(seed, captions=60, identities=12, images_per_identity=3, dim=8, noise=1.2):
    """Identity-labelled images and captions near per-identity centres: rankings are informative
    but imperfect, and every caption's person has images (IRRA assumes so)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim))
    image_labels = np.repeat(np.arange(identities), images_per_identity)
    rng.shuffle(image_labels)
    caption_labels = rng.integers(0, identities, captions)
    images = centres[image_labels] + noise * rng.normal(size=(len(image_labels), dim))
    caption_embeddings = centres[caption_labels] + noise * rng.normal(size=(captions, dim))
    return caption_embeddings.astype(np.float32), images.astype(np.float32), caption_labels, image_labels


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minp_matches_a_float64_reference(seed, chunk_size):
    queries, gallery, query_labels, gallery_labels = _person_problem(seed)
    # Some queries of a person with no gallery image: excluded, as from mAP.
    query_labels = np.where(np.arange(len(query_labels)) % 7 == 0, 99, query_labels)
    got = metrics.mean_inverse_negative_penalty(queries, gallery, query_labels, gallery_labels, chunk_size=chunk_size)
    expected = reference_minp(queries, gallery, query_labels, gallery_labels)
    assert got == pytest.approx(expected, abs=1e-9)
    assert 5 < got < 95  # neither trivially perfect nor hopeless
    # The buried last match, not the first one: reciprocal rank (a plausible mistake) differs.
    order = np.argsort(-_similarities(queries, gallery), axis=1, kind="stable")
    reciprocal = [1 / (np.flatnonzero(gallery_labels[order[row]] == label)[0] + 1)
                  for row, label in enumerate(query_labels) if label != 99]
    assert abs(100 * np.mean(reciprocal) - got) > 5


def test_minp_edge_cases():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # Both label-0 items tie at the top: the later one is the last match, rank 1, so INP = 2/2.
    assert metrics.mean_inverse_negative_penalty([[1.0, 0.0]], gallery, [0], [0, 1, 0]) == 100.0
    # Label 0 at ranks 0 and 2 (item 1 scores between them): INP = 2/3.
    assert metrics.mean_inverse_negative_penalty([[1.0, 0.5]], np.array([[1.0, 0.0], [1.0, 0.6], [0.0, 1.0]]),
                                                 [0], [0, 1, 0]) == pytest.approx(200 / 3)
    assert np.isnan(metrics.mean_inverse_negative_penalty([[1.0, 0.0]], gallery, [5], [0, 1, 0]))
    with pytest.raises(DualEncError, match="query_labels must have one entry per embedding"):
        metrics.mean_inverse_negative_penalty(np.ones((2, 2)), gallery, [0], [0, 1, 0])


@pytest.mark.parametrize("seed", [3, 4])
def test_person_table_equals_irras_rank(seed):
    captions, images, caption_labels, image_labels = _person_problem(seed)
    split = SplitEmbeddings(captions, caption_labels, images, image_labels, [f"img{row}" for row in range(len(images))])
    table = paper_table(split, "person")
    assert list(table) == ["text_to_image"]
    assert list(table["text_to_image"]) == ["R@1", "R@5", "R@10", "mAP", "mINP"]
    cmc, mean_ap, minp = irra_rank(_similarities(captions, images), caption_labels, image_labels)
    expected = {"R@1": cmc[0], "R@5": cmc[4], "R@10": cmc[9], "mAP": mean_ap, "mINP": minp}
    assert table["text_to_image"] == pytest.approx(expected, abs=1e-9)
    assert 0 < expected["R@1"] < 100 and expected["mINP"] < expected["mAP"]


def reference_image_text(captions, images, caption_image_ids, image_ids):
    """COCO/Flickr30k retrieval from the definition, float64 full sorts: text→image finds the
    caption's own image; image→text finds any caption of the image."""
    similarities = _similarities(captions, images)
    caption_images = np.array([image_ids.index(image_id) for image_id in caption_image_ids])
    text_ranks = [np.flatnonzero(np.argsort(-row, kind="stable") == own)[0]
                  for row, own in zip(similarities, caption_images)]
    image_ranks = [np.flatnonzero(caption_images[np.argsort(-column, kind="stable")] == image)[0]
                   for image, column in enumerate(similarities.T)]
    table = {
        "text_to_image": {f"R@{k}": 100.0 * np.mean(np.array(text_ranks) < k) for k in (1, 5, 10)},
        "image_to_text": {f"R@{k}": 100.0 * np.mean(np.array(image_ranks) < k) for k in (1, 5, 10)},
    }
    table["RSUM"] = sum(table["text_to_image"].values()) + sum(table["image_to_text"].values())
    return table


def _image_text_problem(seed, images=30, captions_per_image=5, dim=8, noise=1.5):
    """Images, and captions near their image, in a shuffled order; labels from `images // 3`, so
    several images share one (as when an identity-labelled set is scored image-text)."""
    rng = np.random.default_rng(seed)
    image_embeddings = rng.normal(size=(images, dim))
    owners = rng.permutation(np.repeat(np.arange(images), captions_per_image))
    caption_embeddings = image_embeddings[owners] + noise * rng.normal(size=(len(owners), dim))
    image_ids = [f"img{image}" for image in range(images)]
    return SplitEmbeddings(
        caption_embeddings=caption_embeddings.astype(np.float32),
        caption_labels=owners // 3,
        image_embeddings=image_embeddings.astype(np.float32),
        image_labels=np.arange(images) // 3,
        image_ids=image_ids,
        caption_image_ids=[image_ids[owner] for owner in owners],
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_image_text_table_matches_captions_to_their_own_images(seed):
    split = _image_text_problem(seed)
    table = paper_table(split, "image-text")
    expected = reference_image_text(split.caption_embeddings, split.image_embeddings, split.caption_image_ids,
                                    split.image_ids)
    assert list(table) == ["text_to_image", "image_to_text", "RSUM"]
    for direction in ("text_to_image", "image_to_text"):
        assert table[direction] == pytest.approx(expected[direction], abs=1e-9), direction
    assert table["RSUM"] == pytest.approx(expected["RSUM"], abs=1e-9)
    assert 0 < table["text_to_image"]["R@1"] < 100 and 0 < table["image_to_text"]["R@1"] < 100
    # Matching by the shared labels instead would score higher: the protocol is by image.
    by_label = metrics.recall_at_k(split.caption_embeddings, split.image_embeddings, split.caption_labels,
                                   split.image_labels, ks=(1,))[1]
    assert by_label > table["text_to_image"]["R@1"]


def test_image_text_table_without_caption_images_matches_by_label():
    split = _image_text_problem(5)
    one_label_per_image = SplitEmbeddings(
        split.caption_embeddings, np.array([int(image_id[3:]) for image_id in split.caption_image_ids]),
        split.image_embeddings, np.arange(len(split.image_ids)), split.image_ids,
    )
    assert paper_table(one_label_per_image, "image-text") == paper_table(split, "image-text")


def test_the_protocol_follows_the_split_and_can_be_named():
    assert choose_protocol([0, 1, 2, 3]) == "image-text"
    assert choose_protocol([0, 1, 1, 3]) == "person"
    image_text = _image_text_problem(2)
    report = retrieval_report(image_text, image_text.caption_embeddings[:30])
    assert report["protocol"] == "person"  # its labels are shared by three images each
    assert report["paper"] == paper_table(image_text, "person")
    named = retrieval_report(image_text, image_text.caption_embeddings[:30], protocol="image-text")
    assert named["protocol"] == "image-text" and named["paper"] == paper_table(image_text, "image-text")
    # The full tables stay what they were.
    assert named["text_to_image"] == report["text_to_image"]
    with pytest.raises(DualEncError, match=r"^protocol must be one of image-text, person; got 'coco'$"):
        retrieval_report(image_text, image_text.caption_embeddings[:30], protocol="coco")


def test_k_beyond_a_small_gallery_is_clamped():
    split = _image_text_problem(6, images=4, captions_per_image=2)
    table = paper_table(split, "image-text")
    assert table["text_to_image"]["R@5"] == table["text_to_image"]["R@10"] == 100.0
    assert table["image_to_text"]["R@10"] == 100.0  # 8 captions: clamped to 8


def test_protocol_without_evaluate_is_one_line(capsys):
    import search

    assert search.main(["--protocol", "person", "--build-index"]) == 2
    assert capsys.readouterr().err == "error: --protocol person chooses the --evaluate table; add --evaluate\n"


@pytest.mark.slow
def test_zero_shot_paper_table_of_a_keras_hub_preset_in_one_line(keras_hub_presets, demo_data, tmp_path, capsys,
                                                                   monkeypatch):
    import json

    import search
    from dualenc.retrieval import attributes

    monkeypatch.chdir(tmp_path)
    # No attribute report, which a demo pack adds (test_keras_hub checks a preset's): it is no
    # paper table, and drawing its 500 people and loading both encoders again cost most of this test.
    monkeypatch.setattr(attributes, "run_attribute_report", lambda run_dir, data_dir: None)
    preset = str(keras_hub_presets["clip"])
    command = ["--evaluate", "--model", preset, "--data", str(demo_data), "--split", "test"]
    assert search.main(command) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # Identities shared by several images: the person table, R@1/5/10, mAP, mINP.
    assert lines[1].startswith("person protocol (CUHK-PEDES")
    assert lines[3].split() == ["R@1", "R@5", "R@10", "mAP", "mINP"]
    # Named, the image-text table: each caption's own image, RSUM.
    assert search.main([*command, "--protocol", "image-text", "--json"]) == 0
    named = json.loads(capsys.readouterr().out)
    paper = named["paper"]
    assert named["protocol"] == "image-text" and named["split"] == "test"
    assert list(paper) == ["text_to_image", "image_to_text", "RSUM"]
    assert paper["RSUM"] == pytest.approx(sum(paper["text_to_image"].values()) + sum(paper["image_to_text"].values()))
    # The person table's R@k and mAP are the full table's text→image columns (same labels).
    person_row = lines[4].split()
    assert person_row[:4] == [f"{value:.2f}" for value in named["text_to_image"].values()]
    assert 0 < float(person_row[4]) <= 100
