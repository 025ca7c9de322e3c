"""SALAAD vs dense + post-hoc RPCA: training-time SLR induction and elastic deployment.

    python -m experiments.salaad                       # CPU preset (tiny model, minutes)
    python -m experiments.salaad --model 60m --train.steps 10000 --train.batch_size 64 ...

1. Pretrain the same model twice with the same seed, data and steps: dense AdamW, and SALAAD
   (``clip → slr_admm → adamw``), logging per-block effective-rank ratio, density and residual
   ``‖X − L − S‖/‖X‖``.
2. Export the surrogates: SALAAD's L + S from its optimizer state; for the dense model, robust PCA
   (:func:`admm_jax.ops.rpca.rpca`) of every constrained block, post hoc.
3. Deploy both with Homomorphic Parameter Allocation at a sweep of budgets and evaluate validation
   perplexity.

Writes ``runs/<name>/`` (both runs, ``blocks.png``, ``budget.png``, ``summary.md``,
``results.json``) and the table to ``results/salaad.md``.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optax

from admm_jax._checks import check_int, check_real
from admm_jax._io import atomic_write_json
from admm_jax.core import admm_metrics, path_str, select, selected_paths
from admm_jax.data import TokenizedCorpus, corpus_meta, eval_batches, prepare_corpus
from admm_jax.models.llama import LlamaConfig, abstract_params, count_params
from admm_jax.ops.rpca import rpca_tree
from admm_jax.salaad.controller import ControllerConfig
from admm_jax.salaad.hpa import allocate, deploy
from admm_jax.salaad.split import slr_admm, slr_components
from admm_jax.salaad.surrogate import (
    Surrogate,
    block_surrogate,
    has_surrogate,
    load_surrogate,
    save_surrogate,
)
from admm_jax.training import OptimizerConfig, TrainConfig, adamw, train
from admm_jax.training.checkpoint import resolve_checkpoint_dir
from admm_jax.training.lm import make_nll_sum, perplexity
from experiments.cli import parse_config, to_dict
from experiments.runs import markdown_table, run_dir


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
    controller: ControllerConfig = dataclasses.field(default_factory=lambda: ControllerConfig(
        target_rank_ratio=0.15, target_density=0.05, alpha_step=0.003, beta_step=0.0003))
    """Targets and integral gains of the per-block α/β controller."""
    budgets: str = "0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0"
    """Comma-separated HPA parameter budgets (fractions of the dense parameter count)."""
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
        for budget in parse_budgets(self.budgets):
            check_real("budgets", budget, low=0.0, high=1.0, low_open=True)


def parse_budgets(budgets: str) -> list[float]:
    """``"0.3,0.5"`` → ``[0.3, 0.5]``."""
    try:
        return [float(b) for b in budgets.split(",")]
    except ValueError:
        raise ValueError(f"budgets must be comma-separated numbers, got {budgets!r}") from None


def salaad_optimizer(cfg: SalaadConfig) -> optax.GradientTransformation:
    """``clip → slr_admm → adamw`` (``clip → adamw → slr_admm`` with decoupled coupling, where
    ``ρ`` is the fraction of ``X − Z + U`` removed per step); the embedding gets
    ``embed_rho_ratio · ρ`` (official ratio 3e-7 / 1e-6 ≈ 0.3)."""

    def rho(path: str, shape) -> float:
        return cfg.rho * (cfg.embed_rho_ratio if path.startswith("embed") else 1.0)

    induce = slr_admm(rho, interval=cfg.interval, controller=cfg.controller, svd=cfg.svd,
                      rank_cap_ratio=cfg.rank_cap_ratio, coupling=cfg.coupling,
                      halt_on_nonfinite=True)
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


def surrogate_stats(surrogate: Surrogate) -> tuple[float, float]:
    """Mean rank ratio ``r/min(m,n)`` and mean density of the sparse parts."""
    ranks = [b.rank / min(b.shape) for b in surrogate.values()]
    dens = [b.nnz / (b.shape[0] * b.shape[1]) for b in surrogate.values()]
    return sum(ranks) / len(ranks), sum(dens) / len(dens)


def plot_blocks(history: list[dict], path: Path) -> None:
    """Per-block effective-rank ratio, density and residual over training."""
    keys = sorted({k.rsplit("/", 1)[0] for r in history for k in r if k.endswith("/rank_ratio")})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    for ax, metric, title in zip(axes, ("rank_ratio", "density", "residual"),
                                 ("effective-rank ratio of L", "density of S",
                                  "‖X − L − S‖ / ‖X‖")):
        for block in keys:
            pts = [(r["step"], r[f"{block}/{metric}"]) for r in history
                   if f"{block}/{metric}" in r]
            if not pts:
                continue
            kind = ("embed" if block.startswith("embed") else "attn" if "/attn/" in block
                    else "mlp")
            color = {"embed": "tab:red", "attn": "tab:blue", "mlp": "tab:green"}[kind]
            ax.plot(*zip(*pts), color=color, alpha=0.5, lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[2].set_yscale("log")
    handles = [plt.Line2D([], [], color=c, label=k) for k, c in
               (("embedding", "tab:red"), ("attention", "tab:blue"), ("MLP", "tab:green"))]
    axes[0].legend(handles=handles)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_budget(rows: list[dict], dense_ppl: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["budget"] for r in rows], [r["salaad_ppl"] for r in rows], "o-",
            label="SALAAD + HPA")
    ax.plot([r["budget"] for r in rows], [r["rpca_ppl"] for r in rows], "s-",
            label="dense + post-hoc RPCA + HPA")
    ax.axhline(dense_ppl, color="gray", ls="--", label="dense model")
    ax.set_xlabel("parameter budget (fraction of dense)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
                      out: Path, timings: dict) -> tuple[Surrogate, Surrogate]:
    """``(SALAAD surrogate, post-hoc RPCA surrogate)``, saved next to each run's checkpoint
    once (a rerun loads them) and loaded back from disk."""
    salaad_ckpt = resolve_checkpoint_dir(out / "salaad")
    if not has_surrogate(salaad_ckpt):
        comps = slr_components(salaad.opt_state)
        save_surrogate(salaad_ckpt, {p: block_surrogate(L, S) for p, (L, S) in comps.items()},
                       meta={"method": "salaad", **corpus_meta(corpus)})
    dense_ckpt = resolve_checkpoint_dir(out / "dense")
    if not has_surrogate(dense_ckpt):
        print("== post-hoc RPCA of the dense model ==", file=sys.stderr)
        t0 = time.perf_counter()
        save_surrogate(dense_ckpt, rpca_surrogate(dense.params, cfg),
                       meta={"method": "rpca", **corpus_meta(corpus)})
        timings["rpca_s"] = time.perf_counter() - t0
    return load_surrogate(salaad_ckpt), load_surrogate(dense_ckpt)


def budget_rows(budgets: list[float], kappa: float, val_ppl, deployed: dict) -> list[dict]:
    """One row per budget: HPA allocation (params, φ) and perplexity of every deployed
    ``{label: (params, surrogate)}``."""
    rows = []
    for budget in budgets:
        row = {"budget": budget}
        for label, (params, sur) in deployed.items():
            alloc = allocate(sur, budget, kappa, params=params)
            row[f"{label}_params"] = alloc.params
            row[f"{label}_phi"] = (alloc.phi_low_rank, alloc.phi_sparse)
            row[f"{label}_ppl"] = val_ppl(deploy(params, sur, alloc))
        rows.append(row)
        print(f"budget {budget:.2f}: SALAAD {row['salaad_ppl']:.2f} "
              f"({row['salaad_params']:,} params), RPCA {row['rpca_ppl']:.2f} "
              f"({row['rpca_params']:,} params)", file=sys.stderr)
    return rows


def summary_markdown(result: dict, cfg: SalaadConfig, corpus_name: str, command: str) -> str:
    """The run's ``summary.md``: setup, surrogate statistics, timings and the budget table."""
    rows, timings = result["budgets"], result["timings_s"]
    s_rank, s_dens = result["salaad_surrogate"].values()
    r_rank, r_dens = result["rpca_surrogate"].values()
    table = markdown_table(
        ["budget", "SALAAD params", "SALAAD ppl", "RPCA params", "RPCA ppl"],
        [[f"{r['budget']:.0%}", f"{r['salaad_params']:,}", r["salaad_ppl"],
          f"{r['rpca_params']:,}", r["rpca_ppl"]] for r in rows])
    gap = result["salaad_final_train_loss"] - result["dense_final_train_loss"]
    return (
        f"# SALAAD vs dense + post-hoc RPCA ({cfg.model} on {corpus_name})\n\n"
        f"Command: `{command.strip()}`\n\n"
        f"{cfg.train.steps} steps, batch {cfg.train.batch_size} × {cfg.train.seq_len} tokens, "
        f"seed {cfg.train.seed}, ρ = {cfg.rho:g} (embedding ×{cfg.embed_rho_ratio}), K = "
        f"{cfg.interval}, targets Γ̂ = {cfg.controller.target_rank_ratio}, "
        f"Υ̂ = {cfg.controller.target_density}, "
        f"κ = {cfg.kappa}, SVD back-end `{cfg.svd}`.\n\n"
        f"- dense model: {result['dense_params']:,} params, validation perplexity "
        f"{result['dense_val_ppl']:.2f}\n"
        f"- SALAAD dense weights X: validation perplexity "
        f"{result['salaad_dense_weights_val_ppl']:.2f}\n"
        f"- final train loss (mean of the last 10 % of steps): dense "
        f"{result['dense_final_train_loss']:.4f}, SALAAD {result['salaad_final_train_loss']:.4f}"
        f" (gap {gap:+.4f})\n"
        f"- surrogates: SALAAD mean rank ratio {s_rank:.3f}, density {s_dens:.3f}; post-hoc "
        f"RPCA mean rank ratio {r_rank:.3f}, density {r_dens:.3f}\n"
        f"- training wall time (from logged throughput): dense {timings['dense_train_s']:.0f}s, "
        f"SALAAD {timings['salaad_train_s']:.0f}s"
        + (f"; post-hoc RPCA {timings['rpca_s']:.0f}s" if "rpca_s" in timings else "")
        + "\n\n"
        f"Validation perplexity after HPA deployment at each budget (fraction of the dense "
        f"parameter count; counts per the convention of `admm_jax.salaad.hpa`):\n\n{table}\n"
        f"![budget curve](budget.png)\n\n![per-block structure](blocks.png)\n")


def write_results(summary: str, out: Path, results: str) -> None:
    """``summary.md`` in the run, and a copy under ``results/`` with its plots next to it."""
    (out / "summary.md").write_text(summary)
    results_path = Path(results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    for plot in ("budget", "blocks"):  # results/ is committed; runs/ is not
        shutil.copy(out / f"{plot}.png", results_path.with_name(f"{results_path.stem}_{plot}.png"))
        summary = summary.replace(f"]({plot}.png)", f"]({results_path.stem}_{plot}.png)")
    results_path.write_text(summary)
    print(summary)
    print(f"wrote {out}/summary.md and {results_path}", file=sys.stderr)


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

    # 1. the two runs, same seed, data and steps
    print("== dense AdamW ==", file=sys.stderr)
    dense = train(model_config, corpus, out / "dense", cfg.train)
    print("== SALAAD ==", file=sys.stderr)
    salaad = train(model_config, corpus, out / "salaad", cfg.train, salaad_optimizer(cfg),
                   state_metrics=admm_metrics)
    timings = {"dense_train_s": train_seconds(dense.history, cfg.train),
               "salaad_train_s": train_seconds(salaad.history, cfg.train)}
    # 2. surrogates, 3. deployment at every budget
    salaad_sur, rpca_sur = export_surrogates(dense, salaad, cfg, corpus, out, timings)
    rows = budget_rows(parse_budgets(cfg.budgets), cfg.kappa, val_ppl,
                       {"salaad": (salaad.params, salaad_sur), "rpca": (dense.params, rpca_sur)})
    s_rank, s_dens = surrogate_stats(salaad_sur)
    r_rank, r_dens = surrogate_stats(rpca_sur)
    result = {
        "dense_params": count_params(abstract), "dense_val_ppl": val_ppl(dense.params),
        "salaad_dense_weights_val_ppl": val_ppl(salaad.params),
        "dense_final_train_loss": final_train_loss(dense.history),
        "salaad_final_train_loss": final_train_loss(salaad.history),
        "salaad_surrogate": {"mean_rank_ratio": s_rank, "mean_density": s_dens},
        "rpca_surrogate": {"mean_rank_ratio": r_rank, "mean_density": r_dens},
        "budgets": rows, "timings_s": timings, "config": to_dict(cfg)}
    atomic_write_json(out / "results.json", result)
    plot_blocks(salaad.history, out / "blocks.png")
    plot_budget(rows, result["dense_val_ppl"], out / "budget.png")
    command = "python -m experiments.salaad " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    write_results(summary_markdown(result, cfg, corpus.name, command), out, cfg.results)
    return result


if __name__ == "__main__":
    main()
