"""A search query and its answer, as `search.py` and the search service both see them.

One check for query text (the same limits on the command line and over HTTP) and one shape for
an answer: the top-k gallery rows as dicts with the fields in `RESULT_FIELDS`, which
``search.py --json`` prints and ``GET /api/search`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence

from dualenc.core.errors import DualEncError

MAX_QUERY_CHARS = 10_000
RESULT_FIELDS = ("rank", "score", "image_id", "path", "caption", "label")


def check_query(query: str) -> str:
    """The query with its ends stripped, or a `DualEncError` saying what is wrong with it."""
    try:
        query.encode("utf-8")
    except UnicodeEncodeError:
        # Python passes undecodable argv bytes through as lone surrogates (surrogateescape).
        raise DualEncError("the query is not valid UTF-8 text; check your terminal's encoding") from None
    if not query.strip():
        raise DualEncError("the query is empty; describe what to look for, e.g. \"a red car\"")
    if len(query) > MAX_QUERY_CHARS:
        raise DualEncError(f"the query has {len(query)} characters; the limit is {MAX_QUERY_CHARS}")
    return query.strip()


def result_dicts(index, scores: Sequence[float], rows: Sequence[int]) -> list[dict]:
    """One query's top-k as dicts (fields `RESULT_FIELDS`), best first.

    `index` is a `dualenc.retrieval.index.GalleryIndex`; `scores` and `rows` are one row of what its
    `search` returns. `path` is set for folder galleries, `caption` and `label` for packed ones,
    the others are None. A negative row is FAISS's "nothing more found": the results end there,
    so a search that finds fewer than k images answers fewer, never a padding row.
    """
    results = []
    for rank, (score, row) in enumerate(zip(scores, rows), start=1):
        if row < 0:
            break
        results.append({
            "rank": rank,
            "score": round(float(score), 6),
            "image_id": index.image_ids[row],
            "path": index.paths[row] if index.paths is not None else None,
            "caption": index.captions[row] if index.captions is not None else None,
            "label": index.labels[row] if index.labels is not None else None,
        })
    return results
