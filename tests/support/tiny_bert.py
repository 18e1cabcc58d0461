"""A tiny BERT pair in TF-Hub format, built in seconds, for tests that cannot download TF Hub.

TF Hub's BERT comes as two SavedModels following the "Reusable SavedModel" text API:

- the preprocessor's ``__call__`` maps a string tensor ``[B]`` to
  ``dict(input_word_ids, input_mask, input_type_ids)``, each int32 ``[B, seq_len]``, laid out
  ``[CLS] tokens… [SEP] 0…`` after lower-casing and WordPiece tokenisation;
- the encoder's ``__call__(inputs, training=False)`` maps that dict to
  ``dict(pooled_output [B, H], sequence_output [B, seq_len, H])``; its variables are real,
  trainable ``tf.Variable`` s.

`make_tiny_bert` writes one of each with the same calling convention, so the loading code runs
unchanged against the fixture and against a downloaded TF-Hub model.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf
import tensorflow_text as tf_text

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SEQ_LENGTH = 16
HIDDEN_SIZE = 8

# Words a caption test might use, plus a few suffix pieces so WordPiece has something to merge.
_WORDS = (
    "a an the man woman person people child boy girl dog cat bird horse car bus bike train "
    "street road park field beach water snow grass tree sky building house room table chair "
    "is are was with without on in at of to from by near under over next and or "
    "red blue green yellow black white brown gray orange pink purple dark light "
    "shirt jacket coat pants jeans shorts skirt dress shoes boots hat bag backpack glasses "
    "wearing holding carrying walking running sitting standing riding looking playing eating "
    "young old small large big long short tall front back left right side top bottom "
    "two three four one his her their its this that some many "
    "photo picture image view group couple pair plate food pizza ball frisbee kite umbrella"
).split()
_SUFFIXES = ["##s", "##ing", "##ed", "##er", "##ly", "##y", "##e", "##a", "##o", "##t"]


def default_vocabulary() -> list[str]:
    """Special tokens, ~200 caption words and a few wordpiece suffixes, in id order."""
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    pieces = ["##" + letter for letter in letters]
    tokens = SPECIAL_TOKENS + list(_WORDS) + _SUFFIXES + letters + pieces + [".", ","]
    return list(dict.fromkeys(tokens))  # single letters repeat some words, e.g. "a"


class _Preprocessor(tf.Module):
    """Strings ``[B]`` → BERT encoder inputs, like ``bert_en_uncased_preprocess``."""

    def __init__(self, vocabulary: list[str]):
        super().__init__()
        token_ids = tf.range(len(vocabulary), dtype=tf.int64)
        initializer = tf.lookup.KeyValueTensorInitializer(tf.constant(vocabulary), token_ids)
        self.table = tf.lookup.StaticVocabularyTable(initializer, num_oov_buckets=1)
        self.tokenizer = tf_text.BertTokenizer(self.table, lower_case=True, token_out_type=tf.int64)
        self.cls_id = vocabulary.index("[CLS]")
        self.sep_id = vocabulary.index("[SEP]")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, sentences: tf.Tensor) -> dict[str, tf.Tensor]:
        # [B, words, pieces] → [B, tokens], leaving room for [CLS] and [SEP].
        tokens = self.tokenizer.tokenize(sentences).merge_dims(-2, -1)
        tokens = tokens[:, : SEQ_LENGTH - 2]
        word_ids, type_ids = tf_text.combine_segments([tokens], self.cls_id, self.sep_id)
        word_ids, mask = tf_text.pad_model_inputs(word_ids, max_seq_length=SEQ_LENGTH)
        type_ids, _ = tf_text.pad_model_inputs(type_ids, max_seq_length=SEQ_LENGTH)
        return {
            "input_word_ids": tf.cast(word_ids, tf.int32),
            "input_mask": tf.cast(mask, tf.int32),
            "input_type_ids": tf.cast(type_ids, tf.int32),
        }


_ENCODER_INPUT_SPEC = {
    name: tf.TensorSpec([None, None], tf.int32, name=name)
    for name in ("input_word_ids", "input_mask", "input_type_ids")
}


class _Encoder(tf.Module):
    """Embeddings → one dense+tanh layer per token → masked mean → dense+tanh pooler.

    ``sequence_output[b, s] = tanh((E[w] + T[t]) · W_seq + b_seq)``, ``[B, S, H]``;
    ``pooled_output = tanh(mean_s∈mask(sequence_output) · W_pool + b_pool)``, ``[B, H]``.
    With ``training=True`` the embeddings go through dropout, as in a real encoder.
    """

    def __init__(self, vocab_size: int, seed: int = 0):
        super().__init__()
        init = tf.random.stateless_normal
        self.word_embeddings = tf.Variable(init([vocab_size, HIDDEN_SIZE], [seed, 1]) * 0.5, name="word_embeddings")
        self.type_embeddings = tf.Variable(init([2, HIDDEN_SIZE], [seed, 2]) * 0.5, name="type_embeddings")
        self.sequence_kernel = tf.Variable(init([HIDDEN_SIZE, HIDDEN_SIZE], [seed, 3]) * 0.5, name="sequence_kernel")
        self.sequence_bias = tf.Variable(tf.zeros([HIDDEN_SIZE]), name="sequence_bias")
        self.pooler_kernel = tf.Variable(init([HIDDEN_SIZE, HIDDEN_SIZE], [seed, 4]) * 0.5, name="pooler_kernel")
        self.pooler_bias = tf.Variable(tf.zeros([HIDDEN_SIZE]), name="pooler_bias")

    @tf.function
    def __call__(self, inputs: dict[str, tf.Tensor], training: bool = False) -> dict[str, tf.Tensor]:
        embeddings = tf.gather(self.word_embeddings, inputs["input_word_ids"]) + tf.gather(
            self.type_embeddings, inputs["input_type_ids"]
        )
        if training:
            embeddings = tf.nn.dropout(embeddings, rate=0.1)
        sequence_output = tf.tanh(tf.einsum("bsh,hk->bsk", embeddings, self.sequence_kernel) + self.sequence_bias)
        mask = tf.cast(inputs["input_mask"], tf.float32)[:, :, tf.newaxis]
        mean = tf.reduce_sum(sequence_output * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        pooled_output = tf.tanh(tf.matmul(mean, self.pooler_kernel) + self.pooler_bias)
        return {"pooled_output": pooled_output, "sequence_output": sequence_output}


def make_tiny_bert(directory: Path, vocab: list[str] | None = None) -> tuple[Path, Path]:
    """Write a tiny TF-Hub-style BERT preprocessor and encoder under `directory`.

    Returns ``(preprocessor_dir, encoder_dir)``; pass them as `TextConfig.preprocessor` and
    `TextConfig.encoder`. `vocab` (special tokens included) defaults to `default_vocabulary()`.
    """
    directory = Path(directory)
    vocabulary = default_vocabulary() if vocab is None else list(vocab)
    missing = [token for token in SPECIAL_TOKENS if token not in vocabulary]
    if missing:
        raise ValueError(f"vocab lacks special tokens {missing}")

    preprocessor = _Preprocessor(vocabulary)
    preprocessor_dir = directory / "preprocessor"
    tf.saved_model.save(preprocessor, str(preprocessor_dir), signatures=preprocessor.__call__.get_concrete_function())

    encoder = _Encoder(len(vocabulary) + 1)  # +1: the out-of-vocabulary bucket
    # Trace both modes so the restored __call__ accepts training=True and training=False.
    for training in (False, True):
        encoder.__call__.get_concrete_function(_ENCODER_INPUT_SPEC, training=training)
    encoder_dir = directory / "encoder"
    serving = encoder.__call__.get_concrete_function(_ENCODER_INPUT_SPEC, training=False)
    tf.saved_model.save(encoder, str(encoder_dir), signatures={"serving_default": serving})
    return preprocessor_dir, encoder_dir
