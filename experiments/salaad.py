"""SALAAD vs dense + post-hoc RPCA: training-time SLR induction and elastic deployment.

    python -m experiments.salaad                       # CPU preset (tiny model)
    python -m experiments.salaad --coupling gradient --rho_scaling shape --rho 4 ...
    python -m experiments.salaad --model 60m --train.steps 10000 --train.batch_size 64 ...

1. Pretrain the same model twice with the same seed, data and steps: dense AdamW, and SALAAD
   (decoupled: ``clip → adamw → slr_admm``; gradient coupling: ``clip → slr_admm → adamw``),
   logging per-block effective-rank ratio (σ² share), density and residual ``‖X − L − S‖/‖X‖``.
   ``--baseline false`` trains SALAAD only (for tuning the controller on training data).
2. Export the surrogates: SALAAD's L + S from its optimizer state; for the dense model, robust PCA
   (:func:`admm_jax.ops.rpca.rpca`) of every constrained block, post hoc.
3. Deploy each surrogate at a sweep of budgets — fractions of the constrained blocks' dense
   parameters by default (``--relative_to dense`` for fractions of the whole model) — with
   Homomorphic Parameter Allocation and with the sensitivity-aware allocation (diagonal Fisher of
   the full surrogate on train-split windows, :mod:`admm_jax.salaad.sensitivity`), and evaluate
   validation perplexity.

Writes ``runs/<name>/`` (the runs, ``blocks.png``, ``budget.png``, ``curves.png``, ``summary.md``,
``results.json``) and the summary to ``results``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from admm_jax._checks import check_int, check_real
from admm_jax._io import atomic_write_json
from admm_jax.core import admm_metrics, path_str, select, selected_paths, sigmoid_ramp
from admm_jax.data import (
    TokenizedCorpus,
    calibration_samples,
    corpus_meta,
    eval_batches,
    prepare_corpus,
)
from admm_jax.models.llama import LlamaConfig, abstract_params, count_params
from admm_jax.ops.rpca import rpca_tree
from admm_jax.salaad.controller import ControllerConfig
from admm_jax.salaad.hpa import allocate, deploy
from admm_jax.salaad.sensitivity import Sensitivity, fisher_diagonal, unit_sensitivity
from admm_jax.salaad.split import slr_admm, slr_components
from admm_jax.salaad.surrogate import (
    Surrogate,
    block_surrogate,
    has_surrogate,
    load_surrogate,
    reconstruct,
    save_surrogate,
    sparse_unit,
)
from admm_jax.training import (
    OptimizerConfig,
    TrainConfig,
    adamw,
    relative_lr_schedule,
    train,
)
from admm_jax.training.checkpoint import resolve_checkpoint_dir
from admm_jax.training.lm import make_nll_sum, next_token_loss, perplexity
from experiments.cli import parse_config, to_dict
from experiments.runs import run_dir
from experiments.salaad_report import (
    plot_blocks,
    plot_budget,
    plot_curves,
    summary_markdown,
    target_report,
    write_results,
)

Strategy = Literal["homomorphic", "sensitivity"]
STRATEGY_LABEL = {"homomorphic": "hpa", "sensitivity": "sensitivity"}


@dataclasses.dataclass(frozen=True)
class SalaadConfig:
    """SALAAD vs dense + RPCA on one model and corpus (see module docstring)."""

    name: str = "salaad-tiny"
    """Run name: outputs go to RUNS_ROOT/NAME (re-running the same name resumes)."""
    model: str = "tiny"
    """Model preset trained from scratch (admm_jax.models.llama.PRESETS)."""
    corpus: str = "shakespeare"
    """Corpus name (shakespeare, kjv) or a directory / file of .txt documents."""
    runs_root: str = "runs"
    """Directory that holds the run directories."""
    results: str = "results/salaad.md"
    """Markdown results table (plots are copied next to it)."""
    rho: float = 0.1
    """ADMM penalty ρ (with decoupled coupling: the fraction of X − Z + U removed per step)."""
    embed_rho_ratio: float = 0.3
    """ρ of the token embedding as a fraction of RHO (official 3e-7 / 1e-6 ≈ 0.3)."""
    interval: int = 2
    """Steps between ADMM stage-2 updates (prox of L and S, dual update, controller)."""
    svd: Literal["exact", "subspace"] = "subspace"
    """Nuclear-norm prox back-end: full SVD or warm-started subspace iteration."""
    rank_cap_ratio: float = 0.5
    """Subspace-iteration rank cap as a fraction of min(rows, cols)."""
    coupling: Literal["gradient", "decoupled"] = "decoupled"
    """Add ρ(X − Z + U) to the gradient before AdamW, or pull X toward Z after AdamW."""
    decoupled_schedule: Literal["lr", "constant"] = "constant"
    """η_t of the decoupled pull η_t·ρ(X − Z + U): 'constant' = 1, 'lr' = the learning-rate
    schedule divided by its peak, so the pull keeps its ratio to AdamW's step (which bounds how
    hard the loss can hold a thresholded entry, ≈ lr_t per step) through warm-up and decay."""
    rho_scaling: Literal["none", "shape"] = "none"
    """'shape': SALAAD's law ρ_b = RHO / (n_layers·√(m·n)) per block."""
    ramp_factor: float = 5.0
    """Final ρ multiplier of SALAAD's sigmoid ramp (1 = constant ρ; official 10 with gradient
    coupling; ×5 keeps the decoupled pull ρ ≤ 0.5 of X − Z + U per step)."""
    ramp_center: float = 400.0
    """Step at the ramp's midpoint (official: 2,000)."""
    ramp_width: float = 20.0
    """Steps per unit of the ramp's logistic argument (official: 100)."""
    init_rank_ratio: float | None = None
    """Rank of L₀ as a fraction of min(m, n); None = the target rank ratio (official)."""
    sparse_structure: str = "unstructured"
    """Structure of the sparse part S: unstructured (ℓ1 prox, entries) or blockB, e.g.
    block16 (tile soft-threshold; whole b × b tiles, surrogates and compact deployments in
    tiles; the controller's target density is then a fraction of tiles)."""
    controller: ControllerConfig = dataclasses.field(default_factory=ControllerConfig)
    """Targets and gains of the per-block α/β controller (official: Γ̂ = 0.15, Υ̂ = 0.05,
    Δα = 0.2, Δβ = 0.002 — steps of the thresholds α/ρ, β/ρ per unit of rate error)."""
    baseline: bool = True
    """Also train the dense model and deploy its post-hoc RPCA surrogate."""
    budgets: str = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0"
    """Comma-separated deployment budgets (fractions, see RELATIVE_TO)."""
    relative_to: Literal["constrained", "dense"] = "constrained"
    """Budgets as fractions of the constrained blocks' dense parameters, or of all parameters."""
    strategies: str = "homomorphic,sensitivity"
    """Comma-separated allocations: homomorphic (HPA), sensitivity (diagonal Fisher)."""
    fisher_windows: int = 32
    """Train-split windows (one per batch, TRAIN.SEQ_LEN tokens) of the Fisher estimate."""
    kappa: float = 0.5
    """HPA mixing coefficient: share of the reduction taken from the low-rank parts."""
    rpca_max_iter: int = 100
    """Iterations of the post-hoc robust PCA of the dense model."""
    rpca_tol: float = 1e-5
    """Relative residual at which robust PCA stops."""
    eval_batches: int = 0
    """Validation batches per deployed model; 0 = the whole validation split."""
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=600, batch_size=16, seq_len=128, eval_every=200, eval_batches=8,
        checkpoint_every=200, optimizer=OptimizerConfig(lr=3e-3, warmup_steps=50)))
    """Training loop and AdamW settings, shared by the dense and the SALAAD run."""

    def __post_init__(self):
        check_real("rho", self.rho, low=0.0, low_open=True)
        check_real("embed_rho_ratio", self.embed_rho_ratio, low=0.0)
        check_int("interval", self.interval, minimum=1)
        check_real("rank_cap_ratio", self.rank_cap_ratio, low=0.0, high=1.0, low_open=True)
        check_real("kappa", self.kappa, low=0.0, high=1.0)
        check_int("rpca_max_iter", self.rpca_max_iter, minimum=1)
        check_int("eval_batches", self.eval_batches, minimum=0)
        check_int("fisher_windows", self.fisher_windows, minimum=1)
        check_real("ramp_factor", self.ramp_factor, low=0.0, low_open=True)
        for budget in parse_budgets(self.budgets):
            check_real("budgets", budget, low=0.0, high=1.0, low_open=True)
        parse_strategies(self.strategies)
        sparse_unit(self.sparse_structure)


def parse_budgets(budgets: str) -> list[float]:
    """``"0.3,0.5"`` → ``[0.3, 0.5]``."""
    try:
        return [float(b) for b in budgets.split(",")]
    except ValueError:
        raise ValueError(f"budgets must be comma-separated numbers, got {budgets!r}") from None


def parse_strategies(strategies: str) -> list[Strategy]:
    """``"homomorphic,sensitivity"`` → the list, validated."""
    out = [s.strip() for s in strategies.split(",") if s.strip()]
    bad = [s for s in out if s not in STRATEGY_LABEL]
    if not out or bad:
        raise ValueError(f"strategies must be a comma-separated subset of "
                         f"{sorted(STRATEGY_LABEL)}, got {strategies!r}")
    return out


def salaad_optimizer(cfg: SalaadConfig, n_layers: int,
                     mask: str | None = None) -> optax.GradientTransformation:
    """``clip → slr_admm → adamw`` (``clip → adamw → slr_admm`` with decoupled coupling, where
    ``ρ`` is the fraction of ``X − Z + U`` removed per step); the embedding gets
    ``embed_rho_ratio · ρ`` (official ratio 3e-7 / 1e-6 ≈ 0.3); SALAAD's sigmoid ρ ramp unless
    ``ramp_factor`` is 1. ``mask``: a path pattern of the constrained leaves (default: the
    decoder-layer kernels and the token embedding)."""

    def rho(path: str, shape) -> float:
        return cfg.rho * (cfg.embed_rho_ratio if path.startswith("embed") else 1.0)

    ramp = (sigmoid_ramp(cfg.ramp_center, cfg.ramp_width, cfg.ramp_factor)
            if cfg.ramp_factor != 1 else None)
    induce = slr_admm(rho, interval=cfg.interval, mask=mask, controller=cfg.controller,
                      svd=cfg.svd,
                      rank_cap_ratio=cfg.rank_cap_ratio, init_rank_ratio=cfg.init_rank_ratio,
                      rho_scaling=cfg.rho_scaling, n_layers=n_layers, rho_schedule=ramp,
                      sparse_structure=cfg.sparse_structure,
                      coupling=cfg.coupling, halt_on_nonfinite=True,
                      decoupled_lr=relative_lr_schedule(cfg.train)
                      if cfg.decoupled_schedule == "lr" else 1.0)
    clip = optax.clip_by_global_norm(cfg.train.optimizer.grad_clip)
    if cfg.coupling == "decoupled":  # pull after the base optimizer, like decoupled decay
        return optax.chain(clip, adamw(cfg.train), induce)
    return optax.chain(clip, induce, adamw(cfg.train))


def rpca_surrogate(params, cfg: SalaadConfig) -> Surrogate:
    """Post-hoc baseline: robust PCA of every block SALAAD would constrain."""
    paths = set(selected_paths(params, select(params)))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    blocks = {path_str(p): x for p, x in flat if path_str(p) in paths}
    results = rpca_tree(blocks, max_iter=cfg.rpca_max_iter, tol=cfg.rpca_tol)
    return {p: block_surrogate(r.low_rank, r.sparse) for p, r in results.items()}


def surrogate_stats(surrogate: Surrogate) -> dict[str, float]:
    """Mean exact rank ratio ``r/min(m,n)`` and mean density of the sparse parts."""
    ranks = [b.rank / min(b.shape) for b in surrogate.values()]
    dens = [b.nnz / (b.shape[0] * b.shape[1]) for b in surrogate.values()]
    return {"mean_rank_ratio": sum(ranks) / len(ranks), "mean_density": sum(dens) / len(dens)}


def surrogate_sensitivity(graphdef, params, surrogate: Surrogate, windows: np.ndarray
                          ) -> Sensitivity:
    """Unit sensitivities of ``surrogate`` from the diagonal Fisher of its full reconstruction
    (every triplet and entry kept, whatever that costs) over ``windows`` (one window per
    batch)."""

    def full(path, x):
        block = surrogate.get(path_str(path))
        return x if block is None else jnp.asarray(reconstruct(block), x.dtype)

    fisher = fisher_diagonal(lambda p, b: next_token_loss(graphdef, p, b),
                             jax.tree_util.tree_map_with_path(full, params),
                             (w[None] for w in windows))
    return unit_sensitivity(surrogate, fisher)


def train_seconds(history: list[dict], cfg: TrainConfig) -> float:
    """Training wall time reconstructed from the logged throughput (survives resumption)."""
    tokens_per_step = cfg.batch_size * cfg.seq_len
    total, prev = 0.0, 0
    for r in history:
        total += (r["step"] - prev) * tokens_per_step / r["tokens_per_s"]
        prev = r["step"]
    return total


def final_train_loss(history: list[dict], tail: float = 0.1) -> float:
    """Mean logged train loss over the last ``tail`` fraction of steps."""
    last = history[-1]["step"]
    window = [r["loss"] for r in history if r["step"] > last * (1 - tail)]
    return sum(window) / len(window)


def export_surrogates(dense, salaad, cfg: SalaadConfig, corpus: TokenizedCorpus,
                      out: Path, timings: dict) -> tuple[Surrogate, Surrogate | None]:
    """``(SALAAD surrogate, post-hoc RPCA surrogate or None without a dense run)``, saved next
    to each run's checkpoint once (a rerun loads them) and loaded back from disk."""
    salaad_ckpt = resolve_checkpoint_dir(out / "salaad")
    if not has_surrogate(salaad_ckpt):
        comps = slr_components(salaad.opt_state)
        save_surrogate(salaad_ckpt, {p: block_surrogate(L, S, sparse_structure=cfg.sparse_structure)
                                     for p, (L, S) in comps.items()},
                       meta={"method": "salaad", **corpus_meta(corpus)})
    if dense is None:
        return load_surrogate(salaad_ckpt), None
    dense_ckpt = resolve_checkpoint_dir(out / "dense")
    if not has_surrogate(dense_ckpt):
        print("== post-hoc RPCA of the dense model ==", file=sys.stderr)
        t0 = time.perf_counter()
        save_surrogate(dense_ckpt, rpca_surrogate(dense.params, cfg),
                       meta={"method": "rpca", **corpus_meta(corpus)})
        timings["rpca_s"] = time.perf_counter() - t0
    return load_surrogate(salaad_ckpt), load_surrogate(dense_ckpt)


def budget_rows(budgets: list[float], cfg: SalaadConfig, val_ppl, deployed: dict,
                sensitivities: dict) -> list[dict]:
    """One row per budget: for every surrogate ``{name: (params, surrogate)}`` and strategy,
    the allocation's exact parameter count, kept fractions and the deployed perplexity (column
    prefix ``<name>-<hpa|sensitivity>``)."""
    rows = []
    for budget in budgets:
        row: dict = {"budget": budget}
        for name, (params, sur) in deployed.items():
            for strategy in parse_strategies(cfg.strategies):
                label = f"{name}-{STRATEGY_LABEL[strategy]}"
                alloc = allocate(sur, budget, cfg.kappa, params=params, strategy=strategy,
                                 sensitivity=sensitivities[name] if strategy == "sensitivity"
                                 else None, relative_to=cfg.relative_to)
                row["fraction_of_all"] = alloc.budget / alloc.dense_params
                row[f"{label}_params"] = alloc.params
                row[f"{label}_phi"] = (alloc.phi_low_rank, alloc.phi_sparse)
                row[f"{label}_ppl"] = val_ppl(deploy(params, sur, alloc))
                print(f"budget {budget:.2f} {label}: ppl {row[f'{label}_ppl']:.2f} "
                      f"({alloc.params:,} params)", file=sys.stderr)
        rows.append(row)
    return rows

def train_runs(cfg: SalaadConfig, model_config: LlamaConfig, corpus: TokenizedCorpus,
               out: Path):
    """``(dense result or None, SALAAD result)``: same seed, data and steps."""
    dense = None
    if cfg.baseline:
        print("== dense AdamW ==", file=sys.stderr)
        dense = train(model_config, corpus, out / "dense", cfg.train)
    print("== SALAAD ==", file=sys.stderr)
    salaad = train(model_config, corpus, out / "salaad", cfg.train,
                   salaad_optimizer(cfg, model_config.n_layers), state_metrics=admm_metrics)
    return dense, salaad


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(SalaadConfig, argv)
    out = run_dir(cfg.runs_root, cfg.name)
    atomic_write_json(out / "config.json", to_dict(cfg))
    model_config = LlamaConfig.preset(cfg.model)
    corpus: TokenizedCorpus = prepare_corpus(cfg.corpus, vocab_size=model_config.vocab_size)
    graphdef, abstract = abstract_params(model_config)
    nll_sum = make_nll_sum(graphdef)

    def val_ppl(params) -> float:
        return perplexity(nll_sum, params, eval_batches(
            corpus.val, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
            max_batches=cfg.eval_batches or None))

    # 1. the runs, 2. surrogates
    dense, salaad = train_runs(cfg, model_config, corpus, out)
    timings = {"salaad_train_s": train_seconds(salaad.history, cfg.train)}
    salaad_sur, rpca_sur = export_surrogates(dense, salaad, cfg, corpus, out, timings)
    deployed = {"salaad": (salaad.params, salaad_sur)}
    result = {"dense_params": count_params(abstract),
              "constrained_params": sum(b.shape[0] * b.shape[1] for b in salaad_sur.values()),
              "salaad_dense_weights_val_ppl": val_ppl(salaad.params),
              "salaad_final_train_loss": final_train_loss(salaad.history),
              "targets": target_report(salaad.history, cfg.controller.target_rank_ratio,
                                       cfg.controller.target_density),
              "surrogates": {"SALAAD": surrogate_stats(salaad_sur)}}
    if dense is not None:
        timings["dense_train_s"] = train_seconds(dense.history, cfg.train)
        deployed["rpca"] = (dense.params, rpca_sur)
        result.update(dense_val_ppl=val_ppl(dense.params),
                      dense_final_train_loss=final_train_loss(dense.history))
        result["surrogates"]["post-hoc RPCA"] = surrogate_stats(rpca_sur)
    # 3. deployment at every budget and strategy
    windows = calibration_samples(corpus, cfg.fisher_windows, cfg.train.seq_len + 1,
                                  seed=cfg.train.seed)
    sensitivities = ({name: surrogate_sensitivity(graphdef, params, sur, windows)
                      for name, (params, sur) in deployed.items()}
                     if "sensitivity" in parse_strategies(cfg.strategies) else {})
    rows = budget_rows(parse_budgets(cfg.budgets), cfg, val_ppl, deployed, sensitivities)
    labels = [f"{name}-{STRATEGY_LABEL[s]}" for name in deployed
              for s in parse_strategies(cfg.strategies)]
    result.update(budgets=rows, labels=labels, timings_s=timings, config=to_dict(cfg))
    atomic_write_json(out / "results.json", result)
    plot_blocks(salaad.history, out / "blocks.png",
                (cfg.controller.target_rank_ratio, cfg.controller.target_density))
    plot_curves({"SALAAD": salaad.history} | ({"dense": dense.history} if dense else {}),
                out / "curves.png")
    reference = (("dense model", result["dense_val_ppl"]) if dense is not None else
                 ("SALAAD dense weights X", result["salaad_dense_weights_val_ppl"]))
    plot_budget(rows, labels, reference, out / "budget.png")
    command = "python -m experiments.salaad " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    write_results(summary_markdown(result, cfg, corpus.name, command), out, cfg.results)
    return result


if __name__ == "__main__":
    main()
