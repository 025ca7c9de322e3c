"""Perplexity of a checkpoint or of a pretrained model on a corpus's validation split or a text.

    python -m experiments.evaluate --checkpoint runs/pretrain-tiny
    python -m experiments.evaluate --model smollm2 --text held_out.txt
    python -m experiments.evaluate --model smollm2 --corpus kjv --max_batches 8
    python -m experiments.evaluate --checkpoint runs/elsa/elsa-0.9/compact

A compact checkpoint (``experiments.compact``, ``experiments.deploy --out``) is scored as stored,
with its compact linears (sparse / low-rank / N:M kernels).

The last line printed is ``perplexity: <float>``. Text is split into non-overlapping windows of
``seq_len`` tokens (each window is scored independently, every token predicted once).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import jax

from admm_jax._checks import check_int
from admm_jax.data import TokenizedCorpus, encode_text, eval_batches, prepare_corpus
from admm_jax.models.layouts import Layout
from admm_jax.models.llama import LlamaConfig, abstract_params
from admm_jax.training.checkpoint import linear_factory
from admm_jax.training.lm import make_nll_sum, perplexity
from experiments.cli import parse_config
from experiments.loading import load_model_source


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Validation perplexity of --checkpoint DIR or --model NAME."""

    checkpoint: str = ""
    """Checkpoint or run directory of this library (give this or --model)."""
    model: str = ""
    """Pretrained model name, e.g. smollm2 (give this or --checkpoint)."""
    text: str = ""
    """Score this UTF-8 text file instead of a corpus's validation split."""
    corpus: str = ""
    """Corpus whose validation split is scored (default: the checkpoint's own, else shakespeare)."""
    seq_len: int = 256
    """Tokens per evaluation window (capped at the model's max_seq_len)."""
    batch_size: int = 8
    """Windows per batch."""
    max_batches: int = 0
    """Evaluate at most this many batches; 0 = all."""
    cache_dir: str = ""
    """Cache directory for pretrained models and corpora (default: the library's cache)."""

    def __post_init__(self):
        check_int("seq_len", self.seq_len, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("max_batches", self.max_batches, minimum=0)


def evaluate(cfg: EvaluateConfig) -> float:
    """Load the model named by ``cfg`` and return its perplexity (:func:`evaluate_params`)."""
    if bool(cfg.checkpoint) == bool(cfg.model):
        raise ValueError("give exactly one of --checkpoint DIR or --model NAME")
    loaded = load_model_source(cfg.checkpoint, cfg.model, cache_dir=cfg.cache_dir, compact=True)
    return evaluate_params(cfg, loaded.config, loaded.params, loaded.tokenizer, loaded.meta,
                           layouts=loaded.layouts)


def corpus_of(cfg: EvaluateConfig, meta: dict, tokenizer) -> TokenizedCorpus:
    """``cfg.corpus``, else the corpus recorded in a checkpoint's ``meta`` (default
    shakespeare), split as ``meta`` records when it is the checkpoint's own corpus."""
    same_corpus = not cfg.corpus or cfg.corpus == meta.get("corpus")
    split = ({"val_fraction": meta["val_fraction"], "seed": meta["split_seed"]}
             if same_corpus and "split_seed" in meta else {})
    return prepare_corpus(cfg.corpus or meta.get("corpus", "shakespeare"), tokenizer=tokenizer,
                          cache_dir=cfg.cache_dir or None, **split)


def evaluate_params(cfg: EvaluateConfig, config: LlamaConfig, params, tokenizer,
                    meta: dict, *, layouts: Mapping[str, Layout] | None = None) -> float:
    """Perplexity of ``params`` on ``cfg.text``, or on ``cfg.corpus`` / the corpus in ``meta``
    (its validation split, rebuilt with the split recorded in ``meta``); ``layouts`` name the
    compact linears of ``params`` (none: a dense model)."""
    seq_len = min(cfg.seq_len, config.max_seq_len)
    if cfg.text:
        path = Path(cfg.text)
        if not path.is_file():
            raise FileNotFoundError(f"--text {cfg.text!r} is not a file")
        tokens = encode_text(tokenizer, path.read_text(encoding="utf-8"))
        source = str(path)
    else:
        corpus = corpus_of(cfg, meta, tokenizer)
        tokens, source = corpus.val, f"{corpus.name} (validation split)"
    if len(tokens) < 2:
        raise ValueError(f"{source} has fewer than 2 tokens; nothing to evaluate")
    graphdef, _ = abstract_params(config, linear=linear_factory(config, layouts))
    t0 = time.perf_counter()
    batches = eval_batches(tokens, batch_size=cfg.batch_size, seq_len=min(seq_len, len(tokens) - 1),
                           max_batches=cfg.max_batches or None)
    ppl = perplexity(make_nll_sum(graphdef), params, batches)
    print(f"evaluated {source}: {len(tokens):,} tokens, seq_len {seq_len}, "
          f"{time.perf_counter() - t0:.1f}s on {jax.devices()[0].platform}", file=sys.stderr)
    return ppl


def main(argv: list[str] | None = None) -> float:
    ppl = evaluate(parse_config(EvaluateConfig, argv))
    print(f"perplexity: {ppl:.4f}")
    return ppl


if __name__ == "__main__":
    main()
