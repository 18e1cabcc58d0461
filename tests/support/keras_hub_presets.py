"""Tiny random-weight CLIP and SigLIP presets, written with keras-hub's own `save_to_preset`.

They stand in for `clip_vit_base_patch16` and friends offline: same classes, same preset
layout (config.json, model.weights.h5, tokenizer, preprocessor, image converter), a few
thousand parameters. The CLIP tokenizer's vocabulary holds every character the demo captions
use (and each word of `WORDS` merged whole); the SigLIP SentencePiece model is trained on the
same characters.
"""

from __future__ import annotations

import io
import string
from pathlib import Path

IMAGE_SIZE = (32, 32)
SEQUENCE_LENGTH = 16
WORDS = ("a", "man", "woman", "in", "red", "blue", "coat", "with", "the", "and", "black", "white")
# Characters every caption may hold: letters, digits, common punctuation.
CHARACTERS = string.ascii_lowercase + string.digits + ".,;:!?'\"-()/&"


def _clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """A byte-pair vocabulary: every character (alone and word-final) plus whole `WORDS`."""
    tokens = []
    for character in CHARACTERS:
        tokens += [character, character + "</w>"]
    merges = []
    for word in WORDS:
        merged = word[0]
        for position, character in enumerate(word[1:], start=1):
            piece = character + ("</w>" if position == len(word) - 1 else "")
            if f"{merged} {piece}" not in merges:
                merges.append(f"{merged} {piece}")
            merged += piece
            if merged not in tokens:
                tokens.append(merged)
    # CLIP pools the text at the highest token id, which must be the end token.
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def make_clip_preset(directory: Path, projection_dim: int = 8) -> Path:
    import keras
    import keras_hub

    keras.utils.set_random_seed(1)
    vocabulary, merges = _clip_vocabulary()
    tokenizer = keras_hub.models.CLIPTokenizer(vocabulary=vocabulary, merges=merges)
    vision = keras_hub.models.CLIPVisionEncoder(
        patch_size=8, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32, image_shape=(*IMAGE_SIZE, 3)
    )
    text = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=len(vocabulary), embedding_dim=16, hidden_dim=16, num_layers=1, num_heads=2,
        intermediate_dim=32, max_sequence_length=SEQUENCE_LENGTH,
    )
    backbone = keras_hub.models.CLIPBackbone(vision, text, projection_dim=projection_dim)
    # CLIP's ImageNet statistics, as the published presets' converters hold them.
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    converter = keras_hub.layers.CLIPImageConverter(
        image_size=IMAGE_SIZE, scale=[1 / (255 * s) for s in std], offset=[-m / s for m, s in zip(mean, std)]
    )
    preprocessor = keras_hub.models.CLIPPreprocessor(tokenizer, converter, sequence_length=SEQUENCE_LENGTH)
    backbone.save_to_preset(str(directory))
    preprocessor.save_to_preset(str(directory))
    return directory


def make_siglip_preset(directory: Path) -> Path:
    import keras
    import keras_hub
    import sentencepiece

    keras.utils.set_random_seed(2)
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(WORDS), CHARACTERS, *WORDS]),
        model_writer=proto,
        model_type="char",
        vocab_size=len(set(CHARACTERS + "".join(WORDS))) + 4,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=3,
    )
    tokenizer = keras_hub.models.SigLIPTokenizer(proto=proto.getvalue())
    vision = keras_hub.models.SigLIPVisionEncoder(
        patch_size=8, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32, image_shape=(*IMAGE_SIZE, 3)
    )
    text = keras_hub.models.SigLIPTextEncoder(
        vocabulary_size=tokenizer.vocabulary_size(), embedding_dim=16, hidden_dim=16, num_layers=1, num_heads=2,
        intermediate_dim=32, max_sequence_length=SEQUENCE_LENGTH,
    )
    backbone = keras_hub.models.SigLIPBackbone(vision, text)
    converter = keras_hub.layers.SigLIPImageConverter(image_size=IMAGE_SIZE, scale=1 / 127.5, offset=-1.0)
    preprocessor = keras_hub.models.SigLIPPreprocessor(tokenizer, converter, sequence_length=SEQUENCE_LENGTH)
    backbone.save_to_preset(str(directory))
    preprocessor.save_to_preset(str(directory))
    return directory


def make_bert_preset(directory: Path) -> Path:
    """A tiny keras-hub BERT (text only): WordPiece over `WORDS` and single characters."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(3)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *CHARACTERS, *(f"##{c}" for c in CHARACTERS)]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=list(dict.fromkeys(vocabulary)))
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=SEQUENCE_LENGTH,
    )
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=SEQUENCE_LENGTH)
    backbone.save_to_preset(str(directory))
    preprocessor.save_to_preset(str(directory))
    return directory
