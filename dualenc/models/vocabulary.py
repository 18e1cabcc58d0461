"""WordPiece vocabularies for the BiLSTM text tower: learned from captions, one token a line.

The vocabulary is learned with tensorflow-text's BERT vocabulary learner (BERT's lower-casing
and punctuation splitting, then greedy WordPiece), so `tensorflow_text.BertTokenizer` with
``lower_case=True`` splits text exactly as the learner did. Reserved tokens come first, so
``[PAD]`` is id 0 and doubles as the Embedding mask value.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dualenc.core.errors import DualEncError
from dualenc.core.files import write_text_atomic

PAD, UNK, START, END = "[PAD]", "[UNK]", "[START]", "[END]"
RESERVED_TOKENS = (PAD, UNK, START, END)

# Captions per batch fed to the learner: it counts words batch by batch.
_LEARNER_BATCH = 1024


def learn_wordpiece_vocabulary(captions: Iterable[str], vocab_size: int, path: str | Path) -> Path:
    """Learn a lower-cased WordPiece vocabulary of at most `vocab_size` tokens; write it to `path`.

    The file holds one token a line, reserved tokens (``[PAD] [UNK] [START] [END]``) first. It
    is written under a temporary name and renamed, so a crash never leaves half a vocabulary.
    Returns `path`.
    """
    import tensorflow as tf
    from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset

    captions = [caption for caption in captions if caption.strip()]
    if not captions:
        raise DualEncError(f"no non-empty captions to learn a vocabulary for {path} from")
    if vocab_size <= len(RESERVED_TOKENS):
        raise DualEncError(f"vocab_size must exceed the {len(RESERVED_TOKENS)} reserved tokens, got {vocab_size}")
    dataset = tf.data.Dataset.from_tensor_slices(captions).batch(_LEARNER_BATCH)
    tokens = bert_vocab_from_dataset.bert_vocab_from_dataset(
        dataset,
        vocab_size=vocab_size,
        reserved_tokens=list(RESERVED_TOKENS),
        bert_tokenizer_params={"lower_case": True},
    )
    return write_text_atomic(path, "".join(token + "\n" for token in tokens))


def read_vocabulary(path: str | Path) -> list[str]:
    """The tokens of a vocabulary file in id order; checks ``[PAD]`` is id 0 and ``[UNK]`` exists."""
    path = Path(path)
    try:
        tokens = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DualEncError(
            f"vocabulary file {path} does not exist; learn one with learn_wordpiece_vocabulary"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DualEncError(f"cannot read vocabulary file {path} ({exc})") from None
    if not tokens or tokens[0] != PAD or UNK not in tokens:
        raise DualEncError(f"vocabulary file {path} must list {PAD} first and contain {UNK}, one token a line")
    if len(set(tokens)) != len(tokens):
        raise DualEncError(f"vocabulary file {path} lists a token twice")
    return tokens
