"""Retrieval: galleries and their indexes (exact, HNSW, IVF, compressed), the one ranking rule,
search results, metrics and evaluation. Depends on `dualenc.export`, never on training."""
