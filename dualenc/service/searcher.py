"""A run's two encoders and a gallery's index, loaded once and searched from many threads.

Text and image queries each go through their encoder's `EmbeddingBatcher`; ranking is the
same `dualenc.retrieval.knn` call `search.py` makes, on the index loaded at start (an approximate
index too, when ``ann`` asks for one), and answers are built by `dualenc.retrieval.query.result_dicts`,
so the service and ``search.py --json`` answer a query alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from dualenc.retrieval import knn
from dualenc.core.errors import DualEncError
from dualenc.export.encoders import TEXT_ENCODER_DIR, VISION_ENCODER_DIR, load_encoder
from dualenc.retrieval.index import GalleryIndex
from dualenc.retrieval.query import result_dicts
from dualenc.service.batching import EmbeddingBatcher


class Searcher:
    """Thread-safe text → image and image → image search over one index."""

    def __init__(self, run_dir: Path, index: GalleryIndex, ann: str = "auto"):
        self.index = index
        self.kind = knn.resolve_ann(ann, len(index))
        self._ann = index.ann_index(self.kind) if self.kind != "exact" else None
        self._text = EmbeddingBatcher(load_encoder(Path(run_dir) / TEXT_ENCODER_DIR))
        self._vision = EmbeddingBatcher(load_encoder(Path(run_dir) / VISION_ENCODER_DIR))

    def search_text(self, query: str, k: int) -> list[dict]:
        """The top `k` images for a checked query (see `dualenc.retrieval.query.check_query`)."""
        return self._top_k(self._text.embed(query), k)

    def search_image(self, image_bytes: bytes, k: int) -> list[dict]:
        """The top `k` images for an encoded query image; `DualEncError` if the model cannot decode it."""
        try:
            embedding = self._vision.embed(image_bytes)
        except tf.errors.OpError:
            raise DualEncError("the model cannot decode this image; upload a JPEG, PNG, BMP or GIF file") from None
        return self._top_k(embedding, k)

    def _top_k(self, embedding: np.ndarray, k: int) -> list[dict]:
        if self._ann is None:
            scores, rows = knn.exact_search(embedding[None, :], self.index.embeddings, k)
        else:
            scores, rows = knn.ann_search(self._ann, embedding[None, :], k)
        return result_dicts(self.index, scores[0], rows[0])

    def close(self) -> None:
        """Stop the encoders' worker threads after the queries already queued."""
        self._text.close()
        self._vision.close()
