"""Corpora, the byte-level BPE tokenizer, token caches, batches and calibration samples."""

from admm_jax.data.corpus import (
    CORPORA,
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    BatchIterator,
    Document,
    TokenizedCorpus,
    calibration_samples,
    corpus_meta,
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

__all__ = ["CORPORA", "EOS_TOKEN", "MIN_VOCAB_SIZE", "BatchIterator", "Document",
           "TokenizedCorpus", "calibration_samples", "corpus_meta", "encode_text", "eval_batches",
           "get_batch", "load_documents", "load_tokenizer", "prepare_corpus", "register_corpus",
           "save_tokenizer", "split_documents", "train_tokenizer"]
