"""What every row of :mod:`experiments.sparc` shares: the row cache keys, list parsing and the
:class:`Experiment` context (model, corpora, gradient statistics, evaluation)."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax.adapters import adapter_paths
from admm_jax.core import path_str
from admm_jax.data import TokenizedCorpus, eval_batches, get_batch, prepare_corpus
from admm_jax.models.llama import LlamaConfig, abstract_params, init_params
from admm_jax.models.pretrained import PRETRAINED
from admm_jax.sparc import GradientStats, gradient_statistics
from admm_jax.sparc.gradients import kernel_gradient_fn
from admm_jax.training.lm import make_nll_sum, perplexity
from experiments.cli import to_dict
from experiments.loading import load_model_source
from experiments.runs import cached_row, run_dir

if TYPE_CHECKING:
    from experiments.sparc import SparcConfig

#: version of the cached rows; a row of another format is recomputed
RESULT_FORMAT = "sparc-result-v1"
KINDS = ("sparc", "svd", "topk")
#: the methods whose initialisation is a compressed gradient step, scaled by 1/γ
STEP_METHODS = ("lora-one", "ra-sparc")
_GRADIENT = ("targets", "grad_batch_size", "grad_seq_len", "grad_seed")
_EVAL = ("corpus", "transfer_corpus", "eval_seq_len", "eval_batch_size", "eval_batches")
DEPENDS = {
    "compressors": (*_GRADIENT, "n_gradients", "mu"),
    "pretrained": _EVAL,
    "lora": (*_EVAL, "targets", "alpha", "train"),
    "lora-one": (*_EVAL, *_GRADIENT, "n_gradients", "alpha", "gammas", "gamma_batches", "train"),
    "rosa": (*_EVAL, *_GRADIENT, "n_gradients", "alpha", "rosa_rank_fraction", "train"),
    "ra-sparc": (*_EVAL, *_GRADIENT, "n_gradients", "alpha", "gammas", "gamma_batches", "train"),
}


def parse_list(name: str, spec: str, cast: type) -> list:
    """``"4,16"`` → ``[4, 16]`` (``cast`` each item); ``ValueError`` naming ``name``."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    try:
        return [cast(s) for s in items]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of {cast.__name__}, "
                         f"got {spec!r}") from None


def row_key(cfg: SparcConfig, kind: str, **extra) -> dict:
    """What a cached row of ``kind`` must have been computed under (:data:`DEPENDS`; a preset
    model's random weights and tokenizer also depend on the seed and ``corpus``)."""
    values = to_dict(cfg)
    fields = DEPENDS[kind] + (() if cfg.model in PRETRAINED else ("corpus",))
    model = {"model": cfg.model} | ({} if cfg.model in PRETRAINED else
                                    {"seed": cfg.train.seed})
    return {"format": RESULT_FORMAT, **model, **{f: values[f] for f in fields}, **extra}


def get_row(path: Path, key: dict, compute, run: bool) -> dict | None:
    """``cached_row(path, key, compute)`` if ``run``, else the row stored at ``path`` if it
    was computed under ``key`` (``None`` otherwise)."""
    if run:
        return cached_row(path, key, compute)
    row = json.loads(path.read_text()) if path.exists() else {}
    return row if row.get("config") == key else None


class Experiment:
    """What every row of one invocation shares: the config, the model, corpora tokenized with
    its tokenizer (lazily), the evaluation domains and the gradient statistics of one corpus at a
    time (the last one asked for)."""

    def __init__(self, cfg: SparcConfig, argv: list[str]):
        self.cfg = cfg
        self.root = run_dir(cfg.runs_root, cfg.name)
        self.rows = Path(cfg.rows_dir) if cfg.rows_dir else self.root
        self.command = "python -m experiments.sparc " + shlex.join(argv)
        if cfg.model in PRETRAINED:
            loaded = load_model_source("", cfg.model)
            self.config, self.params, self.tokenizer = loaded.config, loaded.params, \
                loaded.tokenizer
            main = prepare_corpus(cfg.corpus, tokenizer=self.tokenizer)
        else:
            self.config = LlamaConfig.preset(cfg.model)
            main = prepare_corpus(cfg.corpus, vocab_size=self.config.vocab_size)
            self.tokenizer = main.tokenizer
            self.params = init_params(self.config, jax.random.key(cfg.train.seed))[1]
        self.graphdef = abstract_params(self.config)[0]
        self.nll_sum = make_nll_sum(self.graphdef)
        self._corpora = {cfg.corpus: main}
        flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(self.params)[0]}
        self.kernels = {f"{p}/kernel": flat[f"{p}/kernel"] for p in adapter_paths(
            self.config, parse_list("targets", cfg.targets, str))}
        self.paths = list(self.kernels)
        self._stats: tuple[str, GradientStats] | None = None
        self._gradient_seconds: float | None = None

    def corpus(self, name: str) -> TokenizedCorpus:
        if name not in self._corpora:
            self._corpora[name] = prepare_corpus(name, tokenizer=self.tokenizer)
        return self._corpora[name]

    def domains(self) -> dict[str, np.ndarray]:
        """``{"ppl": corpus val, "transfer_ppl": transfer_corpus val}`` (the second if given)."""
        cfg = self.cfg
        return {"ppl": self.corpus(cfg.corpus).val} | (
            {"transfer_ppl": self.corpus(cfg.transfer_corpus).val} if cfg.transfer_corpus else {})

    def batches(self, name: str, start: int, count: int) -> list[np.ndarray]:
        """Train mini-batches ``start … start + count − 1`` of ``name`` under ``grad_seed``."""
        cfg = self.cfg
        return [get_batch(self.corpus(name).train, s, batch_size=cfg.grad_batch_size,
                          seq_len=cfg.grad_seq_len, seed=cfg.grad_seed)
                for s in range(start, start + count)]

    def stats(self, name: str) -> GradientStats:
        """Gradient statistics of the first ``n_gradients`` batches of ``name`` (every sample
        kept)."""
        if self._stats is None or self._stats[0] != name:
            self._stats = None  # free the previous corpus's gradients first
            n = self.cfg.n_gradients
            self._stats = (name, gradient_statistics(self.graphdef, self.params,
                                                     self.batches(name, 0, n), self.paths,
                                                     n_samples=n))
        return self._stats[1]

    def gradient_seconds(self) -> float:
        """Seconds of one kernel gradient on ``corpus``, compiled first, then timed."""
        if self._gradient_seconds is None:
            grads = kernel_gradient_fn(self.graphdef, self.params, self.paths)
            batch = jnp.asarray(self.batches(self.cfg.corpus, 0, 1)[0])
            jax.block_until_ready(grads(self.params, batch))
            t0 = time.perf_counter()
            jax.block_until_ready(grads(self.params, batch))
            self._gradient_seconds = time.perf_counter() - t0
        return self._gradient_seconds

    def perplexities(self, params, nll_sum=None, keys: tuple[str, ...] | None = None
                     ) -> dict[str, float]:
        """Perplexity on ``eval_batches`` windows of each domain (``keys``, default all)."""
        cfg = self.cfg
        return {key: perplexity(nll_sum or self.nll_sum, params, eval_batches(
            tokens, batch_size=cfg.eval_batch_size, seq_len=cfg.eval_seq_len,
            max_batches=cfg.eval_batches or None))
            for key, tokens in self.domains().items() if keys is None or key in keys}

    def budget(self, rank: int) -> int:
        """Trainable scalars of a rank-``rank`` budget over every adapted kernel."""
        return sum(rank * sum(np.shape(w)) for w in self.kernels.values())


