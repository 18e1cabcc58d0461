"""Preprocessors: raw inputs (encoded image bytes, caption strings) → the numbers the towers take.

As in keras-hub, strings and image bytes never enter the Keras model. A preprocessor runs in the
`tf.data` pipeline while training and evaluating, and is composed in front of the model inside
each exported serving endpoint (`dualenc.export.encoders`), so both see exactly the same numbers:

- images: `decode_image` (the one shared decoder) → uint8 pixels ``[H, W, 3]``;
- captions, per text tower (`build_text_preprocessor`):
  - ``bilstm``: `WordPieceTokenizer`, strings ``[B]`` → token ids int32 ``[B, max_tokens]``;
  - ``bert``: `HubBertPreprocessor`, the TF-Hub preprocessor SavedModel, strings ``[B]`` →
    ``dict(input_word_ids, input_mask, input_type_ids)``, each int32 ``[B, S]``.
  - keras-hub presets (``clip``, ``siglip``, ``bert`` with a preset): `KerasHubTextPreprocessor`,
    the preset's own tokenizer and packer, strings ``[B]`` → token ids int32 ``[B, S]`` (BERT:
    ``dict(token_ids, segment_ids, padding_mask)``). Their ops are TensorFlow and TF Text ops,
    so an exported text encoder loads without keras-hub.

Text preprocessors are `tf.Module`s, so an exporter can track their lookup tables.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_text as tf_text

from dualenc.models import hub
from dualenc.core.config import TextConfig
from dualenc.core.errors import DualEncError, first_line
from dualenc.models.keras_hub_presets import keras_hub_preset
from dualenc.models.vocabulary import END, START, UNK, read_vocabulary

HUB_CALL_ENDPOINT = "__call__"
BERT_INPUTS = ("input_word_ids", "input_mask", "input_type_ids")


class WordPieceTokenizer(tf.Module):
    """Captions ``[B]`` string → token ids ``[B, max_tokens]`` int32, 0-padded.

    Lower-cases, splits like BERT, looks words up as WordPiece tokens in `tokens` (a vocabulary
    from `dualenc.models.vocabulary`), keeps the first ``max_tokens - 2`` pieces and wraps them in
    ``[START] … [END]`` — so even an empty caption has two tokens and the LSTM never sees an
    all-masked row. Unknown words become ``[UNK]``; ids are < ``len(tokens) + 1`` (the last one
    is the lookup table's out-of-vocabulary bucket, which BertTokenizer never emits).
    """

    def __init__(self, tokens: list[str], max_tokens: int):
        super().__init__(name="wordpiece_tokenizer")
        if max_tokens < 3:
            raise DualEncError(f"max_tokens must be >= 3 ([START], one token, [END]), got {max_tokens}")
        if START not in tokens or END not in tokens:
            raise DualEncError(f"the vocabulary lacks {START} or {END}; learn it with dualenc.models.vocabulary")
        self.max_tokens = int(max_tokens)
        self.vocab_size = len(tokens)
        self.start_id = tokens.index(START)
        self.end_id = tokens.index(END)
        # Built from the tokens (not the file), so an export carries its own copy of the table.
        initializer = tf.lookup.KeyValueTensorInitializer(tf.constant(tokens), tf.range(len(tokens), dtype=tf.int64))
        self.table = tf.lookup.StaticVocabularyTable(initializer, num_oov_buckets=1)
        self.tokenizer = tf_text.BertTokenizer(self.table, lower_case=True, unknown_token=UNK, token_out_type=tf.int64)

    def __call__(self, captions: tf.Tensor) -> tf.Tensor:
        # [B, words, pieces] → [B, pieces]
        pieces = self.tokenizer.tokenize(tf.reshape(captions, [-1])).merge_dims(-2, -1)
        pieces = pieces[:, : self.max_tokens - 2]
        batch = pieces.nrows()
        starts = tf.fill([batch, 1], tf.constant(self.start_id, tf.int64))
        ends = tf.fill([batch, 1], tf.constant(self.end_id, tf.int64))
        tokens = tf.concat([starts, pieces, ends], axis=1)
        return tf.cast(tokens.to_tensor(default_value=0, shape=[None, self.max_tokens]), tf.int32)


class HubBertPreprocessor(tf.Module):
    """A TF-Hub BERT preprocessor SavedModel: captions ``[B]`` → the encoder's three id tensors.

    `handle` is a TF-Hub URL or a local SavedModel directory (`dualenc.models.hub.resolve_handle`).
    Only the three inputs a BERT encoder takes are kept.
    """

    def __init__(self, handle: str):
        super().__init__(name="bert_preprocessor")
        self.handle = handle
        self.saved_model = tf.saved_model.load(hub.resolve_handle(handle))

    def __call__(self, captions: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = self.saved_model(tf.reshape(captions, [-1]))
        return {name: tf.cast(outputs[name], tf.int32) for name in BERT_INPUTS}


# keras-hub preprocessor class of each text family; CLIP and SigLIP ones also hold an image
# converter, which is left out (images are decoded and resized by `dualenc.data.images`).
KERAS_HUB_PREPROCESSORS = {"clip": "CLIPPreprocessor", "siglip": "SigLIPPreprocessor", "bert": "BertTextClassifierPreprocessor"}
KERAS_HUB_BERT_INPUTS = ("token_ids", "segment_ids", "padding_mask")


class KerasHubTextPreprocessor(tf.Module):
    """A keras-hub preset's text preprocessing: captions ``[B]`` → what its text encoder takes.

    CLIP (lower-casing, byte-pair tokenizer, start/end tokens, 0-padding) and SigLIP
    (canonicalised text, SentencePiece, end token, padding) give token ids int32 ``[B, S]``;
    BERT gives ``dict(token_ids, segment_ids, padding_mask)``, each int32 ``[B, S]``. S is the
    preset's `sequence_length` (77 for CLIP, 64 for SigLIP). `preset` is a keras-hub handle or
    a local preset directory; `family` is "clip", "siglip" or "bert".
    """

    def __init__(self, preset: str, family: str):
        super().__init__(name=f"{family}_preprocessor")
        import keras_hub

        self.family = family
        preprocessor_class = getattr(keras_hub.models, KERAS_HUB_PREPROCESSORS[family])
        options = {} if family == "bert" else {"image_converter": None}
        try:
            self.preprocessor = preprocessor_class.from_preset(keras_hub_preset(preset), **options)
        except Exception as exc:  # a preset without (usable) tokenizer assets
            raise DualEncError(f"--text-preset {preset} has no usable {family} tokenizer ({first_line(exc)[:200]})") from None
        self.sequence_length = int(self.preprocessor.sequence_length)

    def __call__(self, captions: tf.Tensor) -> tf.Tensor | dict[str, tf.Tensor]:
        captions = tf.reshape(captions, [-1])
        if self.family == "bert":
            outputs = self.preprocessor(captions)
            return {name: tf.cast(outputs[name], tf.int32) for name in KERAS_HUB_BERT_INPUTS}
        return tf.cast(self.preprocessor({"prompts": captions, "images": None})["token_ids"], tf.int32)


def build_text_preprocessor(config: TextConfig) -> WordPieceTokenizer | HubBertPreprocessor | KerasHubTextPreprocessor:
    """The preprocessor that turns captions into the inputs of `config`'s text tower."""
    if config.preset is not None:
        return KerasHubTextPreprocessor(config.preset, config.tower)
    if config.tower == "bert":
        return HubBertPreprocessor(config.preprocessor)
    if config.vocabulary is None:
        raise DualEncError("text tower 'bilstm' needs a vocabulary file (TextConfig.vocabulary); learn one first")
    tokens = read_vocabulary(config.vocabulary)
    if len(tokens) > config.vocab_size:
        raise DualEncError(
            f"vocabulary file {config.vocabulary} has {len(tokens)} tokens but text.vocab_size is "
            f"{config.vocab_size}; raise vocab_size or learn a smaller vocabulary"
        )
    return WordPieceTokenizer(tokens, config.max_tokens)


def dummy_tokens(config: TextConfig, batch: int = 2) -> tf.Tensor | dict[str, tf.Tensor]:
    """All-padding token inputs for `batch` captions (with [CLS]/[START]-like first ids of 1),
    used to build the text tower before any data is read."""
    # keras-hub towers take their preset's full sequence length (SigLIP's position ids are fixed).
    length = config.max_tokens if config.tower == "bilstm" or config.preset is not None else 8
    ids = tf.concat([tf.ones([batch, 2], tf.int32), tf.zeros([batch, length - 2], tf.int32)], axis=1)
    if config.preset is not None:
        if config.tower == "bert":
            return {"token_ids": ids, "segment_ids": tf.zeros_like(ids), "padding_mask": tf.cast(ids > 0, tf.int32)}
        return ids
    if config.tower == "bert":
        return {"input_word_ids": ids, "input_mask": tf.cast(ids > 0, tf.int32), "input_type_ids": tf.zeros_like(ids)}
    return ids
