"""Perplexity of a checkpoint or of a pretrained model on a corpus's validation split or a text.

    python -m experiments.evaluate --checkpoint runs/pretrain-tiny
    python -m experiments.evaluate --model smollm2 --text held_out.txt
    python -m experiments.evaluate --model smollm2 --corpus kjv --max_batches 8

The last line printed is ``perplexity: <float>``. Text is split into non-overlapping windows of
``seq_len`` tokens (each window is scored independently, every token predicted once).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax

from admm_jax.data import encode_text, eval_batches, prepare_corpus
from admm_jax.models.llama import LlamaConfig, abstract_params
from admm_jax.models.pretrained import PRETRAINED
from admm_jax.training.checkpoint import load_model
from admm_jax.training.lm import make_nll_sum, perplexity
from experiments.cli import parse_config


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Validation perplexity of ``--checkpoint DIR`` or ``--model NAME``."""

    checkpoint: str = ""
    model: str = ""
    text: str = ""
    corpus: str = ""
    seq_len: int = 256
    batch_size: int = 8
    max_batches: int = 0
    cache_dir: str = ""


def load_for_eval(cfg: EvaluateConfig):
    """``(model_config, params, tokenizer, corpus metadata)`` for a checkpoint or a model name.

    The metadata (:func:`admm_jax.data.corpus_meta`) names the corpus and split a checkpoint was
    trained on; it is empty for pretrained models."""
    if bool(cfg.checkpoint) == bool(cfg.model):
        raise ValueError("give exactly one of --checkpoint DIR or --model NAME "
                         f"(pretrained models: {sorted(PRETRAINED)})")
    if cfg.checkpoint:
        loaded = load_model(cfg.checkpoint)
        return loaded.config, loaded.params, loaded.tokenizer, loaded.meta
    if cfg.model not in PRETRAINED:
        raise ValueError(f"unknown --model {cfg.model!r}; choose one of {sorted(PRETRAINED)}")
    model = PRETRAINED[cfg.model](cache_dir=cfg.cache_dir or None)
    return model.config, model.params, model.tokenizer, {}


def evaluate(cfg: EvaluateConfig) -> float:
    """Load the model named by ``cfg`` and return its perplexity (:func:`evaluate_params`)."""
    return evaluate_params(cfg, *load_for_eval(cfg))


def evaluate_params(cfg: EvaluateConfig, config: LlamaConfig, params, tokenizer,
                    meta: dict) -> float:
    """Perplexity of ``params`` on ``cfg.text``, or on ``cfg.corpus`` / the corpus in ``meta``
    (its validation split, rebuilt with the split recorded in ``meta``)."""
    seq_len = min(cfg.seq_len, config.max_seq_len)
    if cfg.text:
        path = Path(cfg.text)
        if not path.is_file():
            raise FileNotFoundError(f"--text {cfg.text!r} is not a file")
        tokens = encode_text(tokenizer, path.read_text(encoding="utf-8"))
        source = str(path)
    else:
        same_corpus = not cfg.corpus or cfg.corpus == meta.get("corpus")
        split = ({"val_fraction": meta["val_fraction"], "seed": meta["split_seed"]}
                 if same_corpus and "split_seed" in meta else {})
        corpus = prepare_corpus(cfg.corpus or meta.get("corpus", "shakespeare"),
                                tokenizer=tokenizer, cache_dir=cfg.cache_dir or None, **split)
        tokens, source = corpus.val, f"{corpus.name} (validation split)"
    if len(tokens) < 2:
        raise ValueError(f"{source} has fewer than 2 tokens; nothing to evaluate")
    graphdef, _ = abstract_params(config)
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
