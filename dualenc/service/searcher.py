"""A `dualenc.api.Retriever` shared by many request threads.

Each encoder sits behind an `EmbeddingBatcher` (queries arriving together run as one batch);
everything else — the image canonicaliser, the choice of exact or approximate search, the
result rows — is the retriever's, so the service and ``search.py --json`` answer alike.
"""

from __future__ import annotations

import tensorflow as tf

from dualenc.api import IMAGE_FORMATS, Retriever
from dualenc.core.errors import DualEncError
from dualenc.service.batching import EmbeddingBatcher


class Searcher:
    """Thread-safe text → image and image → image search through one retriever."""

    def __init__(self, retriever: Retriever, timeout_s: float | None = None):
        self.retriever = retriever
        self.timeout_s = timeout_s  # how long a query waits for its encoder (`TimeoutError` after)
        self.kind = retriever.search_kind
        index = retriever.gallery_index
        if self.kind != "exact":
            index.ann_index(self.kind)  # loaded (or built) once, before the first request
        self._text = EmbeddingBatcher(retriever.text_encoder)
        self._vision = EmbeddingBatcher(retriever.vision_encoder)

    def search_text(self, query: str, k: int) -> list[dict]:
        """The top `k` images for a checked query (see `dualenc.retrieval.query.check_query`)."""
        return self.retriever.search_embedding(self._text.embed(query, self.timeout_s), k)

    def search_image(self, image_bytes: bytes, k: int) -> list[dict]:
        """The top `k` images for a canonical query image (`dualenc.api.query_image`)."""
        try:
            embedding = self._vision.embed(image_bytes, self.timeout_s)
        except tf.errors.OpError:
            raise DualEncError(f"the model cannot decode this image; upload a {IMAGE_FORMATS} file") from None
        return self.retriever.search_embedding(embedding, k)

    def close(self) -> None:
        """Stop the encoders' worker threads after the queries already queued."""
        self._text.close()
        self._vision.close()
