"""Plots and the markdown summary of :mod:`experiments.salaad`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.runs import markdown_table

KIND_COLORS = {"embed": "tab:red", "attn": "tab:blue", "mlp": "tab:green"}
TOLERANCE = 0.25  # "targets reached": within ±25 % of Γ̂ and Υ̂


def block_kind(path: str) -> str:
    """``"embed"``, ``"attn"`` or ``"mlp"`` from a block path."""
    return "embed" if path.startswith("embed") else "attn" if "/attn/" in path else "mlp"


def final_block_metrics(history: list[dict]) -> dict[str, dict[str, float]]:
    """``{block: {metric: value}}`` of the last logged record carrying per-block metrics."""
    for record in reversed(history):
        blocks: dict[str, dict[str, float]] = {}
        for key, value in record.items():
            if key.endswith(("/rank_ratio", "/density", "/residual")):
                block, metric = key.rsplit("/", 1)
                blocks.setdefault(block, {})[metric] = value
        if blocks:
            return blocks
    return {}


def tail_block_means(history: list[dict], tail: float = 0.1) -> dict[str, dict[str, float]]:
    """``{block: {metric: mean}}`` over the records of the last ``tail`` fraction of steps (the
    stage-to-stage jitter of a snapshot averaged out)."""
    last = history[-1]["step"] if history else 0
    sums: dict[str, dict[str, list[float]]] = {}
    for record in history:
        if record["step"] > last * (1 - tail):
            for key, value in record.items():
                if key.endswith(("/rank_ratio", "/density")):
                    block, metric = key.rsplit("/", 1)
                    sums.setdefault(block, {}).setdefault(metric, []).append(value)
    return {b: {m: sum(v) / len(v) for m, v in ms.items()} for b, ms in sums.items()}


def _within(blocks: dict, metric: str, target: float) -> int:
    return sum(abs(b[metric] - target) <= TOLERANCE * target for b in blocks.values())


def target_report(history: list[dict], target_rank: float, target_density: float) -> dict:
    """How many blocks end within ±25 % of each target (at the last logged stage 2, and as the
    mean over the last 10 % of steps), with the ranges of both measures at the end."""
    blocks, means = final_block_metrics(history), tail_block_means(history)
    ranks = [b["rank_ratio"] for b in blocks.values()]
    dens = [b["density"] for b in blocks.values()]
    return {"blocks": len(blocks), "rank_within": _within(blocks, "rank_ratio", target_rank),
            "density_within": _within(blocks, "density", target_density),
            "tail_rank_within": _within(means, "rank_ratio", target_rank),
            "tail_density_within": _within(means, "density", target_density),
            "rank_range": [min(ranks), max(ranks)] if ranks else None,
            "density_range": [min(dens), max(dens)] if dens else None}


def plot_blocks(history: list[dict], path: Path, targets: tuple[float, float]) -> None:
    """Per-block effective-rank ratio, density and residual over training, with the targets."""
    keys = sorted({k.rsplit("/", 1)[0] for r in history for k in r if k.endswith("/rank_ratio")})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    for ax, metric, title in zip(axes, ("rank_ratio", "density", "residual"),
                                 ("effective-rank ratio of L (σ² share)", "density of S",
                                  "‖X − L − S‖ / ‖X‖")):
        for block in keys:
            pts = [(r["step"], r[f"{block}/{metric}"]) for r in history
                   if f"{block}/{metric}" in r]
            if pts:
                ax.plot(*zip(*pts), color=KIND_COLORS[block_kind(block)], alpha=0.5, lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
    for ax, target in zip(axes, targets):
        ax.axhspan(target * (1 - TOLERANCE), target * (1 + TOLERANCE), color="gray", alpha=0.2)
        ax.axhline(target, color="black", ls="--", lw=1)
    axes[2].set_yscale("log")
    handles = [plt.Line2D([], [], color=c, label=k) for k, c in
               (("embedding", "tab:red"), ("attention", "tab:blue"), ("MLP", "tab:green"))]
    axes[0].legend(handles=handles)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """Train loss of every run and the mean residual of the constrained ones over steps."""
    fig, (ax_loss, ax_res) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in histories.items():
        ax_loss.plot([r["step"] for r in history], [r["loss"] for r in history], label=label,
                     lw=1)
        pts = [(r["step"], r["admm/residual_mean"]) for r in history if "admm/residual_mean" in r]
        if pts:
            ax_res.plot(*zip(*pts), label=label)
    ax_loss.set(xlabel="step", ylabel="train loss", title="training loss")
    ax_res.set(xlabel="step", ylabel="mean ‖X − L − S‖ / ‖X‖", title="constraint residual",
               yscale="log")
    ax_loss.legend()
    ax_res.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_budget(rows: list[dict], labels: list[str], reference: tuple[str, float],
                path: Path) -> None:
    """Perplexity against the budget (fraction of the constrained parameters), one line per
    surrogate × allocation."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label in labels:
        ax.plot([r["budget"] for r in rows], [r[f"{label}_ppl"] for r in rows], "o-",
                label=label, ms=4)
    ax.axhline(reference[1], color="gray", ls="--", label=reference[0])
    ax.set_xlabel("budget (fraction of the constrained blocks' dense parameters)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _structure_lines(result: dict, cfg) -> str:
    t = result["targets"]
    ctrl = cfg.controller
    lines = (f"- controller targets at the end of training ({t['blocks']} blocks, ±25 %): "
             f"effective-rank ratio within [{0.75 * ctrl.target_rank_ratio:.4g}, "
             f"{1.25 * ctrl.target_rank_ratio:.4g}] for **{t['rank_within']}/{t['blocks']}** "
             f"(range {t['rank_range'][0]:.3f}–{t['rank_range'][1]:.3f}); density within "
             f"[{0.75 * ctrl.target_density:.4g}, {1.25 * ctrl.target_density:.4g}] for "
             f"**{t['density_within']}/{t['blocks']}** (range {t['density_range'][0]:.4f}–"
             f"{t['density_range'][1]:.4f}); averaged over the last 10 % of steps: rank "
             f"{t['tail_rank_within']}/{t['blocks']}, density "
             f"{t['tail_density_within']}/{t['blocks']}\n") if t["blocks"] else ""
    for label, stats in result["surrogates"].items():
        lines += (f"- {label} surrogate: mean exact rank ratio {stats['mean_rank_ratio']:.3f}, "
                  f"mean density {stats['mean_density']:.4f}\n")
    return lines


def summary_markdown(result: dict, cfg, corpus_name: str, command: str) -> str:
    """The run's ``summary.md``: setup, structure reached, timings and the budget table."""
    rows, timings, labels = result["budgets"], result["timings_s"], result["labels"]
    table = markdown_table(
        ["budget (constrained)", "budget (all params)"]
        + [h for label in labels for h in (f"{label} params", f"{label} ppl")],
        [[f"{r['budget']:.0%}", f"{r['fraction_of_all']:.1%}"]
         + [v for label in labels for v in (f"{r[f'{label}_params']:,}", r[f"{label}_ppl"])]
         for r in rows])
    ramp = (f"sigmoid ρ ramp ×{cfg.ramp_factor:g} centred at step {cfg.ramp_center:g} (width "
            f"{cfg.ramp_width:g})" if cfg.ramp_factor != 1 else "constant ρ")
    dense_line = (f"- dense model: validation perplexity {result['dense_val_ppl']:.2f}, final "
                  f"train loss {result['dense_final_train_loss']:.4f}; training "
                  f"{timings['dense_train_s']:.0f}s\n" if "dense_val_ppl" in result else "")
    return (
        f"# SALAAD ({cfg.model} on {corpus_name})\n\n"
        f"Command: `{command.strip()}`\n\n"
        f"{cfg.train.steps} steps, batch {cfg.train.batch_size} × {cfg.train.seq_len} tokens, "
        f"seed {cfg.train.seed}, {cfg.coupling} coupling, ρ = {cfg.rho:g} "
        f"(embedding ×{cfg.embed_rho_ratio}, scaling `{cfg.rho_scaling}`), {ramp}, K = "
        f"{cfg.interval}, targets Γ̂ = {cfg.controller.target_rank_ratio}, "
        f"Υ̂ = {cfg.controller.target_density}, gains Δα = {cfg.controller.alpha_step:g}, "
        f"Δβ = {cfg.controller.beta_step:g}, SVD back-end `{cfg.svd}`, κ = {cfg.kappa}.\n\n"
        f"- {result['dense_params']:,} parameters, {result['constrained_params']:,} of them in "
        f"the constrained blocks ({result['constrained_params'] / result['dense_params']:.1%})\n"
        + dense_line +
        f"- SALAAD dense weights X: validation perplexity "
        f"{result['salaad_dense_weights_val_ppl']:.2f}, final train loss "
        f"{result['salaad_final_train_loss']:.4f}; training {timings['salaad_train_s']:.0f}s\n"
        + _structure_lines(result, cfg) +
        "\nValidation perplexity after deployment at each budget. The budget is a fraction of "
        "the constrained blocks' dense parameters (the rest of the model is kept dense); the "
        "second column gives the same model as a fraction of all parameters. `hpa`: Homomorphic "
        "Parameter Allocation; `sensitivity`: the diagonal-Fisher allocation "
        f"(`admm_jax.salaad.sensitivity`, Fisher from {cfg.fisher_windows} train-split windows "
        f"of {cfg.train.seq_len} tokens). Counts per the convention of "
        f"`admm_jax.salaad.hpa`.\n\n{table}\n"
        "![budget curve](budget.png)\n\n![per-block structure](blocks.png)\n\n"
        "![training curves](curves.png)\n")


def write_results(summary: str, out: Path, results: str) -> None:
    """``summary.md`` in the run, and a copy under ``results/`` with its plots next to it."""
    (out / "summary.md").write_text(summary)
    results_path = Path(results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    for plot in ("budget", "blocks", "curves"):  # results/ is committed; runs/ is not
        shutil.copy(out / f"{plot}.png", results_path.with_name(f"{results_path.stem}_{plot}.png"))
        summary = summary.replace(f"]({plot}.png)", f"]({results_path.stem}_{plot}.png)")
    results_path.write_text(summary)
    print(summary)
    print(f"wrote {out}/summary.md and {results_path}", file=sys.stderr)
