"""The byte-level BPE tokenizer: training (content-addressed cache), saving, loading, encoding.

Trained tokenizers are cached at ``<cache>/tokenizers/<corpus_id>-<hash>-v<vocab>.json`` (see
:func:`admm_jax.data.assets.cache_dir`), the hash taken over the training documents, so the same
train split never trains twice.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from admm_jax._checks import check_int
from admm_jax._io import atomic_write_text
from admm_jax.data import assets
from admm_jax.data.corpora import Document, check_safe_id, documents_digest

EOS_TOKEN = "<|endoftext|>"
"""End-of-document token; id 0 in tokenizers trained by :func:`train_tokenizer`."""

_SPECIAL_TOKENS = (EOS_TOKEN,)
_BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = _BYTE_ALPHABET_SIZE + len(_SPECIAL_TOKENS) + 1
"""Smallest trainable vocabulary: the 256-byte alphabet, the special tokens and one merge."""

# Bump when the tokenizer recipe changes, to invalidate old caches.
_TOKENIZER_FORMAT = 1


def save_tokenizer(tokenizer: tokenizers.Tokenizer, path: str | os.PathLike) -> Path:
    """Writes ``tokenizer`` as JSON to ``path`` atomically (temporary file, then ``os.replace``)."""
    if not isinstance(tokenizer, tokenizers.Tokenizer):
        raise ValueError(f"tokenizer must be a tokenizers.Tokenizer, "
                         f"got {type(tokenizer).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, tokenizer.to_str())


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """Reads a tokenizer JSON written by :func:`save_tokenizer` (or any ``tokenizer.json``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no tokenizer file at {str(path)!r}")
    return tokenizers.Tokenizer.from_file(str(path))


def _new_tokenizer() -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _cached_tokenizer(path: Path) -> tokenizers.Tokenizer | None:
    """The tokenizer cached at ``path`` if it exists, parses and has :data:`EOS_TOKEN` as id 0."""
    if not path.is_file():
        return None
    try:
        cached = load_tokenizer(path)
    except Exception:  # tokenizers raises a bare Exception on malformed JSON
        cached = None
    if cached is not None and cached.token_to_id(EOS_TOKEN) == 0:
        return cached
    assets.log(f"ignoring unreadable cached tokenizer {path}")
    return None


def _train_bpe(documents: list[Document], vocab_size: int) -> tokenizers.Tokenizer:
    n_chars = sum(len(d.text) for d in documents)
    assets.log(f"training byte-level BPE (vocab {vocab_size}) on {len(documents)} documents "
               f"({n_chars / 1e6:.1f}M chars) ...")
    tokenizer = _new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator((d.text for d in documents), trainer, length=len(documents))
    return tokenizer


def train_tokenizer(documents: Sequence[Document], vocab_size: int, *,
                    cache_dir: str | os.PathLike | None = None,
                    corpus_id: str) -> tokenizers.Tokenizer:
    """Trains (or loads from the cache) a byte-level BPE tokenizer on ``documents``.

    Pass the train split only, so that validation text never shapes the vocabulary. The result has
    :data:`EOS_TOKEN` as id 0, the 256-byte alphabet (any UTF-8 text round-trips exactly through
    ``decode(encode(text))``) and merges up to ``vocab_size`` (fewer if the corpus is too small).
    It is cached at ``<cache>/tokenizers/<corpus_id>-<hash>-v<vocab_size>.json``, the hash taken
    over the documents' names and texts.

    Args:
        documents: training documents (non-empty).
        vocab_size: target vocabulary size, at least :data:`MIN_VOCAB_SIZE`.
        cache_dir: cache root override (see :func:`admm_jax.data.assets.cache_dir`).
        corpus_id: label for the cache file name; letters, digits, ``.``, ``_`` and ``-``.

    Returns:
        The trained (or cached) tokenizer.
    """
    vocab_size = check_int("vocab_size", vocab_size, MIN_VOCAB_SIZE)
    check_safe_id("corpus_id", corpus_id)
    documents = list(documents)
    if not documents:
        raise ValueError("documents must not be empty")
    digest = hashlib.sha256(
        f"bpe-v{_TOKENIZER_FORMAT}:{documents_digest(documents)}".encode()).hexdigest()[:16]
    path = assets.cache_dir(cache_dir) / "tokenizers" / f"{corpus_id}-{digest}-v{vocab_size}.json"
    cached = _cached_tokenizer(path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    tokenizer = _train_bpe(documents, vocab_size)
    save_tokenizer(tokenizer, path)
    assets.log(f"tokenizer trained in {time.perf_counter() - start:.1f}s "
               f"({tokenizer.get_vocab_size()} tokens) -> {path}")
    return tokenizer


def encode_text(tokenizer: tokenizers.Tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` as an int32 vector (no special tokens added)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)
