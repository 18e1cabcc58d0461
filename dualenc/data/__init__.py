"""Data: the packed-split format (records, manifest, reader), the one image canonicaliser and
decoder, and the one training input pipeline. Depends on `dualenc.core` only."""
