"""The text tower: token ids from a text preprocessor (`dualenc.models.preprocessing`) → features ``[B, F]``.

Captions are tokenised outside the model (in `tf.data`, and in front of the exported text
encoder), so the tower takes numbers only. Two towers:

- ``bert`` (seed 003): a TF-Hub BERT encoder SavedModel loaded as a `keras.layers.TFSMLayer` on
  its ``__call__`` endpoint — the Reusable SavedModel API both TF-Hub's BERTs and the tests'
  tiny BERT fixture implement (``serving_default`` takes the id tensors as keyword arguments,
  which TFSMLayer cannot pass, and has no ``training`` switch). Input: the preprocessor's
  ``dict(input_word_ids, input_mask, input_type_ids)``; features: ``pooled_output``, F = the
  encoder's hidden size.
- ``bilstm`` (seed 000): WordPiece ids ``[B, max_tokens]`` → Embedding → BiLSTM; the features
  are the final forward and backward states, F = 2 × lstm_units.
"""

from __future__ import annotations

import keras

from dualenc.models import hub
from dualenc.core.config import TEXT_TOWERS, TextConfig
from dualenc.core.errors import DualEncError
from dualenc.models.preprocessing import BERT_INPUTS, HUB_CALL_ENDPOINT


@keras.saving.register_keras_serializable(package="dualenc")
class HubBertEncoder(keras.layers.TFSMLayer):
    """A TF-Hub BERT encoder SavedModel: ``dict(input_word_ids, input_mask, input_type_ids)``
    (int32 ``[B, S]``) → ``pooled_output`` ``[B, H]``.

    Unlike a plain `TFSMLayer` it forwards ``training`` to the encoder, so a fine-tuned
    encoder applies its dropout while training; a frozen one always runs in inference mode.
    The encoder's variables are this layer's weights: trainable exactly when the layer is.
    """

    def __init__(self, filepath: str, trainable: bool = True, name: str | None = None, dtype=None):
        super().__init__(filepath, call_endpoint=HUB_CALL_ENDPOINT, trainable=trainable, name=name, dtype=dtype)

    def call(self, inputs, training=False):
        outputs = self.call_endpoint_fn(inputs, training=bool(training) and self.trainable)
        return outputs["pooled_output"]

    def get_config(self) -> dict:
        base = keras.layers.Layer.get_config(self)
        return {"filepath": self.filepath, "trainable": base["trainable"], "name": base["name"], "dtype": base["dtype"]}


def _build_bert_tower(config: TextConfig) -> keras.Model:
    encoder = HubBertEncoder(hub.resolve_handle(config.encoder), trainable=config.trainable, name="bert_encoder")
    inputs = {name: keras.Input(shape=(None,), dtype="int32", name=name) for name in BERT_INPUTS}
    return keras.Model(inputs, encoder(inputs), name="text_bert")


def _build_bilstm_tower(config: TextConfig) -> keras.Model:
    token_ids = keras.Input(shape=(config.max_tokens,), dtype="int32", name="token_ids")
    # vocab_size bounds the learned vocabulary; +1 for the lookup table's out-of-vocabulary bucket.
    embeddings = keras.layers.Embedding(config.vocab_size + 1, config.embedding_dim, mask_zero=True, name="embedding")(
        token_ids
    )
    # Final forward and backward states: the mask makes each direction stop at the caption's end.
    features = keras.layers.Bidirectional(keras.layers.LSTM(config.lstm_units), name="bilstm", dtype="float32")(
        embeddings
    )
    return keras.Model(token_ids, features, name="text_bilstm")


def build_text_tower(config: TextConfig, projection: str = "heads") -> keras.Model:
    """Build the text tower: token inputs (what `dualenc.models.preprocessing.build_text_preprocessor` returns) → ``[B, F]`` float32.

    ``bert``: F = the encoder's hidden size (512 for small BERT L-4 H-512); the handle is a TF-Hub
    URL or a local SavedModel directory, see `dualenc.models.hub.resolve_handle`. ``bilstm``:
    F = 2 × ``config.lstm_units``. With a keras-hub `config.preset` ("clip", "siglip", or "bert"
    with a preset) the tower is built by `dualenc.models.towers.keras_hub`, which `projection` steers.
    """
    if config.preset is not None:
        from dualenc.models.towers import keras_hub

        return keras_hub.build_text_tower(config, projection)
    if config.tower == "bert":
        return _build_bert_tower(config)
    if config.tower == "bilstm":
        return _build_bilstm_tower(config)
    raise DualEncError(f"unknown text tower {config.tower!r}; choose one of: {', '.join(TEXT_TOWERS)}")
