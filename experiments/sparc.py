"""RA-SpaRC on SmolLM2-135M: (a) the compressor table, (b) fine-tuning at equal trainable budgets.

    python -m experiments.sparc                                  # both parts, CPU preset
    python -m experiments.sparc --part compressors               # (a) only
    python -m experiments.sparc --part finetune --ranks 4        # (b) at one budget

(a) Compressors (RA-SpaRC §3.3, Table 4; App. C.2). ``n_gradients`` stochastic gradients of the
adapted kernels on the *train* split of each of ``compressor_corpora`` (one mini-batch of
``grad_batch_size × grad_seq_len`` tokens each). For SpaRC, SVD and TopK at each budget
``p = r·(m + n)`` per kernel (``compressor_ranks``): ``M(C)`` (eq. 9) and the relative errors,
norms summed over the kernels (§3.1), averaged over the gradients, and the seconds per gradient.
On the first gradient, per kernel: the full error curve over ``r`` (``search="scan"``), its
unimodality, the rank Alg. 1's bisection picks on it against the scan's, the library's fallback
and SpaRC's error against the pure SVD and TopK errors.

(b) Fine-tuning with adapters on ``targets`` of every block: ``lora``, ``lora-one``, ``rosa``,
``ra-sparc`` (:func:`admm_jax.sparc.adapter_inits`), each with exactly ``rank·(in + out)``
trainable scalars per kernel at each of ``ranks``, the same ``λ = alpha / rank``, loop, AdamW,
steps and data seed. Perplexity on the validation documents of ``corpus`` and
``transfer_corpus`` of the pretrained, the initialised and the fine-tuned model (adapters merged
into dense kernels, checked against the adapted model); trainable count, initialisation and
step seconds, final training loss and RA-SpaRC's rank per kernel (``rank_per_layer.png``).
How each hyperparameter and measurement was chosen: :data:`experiments.sparc_report.CHOICES`
(printed in the summary).

Rows are cached in ``runs/<name>/`` (:func:`experiments.runs.cached_row`, keyed by the config
fields each row depends on); a row's training run resumes from its checkpoint while its key is
unchanged. The summary goes to ``runs/<name>/summary.md`` and ``results``
(:mod:`experiments.sparc_report`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from admm_jax._checks import check_choice, check_int, check_real
from admm_jax._io import atomic_write_json
from admm_jax.adapters import (
    ADAPTABLE,
    AdapterInit,
    AdapterParam,
    adapt_params,
    adapter_param_count,
    adapters_of,
    merge_adapters,
)
from admm_jax.core import path_str
from admm_jax.models.config import PRESETS
from admm_jax.models.pretrained import PRETRAINED
from admm_jax.sparc import (
    METHODS,
    adapter_inits,
    bisection_curve,
    compressor,
    compressor_quality,
    is_unimodal,
    sparc_budget,
    sparc_compress,
)
from admm_jax.training import OptimizerConfig, TrainConfig, default_optimizer, train
from admm_jax.training.lm import make_nll_sum, perplexity
from experiments.cli import parse_config, to_dict
from experiments.sparc_context import (
    KINDS,
    STEP_METHODS,
    Experiment,
    get_row,
    parse_list,
    row_key,
)
from experiments.sparc_report import write_outputs


@dataclasses.dataclass(frozen=True)
class SparcConfig:
    """RA-SpaRC compressors and fine-tuning (module docstring). Defaults: the CPU preset."""

    name: str = "sparc-smollm2"
    """Run name: outputs go to RUNS_ROOT/NAME (cached per row; re-runs resume)."""
    model: str = "smollm2"
    """A pretrained model name, or a LlamaConfig preset (random init, tokenizer trained on
    CORPUS: for smoke tests)."""
    part: Literal["all", "compressors", "finetune"] = "all"
    """Which part to compute; the summary also shows the other part's cached rows."""
    corpus: str = "kjv"
    """Fine-tuning corpus (train split) and the first evaluation domain (validation split)."""
    transfer_corpus: str = "shakespeare"
    """Second evaluation domain (its validation documents only); '' = none."""
    compressor_corpora: str = "kjv,shakespeare"
    """Comma-separated corpora whose train-split gradients the compressors are compared on."""
    runs_root: str = "runs"
    """Directory that holds the run directories."""
    rows_dir: str = ""
    """Directory of the row cache (compressor rows in ``compressors/``, fine-tuning rows as
    ``METHOD-rRANK.json``); empty = the run directory. Point it at a committed folder to resume a
    sweep on another machine (training checkpoints stay in the run directory)."""
    results: str = "results/sparc.md"
    """Markdown summary (the rank plot is copied next to it)."""
    targets: str = ",".join(ADAPTABLE)
    """Comma-separated projections of every block that get adapters (and whose gradients are
    compressed)."""
    compressor_ranks: str = "8,32"
    """Comma-separated budgets of (a) as ranks r: p = r·(m + n) per kernel."""
    mu: float = 1.0
    """μ of the quality metric M(C) (eq. 9; 1 is the paper's choice)."""
    n_gradients: int = 4
    """Stochastic gradients per corpus of (a); also RoSA's accumulated squared gradients."""
    grad_batch_size: int = 8
    """Sequences per gradient mini-batch (App. C.2: 8)."""
    grad_seq_len: int = 128
    """Tokens per gradient sequence."""
    grad_seed: int = 1
    """Data seed of the gradient and γ-selection mini-batches (train split)."""
    ranks: str = "4,16"
    """Comma-separated budgets of (b) as LoRA ranks: rank·(in + out) trainable per kernel."""
    methods: str = ",".join(METHODS)
    """Comma-separated fine-tuning methods, from lora, lora-one, rosa, ra-sparc."""
    alpha: float = 16.0
    """LoRA α of every method (λ = α / rank)."""
    gammas: str = "1,4,16,64,256,1024"
    """Comma-separated γ grid of LoRA-One and RA-SpaRC (W1 = W0 − C(g)/γ)."""
    gamma_batches: int = 2
    """Train mini-batches (grad_batch_size × grad_seq_len) that score each γ."""
    rosa_rank_fraction: float = 0.5
    """Share of RoSA's budget in its low-rank part (RA-SpaRC Table 7: r/2)."""
    eval_seq_len: int = 256
    """Tokens per held-out evaluation window."""
    eval_batch_size: int = 8
    """Windows per held-out evaluation batch."""
    eval_batches: int = 8
    """Held-out evaluation batches per domain; 0 = the whole validation split."""
    notes: str = ""
    """Extra text for the summary's setup section."""
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=150, batch_size=4, seq_len=128, log_every=5, eval_every=150, eval_batches=4,
        checkpoint_every=50, keep_checkpoints=1, optimizer=OptimizerConfig(
            lr=2e-4, min_lr_ratio=0.0, warmup_steps=5, b2=0.999, weight_decay=0.0)))
    """Loop and AdamW of every fine-tuning row (same steps, batches and data seed)."""

    def __post_init__(self):
        check_choice("model", self.model, (*sorted(PRETRAINED), *sorted(PRESETS)))
        check_choice("part", self.part, ("all", "compressors", "finetune"))
        for name in ("n_gradients", "grad_batch_size", "grad_seq_len", "gamma_batches",
                     "eval_seq_len", "eval_batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("grad_seed", self.grad_seed, minimum=0)
        check_int("eval_batches", self.eval_batches, minimum=0)
        check_real("mu", self.mu, low=0.0, low_open=True)
        check_real("alpha", self.alpha, low=0.0, low_open=True)
        check_real("rosa_rank_fraction", self.rosa_rank_fraction, low=0.0, high=1.0)
        for name in ("compressor_ranks", "ranks"):
            for r in parse_list(name, getattr(self, name), int):
                check_int(name, r, minimum=1)
        for g in parse_list("gammas", self.gammas, float):
            check_real("gammas", g, low=0.0, low_open=True)
        for name, choices in (("targets", ADAPTABLE), ("methods", METHODS)):
            for item in parse_list(name, getattr(self, name), str):
                check_choice(name, item, tuple(choices))
        if not parse_list("compressor_corpora", self.compressor_corpora, str):
            raise ValueError("compressor_corpora must name at least one corpus")


# ---------------------------------------------------------------------------------------------
# (a) compressors


def quality(samples: dict[str, jax.Array], kind: str, rank: int, mu: float) -> dict:
    """M(C) and relative errors of compressor ``kind`` at budget ``rank·(m + n)`` per kernel,
    averaged over the samples (``{path: [S, m, n]}``), and the median seconds per sample (all
    kernels; the first sample includes compilation)."""
    compress = compressor(kind, r_max=rank)
    values, seconds = [], []
    for i in range(len(next(iter(samples.values())))):
        t0 = time.perf_counter()
        q = jax.device_get(compressor_quality([{p: x[i] for p, x in samples.items()}],
                                              compress, mu=mu))
        seconds.append(time.perf_counter() - t0)
        values.append(q)
        print(f"  {kind} r={rank}: gradient {i + 1}, M {q.metric:.4g}, {seconds[-1]:.1f}s",
              flush=True)
    return {**{f: float(np.mean([getattr(q, f) for q in values]))
               for f in ("metric", "rel_error", "rel_sq_error")},
            "seconds_per_gradient": float(np.median(seconds))}


def _rel_error(x: jax.Array, approx: jax.Array) -> float:
    return float(jnp.linalg.norm(approx - x) / jnp.linalg.norm(x))


def kernel_study(g: jax.Array, rank: int) -> dict:
    """App. C.2 on one kernel gradient at budget ``rank·(m + n)``: the full scan's curve and
    rank, the rank Alg. 1's bisection picks on that curve, the library's SpaRC (bisection with
    its unimodality fallback) and the pure SVD / TopK errors."""
    p = sparc_budget(np.shape(g), r_max=rank)
    t0 = time.perf_counter()
    scan = jax.device_get(sparc_compress(g, p, search="scan"))
    t1 = time.perf_counter()
    lib = jax.device_get(sparc_compress(g, p))
    t2 = time.perf_counter()
    curve = jnp.asarray(scan.error_curve)
    visited = bisection_curve(lambda r: curve[r], len(curve) - 1)  # Alg. 1's points on the curve
    picked, best = int(jnp.nanargmin(visited)), int(scan.rank)
    return {"r_max": len(curve) - 1, "unimodal": bool(is_unimodal(curve)),
            "scan_rank": best, "bisect_rank": picked,
            "bisect_excess": float(curve[picked] / jnp.maximum(curve[best], 1e-30) - 1),
            "fallback": not bool(lib.unimodal), "library_rank": int(lib.rank),
            "sparc_error": float(lib.rel_error),
            "svd_error": _rel_error(g, compressor("svd", r_max=rank)(g)),
            "topk_error": _rel_error(g, compressor("topk", r_max=rank)(g)),
            "curve": [float(c) for c in curve], "scan_seconds": t1 - t0,
            "bisect_seconds": t2 - t1}


def compressor_row(exp: Experiment, name: str, rank: int) -> dict:
    """Table 4's row group of corpus ``name`` at rank ``rank`` and the per-kernel study."""
    stats = exp.stats(name)
    dense = sum(int(np.prod(x.shape[1:])) for x in stats.samples.values())
    row = {"corpus": name, "rank": rank, "budget_fraction": exp.budget(rank) / dense}
    row |= {kind: quality(stats.samples, kind, rank, exp.cfg.mu) for kind in KINDS}
    row["kernels"] = {}
    for i, (p, x) in enumerate(stats.samples.items()):
        row["kernels"][p] = kernel_study(x[0], rank)
        if (i + 1) % 30 == 0 or i + 1 == len(stats.samples):
            print(f"  kernel study r={rank}: {i + 1}/{len(stats.samples)} kernels", flush=True)
    print(f"{name} r={rank}: " + ", ".join(f"M({k}) {row[k]['metric']:.4g}" for k in KINDS),
          flush=True)
    return {**row, "command": exp.command}


def compressor_rows(exp: Experiment, compute: bool) -> list[dict]:
    """Every (corpus, rank) row, computed (or, with ``compute=False``, only those cached)."""
    rows = []
    for name in parse_list("compressor_corpora", exp.cfg.compressor_corpora, str):
        for rank in parse_list("compressor_ranks", exp.cfg.compressor_ranks, int):
            path = exp.rows / "compressors" / f"{Path(name).name}-r{rank}.json"
            key = row_key(exp.cfg, "compressors", corpus_name=name, rank=rank)
            row = get_row(path, key, lambda n=name, r=rank: compressor_row(exp, n, r), compute)
            rows += [row] if row else []
    return rows


# ---------------------------------------------------------------------------------------------
# (b) fine-tuning


def scaled(init: AdapterInit, gamma: float) -> AdapterInit:
    """The initialisation built at γ = 1 rescaled to ``gamma``: ``A, B / √γ``, ``E / γ``, so the
    delta ``−C(g)/γ`` (:func:`admm_jax.sparc.init_from_parts`)."""
    root = math.sqrt(gamma)
    return init._replace(lora_a=init.lora_a / root, lora_b=init.lora_b / root,
                         values=init.values / gamma)


def with_deltas(params, deltas: dict[str, jax.Array], factor: float):
    """``params`` with every kernel at a path of ``deltas`` replaced by ``W0 + factor·Δ``."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + factor * deltas[path_str(p)] if path_str(p) in deltas else x, params)


def choose_gamma(exp: Experiment, deltas: dict[str, jax.Array]) -> dict:
    """γ of ``gammas`` with the lowest mean training loss of ``W0 + Δ/γ`` (``Δ = −C(g)``) on
    ``gamma_batches`` train mini-batches after the gradient batches; the grid's losses, the
    loss of ``W0`` and the search seconds."""
    t0 = time.perf_counter()
    batches = exp.batches(exp.cfg.corpus, exp.cfg.n_gradients, exp.cfg.gamma_batches)

    def loss(params) -> float:
        return math.log(perplexity(exp.nll_sum, params, batches))

    losses = {str(g): loss(with_deltas(exp.params, deltas, 1 / g))
              for g in parse_list("gammas", exp.cfg.gammas, float)}
    gamma = float(min(losses, key=losses.get))
    return {"gamma": gamma, "gamma_losses": losses, "w0_gamma_loss": loss(exp.params),
            "gamma_search_seconds": time.perf_counter() - t0}


def initialise(exp: Experiment, method: str, rank: int) -> tuple[dict[str, AdapterInit], dict]:
    """The adapters of ``method`` at ``rank`` (γ chosen by :func:`choose_gamma` for the step
    methods) and the row entries of the initialisation."""
    cfg = exp.cfg
    stats = exp.stats(cfg.corpus) if method != "lora" else None
    # LoRA reads only the shapes of its "gradient"
    gradient = {p: x[0] for p, x in stats.samples.items()} if stats else exp.kernels
    t0 = time.perf_counter()
    inits = adapter_inits(method, gradient, rank=rank, alpha=cfg.alpha, gamma=1.0,
                          key=jax.random.key(cfg.train.seed),
                          mean_square=stats.mean_square if method == "rosa" else None,
                          rosa_rank_fraction=cfg.rosa_rank_fraction)
    graphdef, params = adapt_params(exp.graphdef, exp.params, inits)
    jax.block_until_ready(params)
    n_grads = {"lora": 0, "rosa": cfg.n_gradients}.get(method, 1)
    info = {"compress_seconds": time.perf_counter() - t0,
            "gradient_seconds": n_grads * exp.gradient_seconds() if n_grads else 0.0}
    info["init_seconds"] = info["compress_seconds"] + info["gradient_seconds"]
    if method in STEP_METHODS:
        deltas = {f"{p}/kernel": a.delta()
                  for p, a in adapters_of(nnx.merge(graphdef, params)).items()}
        info |= choose_gamma(exp, deltas)
        info["init_ppl"] = exp.perplexities(with_deltas(exp.params, deltas, 1 / info["gamma"]))
        inits = {p: scaled(i, info["gamma"]) for p, i in inits.items()}
    if method == "ra-sparc":
        info["ranks"] = {p: int(np.shape(i.lora_a)[1]) for p, i in inits.items()}
    return inits, info


def step_seconds(history: list[dict], cfg: TrainConfig) -> float:
    """Median seconds per training step over the logged intervals after the first (which holds
    the compilation), from their ``tokens_per_s``."""
    records = history[1:] or history
    return float(np.median([cfg.batch_size * cfg.seq_len / r["tokens_per_s"] for r in records]))


def fresh_train_dir(out: Path, key: dict) -> None:
    """Remove ``out/train`` unless it was started under ``key`` (then it resumes)."""
    stamp = out / "train_key.json"
    out.mkdir(parents=True, exist_ok=True)
    if stamp.exists() and json.loads(stamp.read_text()) != key:
        shutil.rmtree(out / "train", ignore_errors=True)
    atomic_write_json(stamp, key)


def finetune_row(exp: Experiment, method: str, rank: int, out: Path, key: dict) -> dict:
    """Initialise, train (resumable) and score one method at one budget."""
    cfg = exp.cfg
    print(f"== {method} rank {rank} ==", flush=True)
    inits, info = initialise(exp, method, rank)
    graphdef, params = adapt_params(exp.graphdef, exp.params, inits)
    trainable = adapter_param_count(nnx.merge(graphdef, params))
    if trainable != exp.budget(rank):
        raise RuntimeError(f"{method} has {trainable} trainable scalars at rank {rank}, "
                           f"expected rank·(in + out) summed: {exp.budget(rank)}")
    fresh_train_dir(out, key)
    result = train(exp.config, exp.corpus(cfg.corpus), out / "train", cfg.train,
                   default_optimizer(cfg.train), trainable=AdapterParam, init=params,
                   graphdef=graphdef, tokenizer=exp.tokenizer)
    adapted = exp.perplexities(result.params, make_nll_sum(graphdef), keys=("ppl",))["ppl"]
    model = nnx.merge(graphdef, result.params)
    merge_adapters(model)
    after = exp.perplexities(nnx.to_pure_dict(nnx.state(model)))
    print(f"{method} rank {rank}: ppl {after['ppl']:.3f}", flush=True)
    return {"method": method, "rank": rank, "trainable": trainable, **info,
            "after_ppl": after, "adapted_ppl": adapted,
            "step_seconds": step_seconds(result.history, cfg.train),
            "final_train_loss": result.history[-1]["loss"],
            "train_curve": [[r["step"], r["loss"]] for r in result.history if "loss" in r],
            "command": exp.command}


def finetune_rows(exp: Experiment, compute: bool) -> tuple[dict | None, list[dict]]:
    """The pretrained row and every (rank, method) row (computed, or only the cached ones)."""
    path, key = exp.rows / "pretrained.json", row_key(exp.cfg, "pretrained")
    pretrained = get_row(path, key, lambda: {"ppl": exp.perplexities(exp.params)}, compute)
    rows = []
    for rank in parse_list("ranks", exp.cfg.ranks, int):
        for method in parse_list("methods", exp.cfg.methods, str):
            out = exp.root / f"{method}-r{rank}"
            key = row_key(exp.cfg, method, rank=rank)
            row = get_row(exp.rows / f"{method}-r{rank}.json", key,
                          lambda m=method, r=rank, o=out, k=key:
                          finetune_row(exp, m, r, o, k), compute)
            rows += [row] if row else []
    return pretrained, rows


def main(argv: list[str] | None = None) -> dict:
    """Compute (or read from the cache) the requested part(s); write the summary, results.json
    and the rank plot; return ``{"compressors", "pretrained", "finetune", ...}``."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(SparcConfig, argv)
    exp = Experiment(cfg, argv)
    atomic_write_json(exp.root / "config.json", to_dict(cfg))
    result = {"command": exp.command, "config": to_dict(cfg),
              "n_layers": exp.config.n_layers, "kernels": len(exp.paths),
              "model_params": sum(int(np.size(x)) for x in jax.tree.leaves(exp.params))}
    result["compressors"] = compressor_rows(exp, cfg.part in ("all", "compressors"))
    result["pretrained"], result["finetune"] = finetune_rows(exp, cfg.part in ("all",
                                                                               "finetune"))
    write_outputs(cfg, exp.root, result)
    return result


if __name__ == "__main__":
    main()
