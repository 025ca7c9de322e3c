"""Tokenized splits and their on-disk cache of memmapped token files.

:func:`prepare_corpus` loads, splits, tokenizes and caches a corpus; each split is its documents'
tokens, each followed by the end-of-document id. Cache layout under
:func:`admm_jax.data.assets.cache_dir`::

    <cache>/tokens/<corpus_id>-<key>/{train.bin, val.bin, meta.json}

An entry is built in a temporary directory and moved into place with ``os.replace``, so an
interrupted run never leaves an entry that is later trusted; an incomplete or inconsistent entry
(``meta.json`` missing, wrong key, file sizes that disagree with the counts) is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from admm_jax._checks import check_int
from admm_jax.data import assets
from admm_jax.data.corpora import (
    Document,
    corpus_id,
    corpus_source,
    documents_digest,
    load_documents,
    split_documents,
)
from admm_jax.data.tokenizer import EOS_TOKEN, MIN_VOCAB_SIZE, train_tokenizer

# Bump when the token file layout changes, to invalidate old caches.
_TOKENS_FORMAT = 1
_ENCODE_CHUNK_CHARS = 32 * 2**20  # bounds the memory of one encode_batch call
SPLITS = ("train", "val")
"""Names of the splits of a :class:`TokenizedCorpus`, in cache order."""


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    """A tokenized corpus: each split is its documents' tokens, each followed by ``eos_id``.

    Attributes:
        train: 1-D token ids of the train split (read-only ``np.memmap`` from the cache).
        val: 1-D token ids of the validation split.
        tokenizer: the tokenizer that produced them (save it next to checkpoints).
        eos_id: id of :data:`~admm_jax.data.EOS_TOKEN`, appended after every document.
        name: corpus label.
        source: what to pass to :func:`prepare_corpus` to rebuild it (a registered name or an
            absolute path).
        val_fraction: fraction of documents in the validation split.
        seed: seed of the document split.
    """

    train: np.ndarray = dataclasses.field(repr=False)
    val: np.ndarray = dataclasses.field(repr=False)
    tokenizer: tokenizers.Tokenizer = dataclasses.field(repr=False)
    eos_id: int
    name: str
    source: str
    val_fraction: float
    seed: int

    @property
    def vocab_size(self) -> int:
        """Number of token ids (embedding rows needed), special tokens included."""
        return self.tokenizer.get_vocab_size()


def corpus_meta(corpus: TokenizedCorpus) -> dict[str, Any]:
    """JSON-ready fields that identify ``corpus`` and its split, for checkpoint metadata:
    ``prepare_corpus(m["corpus"], val_fraction=m["val_fraction"], seed=m["split_seed"],
    tokenizer=...)`` rebuilds the same splits."""
    return {"corpus": corpus.source, "val_fraction": corpus.val_fraction,
            "split_seed": corpus.seed}


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _chunks(documents: Sequence[Document], max_chars: int) -> Iterator[list[str]]:
    """Texts grouped into runs of about ``max_chars`` characters (a longer text stands alone)."""
    chunk: list[str] = []
    chars = 0
    for doc in documents:
        if chunk and chars + len(doc.text) > max_chars:
            yield chunk
            chunk, chars = [], 0
        chunk.append(doc.text)
        chars += len(doc.text)
    if chunk:
        yield chunk


def _write_tokens(tokenizer: tokenizers.Tokenizer, documents: Sequence[Document], eos_id: int,
                  dtype: np.dtype, path: Path) -> int:
    """Encodes ``documents`` (EOS after each) into the raw file ``path``; returns the count."""
    n_tokens = 0
    with open(path, "wb") as f:
        for chunk in _chunks(documents, _ENCODE_CHUNK_CHARS):
            for enc in tokenizer.encode_batch(chunk, add_special_tokens=False):
                ids = np.asarray([*enc.ids, eos_id], dtype=dtype)
                f.write(ids.tobytes())
                n_tokens += ids.size
    return n_tokens


def _tokens_key(documents: Sequence[Document], tokenizer: tokenizers.Tokenizer,
                val_fraction: float, seed: int) -> str:
    """sha256 over the cache format, the split parameters, the documents and the tokenizer."""
    h = hashlib.sha256(f"tokens-v{_TOKENS_FORMAT}:{val_fraction!r}:{seed}:".encode())
    h.update(documents_digest(documents).encode())
    h.update(tokenizer.to_str().encode())
    return h.hexdigest()


def _open_tokens(directory: Path, key: str) -> tuple[np.memmap, np.memmap] | None:
    """The cached splits in ``directory`` if complete and consistent with ``key``, else ``None``."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        if meta["key"] != key:
            return None
        dtype = np.dtype(meta["dtype"])
        splits = []
        for split in SPLITS:
            n = int(meta[f"n_{split}"])
            path = directory / f"{split}.bin"
            if n < 1 or path.stat().st_size != n * dtype.itemsize:
                return None
            splits.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return splits[0], splits[1]


def _build_tokens(final: Path, key: str, tokenizer: tokenizers.Tokenizer,
                  splits: dict[str, list[Document]], meta: dict[str, Any]) -> None:
    """Encodes ``splits`` into a temporary sibling of ``final`` and moves it into place.

    ``meta`` (the entry's identifying fields) is completed with the token counts and document
    names and written last, so an entry without ``meta.json`` is never trusted.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        n_chars = sum(len(d.text) for docs in splits.values() for d in docs)
        assets.log(f"encoding {sum(map(len, splits.values()))} documents "
                   f"({n_chars / 1e6:.1f}M chars) ...")
        start = time.perf_counter()
        dtype = np.dtype(meta["dtype"])
        counts = {split: _write_tokens(tokenizer, docs, meta["eos_id"], dtype, tmp / f"{split}.bin")
                  for split, docs in splits.items()}
        meta = {**meta, **{f"n_{split}": n for split, n in counts.items()},
                **{f"{split}_documents": [d.name for d in docs] for split, docs in splits.items()}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same entry first
            if _open_tokens(final, key) is None:
                raise
        assets.log(f"{counts['train']:,} train / {counts['val']:,} val tokens in "
                   f"{time.perf_counter() - start:.1f}s -> {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_tokens(final: Path, key: str, tokenizer: tokenizers.Tokenizer,
                   splits: dict[str, list[Document]],
                   meta: dict[str, Any]) -> tuple[np.memmap, np.memmap]:
    """The token cache entry ``final``: reused if complete for ``key``, else (re)built."""
    cached = _open_tokens(final, key)
    if cached is not None:
        return cached
    if final.exists():
        assets.log(f"rebuilding incomplete token cache {final}")
        shutil.rmtree(final)
    _build_tokens(final, key, tokenizer, splits, meta)
    cached = _open_tokens(final, key)
    if cached is None:
        raise RuntimeError(f"token cache {final} could not be read back after writing it")
    return cached


def _check_tokenizer(tokenizer: tokenizers.Tokenizer | None, vocab_size: int) -> int:
    """``vocab_size`` checked when a tokenizer is to be trained; else ``tokenizer`` checked."""
    if tokenizer is None:
        return check_int("vocab_size", vocab_size, MIN_VOCAB_SIZE)
    if not isinstance(tokenizer, tokenizers.Tokenizer):
        raise ValueError(f"tokenizer must be a tokenizers.Tokenizer or None, "
                         f"got {type(tokenizer).__name__}")
    if tokenizer.token_to_id(EOS_TOKEN) is None:
        raise ValueError(f"tokenizer must have the end-of-document token {EOS_TOKEN!r}")
    return vocab_size


def prepare_corpus(corpus: str | os.PathLike, *, vocab_size: int = 8192,
                   tokenizer: tokenizers.Tokenizer | None = None, val_fraction: float = 0.05,
                   seed: int = 0, cache_dir: str | os.PathLike | None = None) -> TokenizedCorpus:
    """Loads, splits by document, tokenizes and caches a corpus.

    Steps: :func:`~admm_jax.data.load_documents`, :func:`~admm_jax.data.split_documents`,
    :func:`~admm_jax.data.train_tokenizer` on the train split (unless ``tokenizer`` is given),
    then every document is encoded with :data:`~admm_jax.data.EOS_TOKEN` appended and each split
    is stored as raw ``uint16`` (``uint32`` above 65,536 ids) under
    ``<cache>/tokens/<corpus_id>-<key>/``, ``key`` hashing the documents, the tokenizer JSON and the
    split parameters. A complete cache entry is reused as read-only memmaps; an incomplete or
    inconsistent one is rebuilt.

    Args:
        corpus: corpus name or path, as for :func:`~admm_jax.data.load_documents`.
        vocab_size: vocabulary of the trained tokenizer; ignored when ``tokenizer`` is given.
        tokenizer: an existing tokenizer (e.g. a pretrained model's) that has ``EOS_TOKEN``.
        val_fraction: fraction of documents held out for validation, in ``(0, 1)``.
        seed: seed of the document split.
        cache_dir: cache root override (see :func:`admm_jax.data.assets.cache_dir`).

    Returns:
        The splits as read-only memmaps, with the tokenizer and what identifies the split.
    """
    vocab_size = _check_tokenizer(tokenizer, vocab_size)
    root = assets.cache_dir(cache_dir)
    documents = load_documents(corpus, root)
    train_docs, val_docs = split_documents(documents, val_fraction, seed)
    label = corpus_id(corpus)
    if tokenizer is None:
        tokenizer = train_tokenizer(train_docs, vocab_size, cache_dir=root, corpus_id=label)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    key = _tokens_key(documents, tokenizer, val_fraction, seed)
    meta = {"format": _TOKENS_FORMAT, "key": key, "corpus": label,
            "dtype": _token_dtype(tokenizer.get_vocab_size()).name,
            "vocab_size": tokenizer.get_vocab_size(), "eos_id": eos_id,
            "val_fraction": val_fraction, "seed": seed}
    train, val = _cached_tokens(root / "tokens" / f"{label}-{key[:16]}", key, tokenizer,
                                dict(zip(SPLITS, (train_docs, val_docs))), meta)
    return TokenizedCorpus(train=train, val=val, tokenizer=tokenizer, eos_id=eos_id, name=label,
                           source=corpus_source(corpus), val_fraction=val_fraction, seed=seed)
