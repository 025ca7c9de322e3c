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

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optax

from admm_jax.core.admm import admm_metrics
from admm_jax.core.tree import path_str, select, selected_paths
from admm_jax.data import TokenizedCorpus, corpus_meta, eval_batches, prepare_corpus
from admm_jax.models.llama import LlamaConfig, abstract_params, count_params
from admm_jax.ops.rpca import rpca_tree
from admm_jax.salaad.controller import ControllerConfig
from admm_jax.salaad.hpa import allocate, deploy
from admm_jax.salaad.split import slr_admm, slr_components, slr_metrics
from admm_jax.salaad.surrogate import (
    Surrogate,
    block_surrogate,
    has_surrogate,
    load_surrogate,
    save_surrogate,
)
from admm_jax.training.checkpoint import resolve_checkpoint_dir
from admm_jax.training.lm import make_nll_sum, perplexity
from admm_jax.training.loop import TrainConfig, adamw, train
from experiments.cli import parse_config, to_dict
from experiments.runs import markdown_table, run_dir, write_json


@dataclasses.dataclass(frozen=True)
class SalaadConfig:
    """SALAAD vs dense + RPCA on one model and corpus (see module docstring)."""

    name: str = "salaad-tiny"
    model: str = "tiny"
    corpus: str = "shakespeare"
    runs_root: str = "runs"
    results: str = "results/salaad.md"
    rho: float = 0.1
    embed_rho_ratio: float = 0.3
    interval: int = 2
    svd: str = "subspace"
    rank_cap_ratio: float = 0.5
    coupling: str = "decoupled"
    target_rank_ratio: float = 0.15
    target_density: float = 0.05
    alpha_step: float = 0.003
    beta_step: float = 0.0003
    budgets: str = "0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0"
    kappa: float = 0.5
    rpca_max_iter: int = 100
    rpca_tol: float = 1e-5
    eval_batches: int = 0
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=600, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=50, eval_every=200,
        eval_batches=8, checkpoint_every=200))


def salaad_optimizer(cfg: SalaadConfig) -> optax.GradientTransformation:
    """``clip → slr_admm → adamw`` (``clip → adamw → slr_admm`` with decoupled coupling, where
    ``ρ`` is the fraction of ``X − Z + U`` removed per step); the embedding gets
    ``embed_rho_ratio · ρ`` (official ratio 3e-7 / 1e-6 ≈ 0.3)."""
    controller = ControllerConfig(cfg.target_rank_ratio, cfg.target_density, cfg.alpha_step,
                                  cfg.beta_step)

    def rho(path: str, shape) -> float:
        return cfg.rho * (cfg.embed_rho_ratio if path.startswith("embed") else 1.0)

    induce = slr_admm(rho, interval=cfg.interval, controller=controller, svd=cfg.svd,
                      rank_cap_ratio=cfg.rank_cap_ratio, coupling=cfg.coupling,
                      halt_on_nonfinite=True)
    clip = optax.clip_by_global_norm(cfg.train.grad_clip)
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


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(SalaadConfig, argv)
    budgets = [float(b) for b in cfg.budgets.split(",")]
    out = run_dir(cfg.runs_root, cfg.name)
    write_json(out / "config.json", to_dict(cfg))
    model_config = LlamaConfig.preset(cfg.model)
    corpus: TokenizedCorpus = prepare_corpus(cfg.corpus, vocab_size=model_config.vocab_size)
    graphdef, abstract = abstract_params(model_config)
    nll_sum = make_nll_sum(graphdef)

    def val_ppl(params) -> float:
        return perplexity(nll_sum, params, eval_batches(
            corpus.val, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
            max_batches=cfg.eval_batches or None))

    print("== dense AdamW ==", file=sys.stderr)
    dense = train(model_config, corpus, out / "dense", cfg.train)
    print("== SALAAD ==", file=sys.stderr)
    salaad = train(model_config, corpus, out / "salaad", cfg.train, salaad_optimizer(cfg),
                   state_metrics=lambda s: admm_metrics(s, slr_metrics))
    timings = {"dense_train_s": train_seconds(dense.history, cfg.train),
               "salaad_train_s": train_seconds(salaad.history, cfg.train)}

    salaad_ckpt = resolve_checkpoint_dir(out / "salaad")
    if not has_surrogate(salaad_ckpt):
        comps = slr_components(salaad.opt_state)
        save_surrogate(salaad_ckpt, {p: block_surrogate(L, S) for p, (L, S) in comps.items()},
                       meta={"method": "salaad", **corpus_meta(corpus)})
    salaad_sur = load_surrogate(salaad_ckpt)

    dense_ckpt = resolve_checkpoint_dir(out / "dense")
    t0 = time.perf_counter()
    if not has_surrogate(dense_ckpt):
        print("== post-hoc RPCA of the dense model ==", file=sys.stderr)
        save_surrogate(dense_ckpt, rpca_surrogate(dense.params, cfg),
                       meta={"method": "rpca", **corpus_meta(corpus)})
        timings["rpca_s"] = time.perf_counter() - t0
    rpca_sur = load_surrogate(dense_ckpt)

    dense_ppl = val_ppl(dense.params)
    salaad_dense_ppl = val_ppl(salaad.params)
    rows = []
    for budget in budgets:
        row = {"budget": budget}
        for label, params, sur in (("salaad", salaad.params, salaad_sur),
                                   ("rpca", dense.params, rpca_sur)):
            alloc = allocate(sur, budget, cfg.kappa, params=params)
            row[f"{label}_params"] = alloc.params
            row[f"{label}_phi"] = (alloc.phi_low_rank, alloc.phi_sparse)
            row[f"{label}_ppl"] = val_ppl(deploy(params, sur, alloc))
        rows.append(row)
        print(f"budget {budget:.2f}: SALAAD {row['salaad_ppl']:.2f} "
              f"({row['salaad_params']:,} params), RPCA {row['rpca_ppl']:.2f} "
              f"({row['rpca_params']:,} params)", file=sys.stderr)

    dense_count = count_params(abstract)
    s_rank, s_dens = surrogate_stats(salaad_sur)
    r_rank, r_dens = surrogate_stats(rpca_sur)
    result = {
        "dense_params": dense_count, "dense_val_ppl": dense_ppl,
        "salaad_dense_weights_val_ppl": salaad_dense_ppl,
        "dense_final_train_loss": final_train_loss(dense.history),
        "salaad_final_train_loss": final_train_loss(salaad.history),
        "salaad_surrogate": {"mean_rank_ratio": s_rank, "mean_density": s_dens},
        "rpca_surrogate": {"mean_rank_ratio": r_rank, "mean_density": r_dens},
        "budgets": rows, "timings_s": timings, "config": to_dict(cfg)}
    write_json(out / "results.json", result)
    plot_blocks(salaad.history, out / "blocks.png")
    plot_budget(rows, dense_ppl, out / "budget.png")

    command = "python -m experiments.salaad " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    table = markdown_table(
        ["budget", "SALAAD params", "SALAAD ppl", "RPCA params", "RPCA ppl"],
        [[f"{r['budget']:.0%}", f"{r['salaad_params']:,}", r["salaad_ppl"],
          f"{r['rpca_params']:,}", r["rpca_ppl"]] for r in rows])
    gap = result["salaad_final_train_loss"] - result["dense_final_train_loss"]
    summary = (
        f"# SALAAD vs dense + post-hoc RPCA ({cfg.model} on {corpus.name})\n\n"
        f"Command: `{command.strip()}`\n\n"
        f"{cfg.train.steps} steps, batch {cfg.train.batch_size} × {cfg.train.seq_len} tokens, "
        f"seed {cfg.train.seed}, ρ = {cfg.rho:g} (embedding ×{cfg.embed_rho_ratio}), K = "
        f"{cfg.interval}, targets Γ̂ = {cfg.target_rank_ratio}, Υ̂ = {cfg.target_density}, "
        f"κ = {cfg.kappa}, SVD back-end `{cfg.svd}`.\n\n"
        f"- dense model: {dense_count:,} params, validation perplexity {dense_ppl:.2f}\n"
        f"- SALAAD dense weights X: validation perplexity {salaad_dense_ppl:.2f}\n"
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
    (out / "summary.md").write_text(summary)
    results_path = Path(cfg.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    for plot in ("budget", "blocks"):  # results/ is committed; runs/ is not
        shutil.copy(out / f"{plot}.png", results_path.with_name(f"{results_path.stem}_{plot}.png"))
        summary = summary.replace(f"]({plot}.png)", f"]({results_path.stem}_{plot}.png)")
    results_path.write_text(summary)
    print(table)
    print(f"wrote {out}/summary.md and {results_path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
