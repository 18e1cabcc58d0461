"""The text tower: raw captions ``[B]`` tf.string → features ``[B, F]`` float32.

Tokenisation happens inside the graph, so training, indexing and an exported query model all
take plain strings. Two towers:

- ``bert`` (seed 003): a TF-Hub BERT preprocessor and encoder, each a SavedModel loaded as a
  `keras.layers.TFSMLayer` on its ``__call__`` endpoint — the Reusable SavedModel API both
  TF-Hub's BERTs and `tests/support/tiny_bert.py` implement. (An encoder's ``serving_default``
  signature takes the three id tensors as keyword arguments, which TFSMLayer cannot pass, and
  has no ``training`` switch.)
  Features are the encoder's ``pooled_output``, F = the encoder's hidden size.
- ``bilstm`` (seed 000): WordPiece tokens from a learned vocabulary → Embedding → BiLSTM; the
  features are the final forward and backward states, F = 2 × lstm_units.
"""

from __future__ import annotations

import re

import keras
import tensorflow as tf
import tensorflow_text as tf_text

from dualenc import hub
from dualenc.config import TEXT_TOWERS, TextConfig
from dualenc.errors import DualEncError
from dualenc.vocabulary import END, START, UNK, read_vocabulary

HUB_CALL_ENDPOINT = "__call__"


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

    def _add_existing_weight(self, weight):
        # TFSMLayer keeps the ":0" of a SavedModel variable's name, which optimizers reject when
        # they name their slots after it (Adam: "… is not a valid scope name"). The Keras
        # variable wraps the SavedModel's own variable, so updates reach the encoder.
        variable = keras.Variable(
            initializer=weight,
            trainable=weight.trainable,
            dtype=weight.dtype,
            shape=weight.shape,
            name=re.sub(r"[^A-Za-z0-9_.-]", "_", weight.name.removesuffix(":0")),
        )
        self._track_variable(variable)

    def call(self, inputs, training=False):
        outputs = self.call_endpoint_fn(inputs, training=bool(training) and self.trainable)
        return outputs["pooled_output"]

    def get_config(self) -> dict:
        base = keras.layers.Layer.get_config(self)
        return {"filepath": self.filepath, "trainable": base["trainable"], "name": base["name"], "dtype": base["dtype"]}


def _build_bert_tower(config: TextConfig) -> keras.Model:
    preprocessor = keras.layers.TFSMLayer(
        hub.resolve_handle(config.preprocessor),
        call_endpoint=HUB_CALL_ENDPOINT,
        trainable=False,
        name="bert_preprocessor",
    )
    encoder = HubBertEncoder(hub.resolve_handle(config.encoder), trainable=config.trainable, name="bert_encoder")
    captions = keras.Input(shape=(), dtype="string", name="captions")
    features = encoder(preprocessor(captions))
    return keras.Model(captions, features, name="text_bert")


@keras.saving.register_keras_serializable(package="dualenc")
class CaptionTokenizer(keras.layers.Layer):
    """Captions ``[B]`` string → token ids ``[B, max_tokens]`` int32, 0-padded.

    Lower-cases, splits like BERT, looks words up as WordPiece tokens in `vocabulary` (a file
    from `dualenc.vocabulary.learn_wordpiece_vocabulary`), keeps the first ``max_tokens - 2``
    tokens and wraps them in ``[START] … [END]`` — so even an empty caption has two tokens and
    the LSTM never sees an all-masked row. Unknown words become ``[UNK]``.
    """

    def __init__(self, vocabulary: str, max_tokens: int, **kwargs):
        super().__init__(**kwargs)
        if max_tokens < 3:
            raise ValueError(f"max_tokens must be >= 3 ([START], one token, [END]), got {max_tokens}")
        self.vocabulary = str(vocabulary)
        self.max_tokens = int(max_tokens)
        tokens = read_vocabulary(self.vocabulary)
        self.vocab_size = len(tokens)
        if START not in tokens or END not in tokens:
            raise DualEncError(f"vocabulary file {self.vocabulary} lacks {START} or {END}")
        self.start_id = tokens.index(START)
        self.end_id = tokens.index(END)
        # The table is built from the tokens (not the file), so an exported SavedModel carries
        # its own copy and does not depend on the file staying where it was.
        initializer = tf.lookup.KeyValueTensorInitializer(
            tf.constant(tokens), tf.range(len(tokens), dtype=tf.int64)
        )
        self.table = tf.lookup.StaticVocabularyTable(initializer, num_oov_buckets=1)
        self.tokenizer = tf_text.BertTokenizer(
            self.table, lower_case=True, unknown_token=UNK, token_out_type=tf.int64
        )

    def call(self, captions):
        # [B, words, pieces] → [B, tokens]
        pieces = self.tokenizer.tokenize(tf.reshape(captions, [-1])).merge_dims(-2, -1)
        pieces = pieces[:, : self.max_tokens - 2]
        batch = pieces.nrows()
        starts = tf.fill([batch, 1], tf.constant(self.start_id, tf.int64))
        ends = tf.fill([batch, 1], tf.constant(self.end_id, tf.int64))
        tokens = tf.concat([starts, pieces, ends], axis=1)
        return tf.cast(tokens.to_tensor(default_value=0, shape=[None, self.max_tokens]), tf.int32)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.max_tokens)

    def get_config(self) -> dict:
        return {**super().get_config(), "vocabulary": self.vocabulary, "max_tokens": self.max_tokens}


def _build_bilstm_tower(config: TextConfig) -> keras.Model:
    if config.vocabulary is None:
        raise DualEncError("text tower 'bilstm' needs a vocabulary file (TextConfig.vocabulary); learn one first")
    tokenizer = CaptionTokenizer(config.vocabulary, config.max_tokens, name="wordpiece")
    captions = keras.Input(shape=(), dtype="string", name="captions")
    token_ids = tokenizer(captions)
    # +1: StaticVocabularyTable's out-of-vocabulary bucket id (BertTokenizer maps misses to [UNK]).
    embeddings = keras.layers.Embedding(
        tokenizer.vocab_size + 1, config.embedding_dim, mask_zero=True, name="embedding"
    )(token_ids)
    # Final forward and backward states: the mask makes each direction stop at the caption's end.
    features = keras.layers.Bidirectional(keras.layers.LSTM(config.lstm_units), name="bilstm", dtype="float32")(
        embeddings
    )
    return keras.Model(captions, features, name="text_bilstm")


def build_text_tower(config: TextConfig) -> keras.Model:
    """Build the text tower: captions ``[B]`` tf.string → ``[B, F]`` float32 features.

    ``bert``: F = the encoder's hidden size (512 for small BERT L-4 H-512); handles are TF-Hub
    URLs or local SavedModel directories, see `dualenc.hub.resolve_handle`. ``bilstm``:
    F = 2 × ``config.lstm_units``; needs ``config.vocabulary``.
    """
    if config.tower == "bert":
        return _build_bert_tower(config)
    if config.tower == "bilstm":
        return _build_bilstm_tower(config)
    raise DualEncError(f"unknown text tower {config.tower!r}; choose one of: {', '.join(TEXT_TOWERS)}")
