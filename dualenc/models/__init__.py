"""Models: the towers, projection heads, text preprocessors and the `DualEncoder` Keras model.
Depends on `dualenc.core`, `dualenc.data` and `dualenc.losses`."""
