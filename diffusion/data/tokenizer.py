"""Text side of the data: any Hugging Face tokenizer, and a small BPE trained on the captions.

`load_tokenizer` goes through `transformers.AutoTokenizer`, so a user with hub access can name
`openai/clip-vit-base-patch32` (a directory holding a plain `tokenizer.json` skips the auto
machinery and loads straight into the class it names); `train_caption_tokenizer` trains a
CLIP-like byte-level BPE offline with `tokenizers` and saves it as a directory that
`AutoTokenizer` loads. `tokenize` turns texts into fixed-length int32 ids plus a mask, keeping
the end token on truncation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import transformers
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from diffusion.errors import UserError

# CLIP's special tokens (openai/CLIP simple_tokenizer.py). As in HF's CLIP tokenizer, the end
# token doubles as the pad token: the mask, not the id, tells padding from text.
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 1024


# Tokenizer classes that are just a `tokenizer.json` (what `train_caption_tokenizer` saves).
# AutoTokenizer resolves such a directory to the same class, but first imports transformers'
# configuration machinery and through it torch, where installed: 3-4 s per process here.
_PLAIN_FAST_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _is_plain_fast_tokenizer_dir(path: str) -> bool:
    config_path = os.path.join(path, "tokenizer_config.json")
    if not (os.path.isfile(config_path) and os.path.isfile(os.path.join(path, "tokenizer.json"))):
        return False
    try:
        with open(config_path) as f:
            tokenizer_class = json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        return False  # AutoTokenizer reports what is wrong with it
    return tokenizer_class in _PLAIN_FAST_TOKENIZER_CLASSES


def load_tokenizer(path_or_name: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """Any tokenizer `transformers.AutoTokenizer` can load: a local directory or a hub name."""
    path = os.fspath(path_or_name)
    try:
        if _is_plain_fast_tokenizer_dir(path):
            return transformers.PreTrainedTokenizerFast.from_pretrained(path)
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(
            f"Cannot load a tokenizer from {path!r}: give a directory saved by "
            "train_caption_tokenizer / save_pretrained, or a Hugging Face hub name such as "
            f"'openai/clip-vit-base-patch32' (needs hub access). Cause: {error}"
        ) from error


def vocabulary_digest(tokenizer: transformers.PreTrainedTokenizerBase) -> str:
    """A SHA-256 of the tokenizer's vocabulary (token -> id): tells two tokenizers apart without
    the files of either, e.g. the one a dataset's cached text features were made with."""
    vocabulary = json.dumps(tokenizer.get_vocab(), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(vocabulary.encode("utf-8")).hexdigest()


def _byte_level_bpe() -> Tokenizer:
    """An untrained CLIP-like BPE: lowercased, whitespace collapsed, byte-level so that any
    character (emoji, CJK) maps to byte tokens instead of an unknown token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    # Undo the prefix space on decoding, so decode(encode(text)) gives back the normalised text.
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    return tokenizer


def train_caption_tokenizer(
    captions: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    model_max_length: int = 77,
) -> transformers.PreTrainedTokenizerBase:
    """Trains a byte-level BPE on `captions`, saves it to `out_dir` and returns it loaded back
    through `load_tokenizer` (so what callers use is exactly what a later run will load).

    Every text is wrapped as `<|startoftext|> ... <|endoftext|>` like CLIP. The vocabulary stops
    growing before `vocab_size` once no pair of tokens occurs twice.
    """
    minimum = 256 + 2  # the byte alphabet plus the two special tokens
    if vocab_size < minimum:
        raise UserError(f"vocab_size must be >= {minimum} (bytes + specials), got {vocab_size}")
    tokenizer = _byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[START_TOKEN, END_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
    start_id, end_id = tokenizer.token_to_id(START_TOKEN), tokenizer.token_to_id(END_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{START_TOKEN} $A {END_TOKEN}",
        pair=f"{START_TOKEN} $A {END_TOKEN} $B:1 {END_TOKEN}:1",
        special_tokens=[(START_TOKEN, start_id), (END_TOKEN, end_id)],
    )
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=START_TOKEN,
        eos_token=END_TOKEN,
        pad_token=END_TOKEN,
        unk_token=END_TOKEN,
        model_max_length=model_max_length,
    )
    save_tokenizer(wrapped, out_dir)
    return load_tokenizer(out_dir)


def save_tokenizer(tokenizer: transformers.PreTrainedTokenizerBase, directory) -> str:
    """`tokenizer.save_pretrained(directory)`, creating the directory first.

    Raises the OSError (with the path) of a directory that cannot be made or written: a file in
    its place (which save_pretrained would only log, leaving nothing saved), permissions, a full
    disk. The entry points report it as one paragraph naming the path.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return directory


def _pad_id(tokenizer: transformers.PreTrainedTokenizerBase) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def longest_caption(
    tokenizer: transformers.PreTrainedTokenizerBase, captions: Iterable[str], context_length: int
) -> tuple[int, int, int]:
    """(tokens of the longest caption, start and end tokens included; distinct captions; how
    many of them `tokenize` would cut at `context_length`)."""
    distinct = sorted(set(captions))
    lengths = [len(ids) for ids in _encode_with_special_tokens(tokenizer, distinct)]
    return max(lengths, default=0), len(distinct), sum(n > context_length for n in lengths)


def _encode_with_special_tokens(
    tokenizer: transformers.PreTrainedTokenizerBase, texts: list[str]
) -> list[list[int]]:
    """Token ids of each text, untruncated and unpadded."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is None:
        return tokenizer(
            texts, add_special_tokens=True, truncation=False, padding=False, verbose=False
        )["input_ids"]
    # The Rust tokenizer directly: 5x faster than the transformers wrapper, which builds
    # offsets and Python dicts we do not use. Like the wrapper, switch off any truncation or
    # padding stored in tokenizer.json first.
    backend.no_truncation()
    backend.no_padding()
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=True)]


def tokenize(
    tokenizer: transformers.PreTrainedTokenizerBase, texts: Sequence[str], context_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids int32 (B, L), mask int32 (B, L)), L = context_length, special tokens added.

    A text longer than L keeps its first L - 1 tokens and its end token (when the tokenizer
    appends one), so the end token, which CLIP pools, is never cut off. Padding uses the pad
    token (else the end token) with mask 0.
    """
    if context_length < 2:
        raise UserError(f"context_length must be >= 2 (start + end), got {context_length}")
    if isinstance(texts, str):
        texts = [texts]
    encoded = _encode_with_special_tokens(tokenizer, list(texts))
    end_id = tokenizer.eos_token_id
    ids = np.full((len(encoded), context_length), _pad_id(tokenizer), np.int32)
    mask = np.zeros((len(encoded), context_length), np.int32)
    for row, sequence in enumerate(encoded):
        if len(sequence) > context_length:
            keep_end = end_id is not None and sequence[-1] == end_id
            sequence = (
                sequence[: context_length - 1] + [end_id] if keep_end else sequence[:context_length]
            )
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask
