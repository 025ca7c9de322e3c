"""One way to name a model on the command line: a checkpoint directory or a pretrained name."""

from __future__ import annotations

from admm_jax.data import prepare_corpus
from admm_jax.models.compact import dense_params
from admm_jax.models.pretrained import PRETRAINED
from admm_jax.training.checkpoint import LoadedModel, load_model


def load_model_source(checkpoint: str = "", model: str = "", *, cache_dir: str = "",
                      compact: bool = False) -> LoadedModel:
    """The model at ``checkpoint`` (a checkpoint or run directory of this library) or, without
    one, the pretrained model ``model`` (a key of :data:`admm_jax.models.pretrained.PRETRAINED`).

    A checkpoint carries the corpus split it was trained on in ``meta``
    (:func:`admm_jax.data.corpus_meta`); a pretrained model has empty ``meta`` and step 0.

    A compact checkpoint (:data:`admm_jax.training.checkpoint.COMPACT_FORMAT`) is returned as
    stored with ``compact=True`` (build its model with
    :func:`admm_jax.training.checkpoint.model_graphdef`), else as its dense twin
    (:func:`admm_jax.models.compact.dense_params`, empty ``layouts``), which is what tools that
    prune, train or split dense kernels expect.

    Args:
        checkpoint: directory for :func:`admm_jax.training.checkpoint.load_model`; wins over
            ``model`` when both are given.
        model: pretrained model name.
        cache_dir: download cache of pretrained models (default: the library's cache).

    Raises:
        ValueError: if neither is given or ``model`` is not a known pretrained model.
    """
    if checkpoint:
        loaded = load_model(checkpoint)
        if compact or not loaded.layouts:
            return loaded
        return loaded._replace(params=dense_params(loaded.config, loaded.layouts, loaded.params),
                               layouts={})
    if model not in PRETRAINED:
        what = f"unknown --model {model!r}" if model else "no model given"
        raise ValueError(f"{what}: pass --checkpoint DIR or --model NAME with NAME one of "
                         f"{sorted(PRETRAINED)}")
    loaded = PRETRAINED[model](cache_dir=cache_dir or None)
    return LoadedModel(loaded.config, loaded.params, loaded.tokenizer, meta={}, step=0)


def load_with_domains(checkpoint: str, model: str, corpus: str, transfer_corpus: str = ""):
    """``(loaded model, corpus, domains)``: the model (see :func:`load_model_source`), ``corpus``
    tokenized with its tokenizer, and the validation tokens of every evaluation domain
    ``{"ppl": corpus, "transfer_ppl": transfer_corpus}`` (the second only if given)."""
    loaded = load_model_source(checkpoint, model)
    tokenized = prepare_corpus(corpus, tokenizer=loaded.tokenizer)
    domains = {"ppl": tokenized.val}
    if transfer_corpus:
        domains["transfer_ppl"] = prepare_corpus(transfer_corpus, tokenizer=loaded.tokenizer).val
    return loaded, tokenized, domains
