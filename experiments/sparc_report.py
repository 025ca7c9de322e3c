"""Tables, the rank plot and the summary of :mod:`experiments.sparc`.

The summary (``runs/<name>/summary.md`` and ``results``) holds the exact command, how every
hyperparameter was chosen (:data:`CHOICES`), the compressor table in the layout of RA-SpaRC's
Table 4, the unimodality study of App. C.2, one fine-tuning table per budget, the γ search and
the paths of ``rank_per_layer.png`` (the rank RA-SpaRC chose per layer and projection) and
``curves.png`` (training loss per method and its difference to LoRA's);
``results.json`` holds every row.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from admm_jax._io import atomic_write_json
from admm_jax.adapters import ADAPTABLE
from experiments.runs import markdown_table

LABELS = {"sparc": "SpaRC", "svd": "SVD", "topk": "TopK", "lora": "LoRA",
          "lora-one": "LoRA-One", "rosa": "RoSA", "ra-sparc": "RA-SpaRC"}
COLORS = {"lora": "C0", "lora-one": "C1", "rosa": "C2", "ra-sparc": "C3"}
#: how the hyperparameters and measurements were chosen (formatted with the config)
CHOICES = """\
* Gradients: mini-batches of {grad_batch_size} × {grad_seq_len} tokens from the *train* split
  (data seed {grad_seed}); (a) averages over {n_gradients} of them per corpus, App. C.2 uses the
  first. Every initialisation compresses the first one of `{corpus}` (§3.5: one stochastic
  gradient); RoSA's mask ranks the squared gradients accumulated over all {n_gradients}.
* Budgets: rank r means r·(in + out) trainable scalars per adapted kernel for every method
  (RA-SpaRC Tables 7–8): LoRA / LoRA-One rank r, RoSA rank round({rosa_rank_fraction}·r) plus the
  rest as sparse entries at the top accumulated squared gradients, RA-SpaRC r_max = r split by
  SpaRC per kernel.
* μ = {mu} in M(C) (the paper's standard choice, Table 4).
* α = {alpha} for every method and budget, λ = α / r (the LoRA α of RA-SpaRC Tables 9 and 11).
* γ of LoRA-One and RA-SpaRC: the grid {gammas}, each scored by the mean next-token loss of
  W0 − C(g)/γ on {gamma_batches} train mini-batches that follow the gradient batches (never the
  gradient's own batch, never validation data); the lowest wins. γ only rescales the step
  (A, B ∝ 1/√γ, E ∝ 1/γ), so each compression runs once.
* Training: {steps} steps × {batch_size} × {seq_len} tokens of `{corpus}`'s train split, data
  seed {seed} for every method; AdamW lr {lr:g} (the paper's most frequent NLG rate), β = ({b1},
  {b2}), weight decay {weight_decay} (Tables 9 and 11), {warmup_steps} warm-up steps (~3 %),
  cosine to {min_lr_ratio}·lr, gradient clip {grad_clip}; only adapter parameters train.
* Evaluation: {eval_batches} batches (0 = all) of {eval_batch_size} windows of {eval_seq_len}
  tokens of each domain's validation documents; the fine-tuned rows are scored with the adapters
  merged into dense kernels, the merge gap |ppl(merged)/ppl(adapted) − 1| on `{corpus}` is
  reported.
* Times: compressor seconds per gradient are medians over the gradients (the first includes
  compilation). Initialisation seconds = gradients (one steady-state gradient, timed after
  compilation: ×1 for LoRA-One and RA-SpaRC, ×{n_gradients} for RoSA, ×0 for LoRA) + the wall
  time of the adapter initialisation and insertion (compiling the compressors included); the γ
  search is timed apart. Step seconds: the median over the logged intervals after the first
  (which includes compilation), from tokens/s.
"""


def _fmt(x, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def compressor_table(rows: list[dict]) -> str:
    """Table 4's layout: a row per (budget, compressor), per corpus M(C), the relative squared
    and plain errors and the seconds per gradient."""
    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    ranks = list(dict.fromkeys(r["rank"] for r in rows))
    by = {(r["corpus"], r["rank"]): r for r in rows}
    header = ["compressor (budget)"] + [f"{h} {Path(c).name}" for c in corpora for h in
                                        ("M(C) ↑", "E‖C−g‖²/‖g‖² ↓", "E‖C−g‖/‖g‖", "s/grad")]
    body = []
    for rank in ranks:
        fraction = next(r["budget_fraction"] for r in rows if r["rank"] == rank)
        for kind in ("sparc", "svd", "topk"):
            cells = []
            for c in corpora:
                q = by.get((c, rank), {}).get(kind)
                cells += ([q["metric"], f"{q['rel_sq_error']:.2%}", f"{q['rel_error']:.4f}",
                           f"{q['seconds_per_gradient']:.2f}"] if q else ["–"] * 4)
            body.append([f"{LABELS[kind]} (r = {rank}, {fraction:.3%})", *cells])
    return markdown_table(header, body)


def _study(row: dict) -> list:
    """One line of the unimodality table from a row's per-kernel study."""
    k = list(row["kernels"].values())
    excess = np.array([s["bisect_excess"] for s in k])
    le = [s["sparc_error"] <= min(s["svd_error"], s["topk_error"]) * (1 + 1e-5) + 1e-7
          for s in k]
    return [Path(row["corpus"]).name, row["rank"], len(k),
            f"{np.mean([s['unimodal'] for s in k]):.1%}",
            f"{np.mean([s['bisect_rank'] == s['scan_rank'] for s in k]):.1%}",
            f"{excess.mean():.2e}", f"{excess.max():.2e}",
            f"{np.mean([s['fallback'] for s in k]):.1%}", f"{np.mean(le):.1%}",
            f"{np.mean([s['scan_rank'] == s['r_max'] for s in k]):.1%}",
            f"{np.mean([s['scan_rank'] == 0 for s in k]):.1%}",
            f"{np.mean([s['scan_rank'] / s['r_max'] for s in k]):.2f}",
            f"{sum(s['scan_seconds'] for s in k):.1f}",
            f"{sum(s['bisect_seconds'] for s in k):.1f}"]


def unimodality_table(rows: list[dict]) -> str:
    """App. C.2 per (corpus, budget), over the kernels of the first gradient."""
    header = ["corpus", "r", "kernels", "unimodal curve", "bisection = scan rank",
              "bisection excess mean", "max", "library fell back to scan",
              "SpaRC ≤ min(SVD, TopK)", "rank = r_max", "rank = 0", "mean rank / r_max",
              "scan s", "bisection s"]
    return markdown_table(header, [_study(r) for r in rows])


def _ratio(row: dict, ref: dict | None, field: str) -> str:
    return "–" if ref is None or not ref[field] else f"{row[field] / ref[field]:.2f}×"


def finetune_table(rows: list[dict], domains: dict[str, str], before: dict[str, float]) -> str:
    """One budget: a row per method, perplexities of the pretrained model (``before``), at
    initialisation and after fine-tuning."""
    ref = {r["method"]: r for r in rows}
    header = ["method", "trainable", "γ", *[f"{n} ppl {w}" for n in domains.values()
                                           for w in ("before", "init", "after")],
              "merge gap", "final train loss", "step s", "step vs LoRA", "init s",
              "init vs LoRA-One"]
    body = []
    for r in rows:
        init = r.get("init_ppl")
        cells = [c for d in domains for c in (_fmt(before.get(d)),
                                              _fmt(init[d] if init else None),
                                              r["after_ppl"][d])]
        gap = abs(r["after_ppl"]["ppl"] / r["adapted_ppl"] - 1)
        body.append([LABELS[r["method"]], f"{r['trainable']:,}", _fmt(r.get("gamma"), "g"),
                     *cells, f"{gap:.1e}", r["final_train_loss"], f"{r['step_seconds']:.3f}",
                     _ratio(r, ref.get("lora"), "step_seconds"), f"{r['init_seconds']:.1f}",
                     _ratio(r, ref.get("lora-one"), "init_seconds")])
    return markdown_table(header, body)


def gamma_table(rows: list[dict]) -> str:
    """The γ grid's training losses per step method and budget (* = chosen)."""
    rows = [r for r in rows if "gamma_losses" in r]
    if not rows:
        return ""
    grid = sorted(rows[0]["gamma_losses"], key=float)  # JSON keys come back sorted as text
    body = [[f"{LABELS[r['method']]} r = {r['rank']}",
             *[f"{r['gamma_losses'][g]:.4f}{'*' if float(g) == r['gamma'] else ''}"
               for g in grid], f"{r['w0_gamma_loss']:.4f}", f"{r['gamma_search_seconds']:.1f}"]
            for r in rows]
    edge = [f"{LABELS[r['method']]} r = {r['rank']}" for r in rows
            if r["gamma"] in (float(grid[0]), float(grid[-1]))]
    note = (f"\nAt the edge of the grid (widen --gammas): {', '.join(edge)}.\n" if edge else "")
    return markdown_table(["method", *[f"γ = {g}" for g in grid], "W0", "search s"],
                          body) + note


def plot_ranks(rows: list[dict], n_layers: int, path: Path) -> bool:
    """Heat maps (layers × projections, one per budget) of the rank RA-SpaRC chose; ``False``
    when no RA-SpaRC row exists."""
    rows = [r for r in rows if r["method"] == "ra-sparc"]
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows) + 1, 0.22 * n_layers + 2.5),
                             squeeze=False)
    for ax, row in zip(axes[0], rows):
        grid = np.full((n_layers, len(ADAPTABLE)), np.nan)
        for p, rank in row["ranks"].items():
            layer, name = re.match(r"layers/(\d+)/\w+/(\w+)", p).groups()
            grid[int(layer), ADAPTABLE.index(name)] = rank
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=row["rank"])
        for (i, j), rank in np.ndenumerate(grid):
            ax.text(j, i, "" if np.isnan(rank) else int(rank), ha="center", va="center",
                    fontsize=6, color="white" if rank < row["rank"] / 2 else "black")
        ax.set_xticks(range(len(ADAPTABLE)), [n.removesuffix("_proj") for n in ADAPTABLE],
                      rotation=45)
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
        ax.set_ylabel("layer")
        ax.set_title(f"r_max = {row['rank']}")
        fig.colorbar(image, ax=ax, label="chosen rank")
    fig.suptitle("RA-SpaRC: rank of the low-rank part (rest of the budget: sparse)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_curves(rows: list[dict], path: Path, smooth: int = 5) -> bool:
    """Training loss per budget (top: running mean over ``smooth`` logged steps; bottom: the
    raw difference to LoRA's loss at the same step, on the same batches, since every method
    sees the same data); ``False`` when no row holds a ``train_curve``."""
    rows = [r for r in rows if r.get("train_curve")]
    ranks = list(dict.fromkeys(r["rank"] for r in rows))
    if not ranks:
        return False
    fig, axes = plt.subplots(2, len(ranks), figsize=(5 * len(ranks), 6), squeeze=False,
                             sharex=True)
    for col, rank in enumerate(ranks):
        curves = {r["method"]: np.asarray(r["train_curve"], float) for r in rows
                  if r["rank"] == rank}
        ref = curves.get("lora")
        for method, curve in curves.items():
            window = np.ones(min(smooth, len(curve))) / min(smooth, len(curve))
            style = {"label": LABELS[method], "color": COLORS[method]}
            axes[0, col].plot(curve[len(window) - 1:, 0],
                              np.convolve(curve[:, 1], window, mode="valid"), **style)
            if ref is not None and method != "lora" and len(ref) == len(curve):
                axes[1, col].plot(curve[:, 0], curve[:, 1] - ref[:, 1], **style)
        axes[0, col].set_title(f"r = {rank}")
        axes[0, col].set_ylabel(f"train loss (mean of {smooth} logs)")
        axes[1, col].axhline(0.0, color="gray", lw=0.8)
        axes[1, col].set_ylabel("loss − LoRA's (same batch)")
        axes[1, col].set_xlabel("step")
        axes[0, col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def goals(result: dict) -> list[str]:
    """The issue's goals, each checked on the rows at hand."""
    lines = []
    comp = result["compressors"]
    if comp:
        k = [s for r in comp for s in r["kernels"].values()]
        le = sum(s["sparc_error"] <= min(s["svd_error"], s["topk_error"]) * (1 + 1e-5) + 1e-7
                 for s in k)
        m_ok = sum(r["sparc"]["metric"] >= r["svd"]["metric"] >= r["topk"]["metric"]
                   for r in comp)
        lines += [f"* SpaRC error ≤ min(SVD, TopK): {le}/{len(k)} kernel gradients.",
                  f"* M(SpaRC) ≥ M(SVD) ≥ M(TopK): {m_ok}/{len(comp)} (corpus, budget) pairs."]
    by_rank: dict[int, list[dict]] = {}
    for r in result["finetune"]:
        by_rank.setdefault(r["rank"], []).append(r)
    for rank, rows in by_rank.items():
        ref = {r["method"]: r for r in rows}
        best = min(rows, key=lambda r: r["after_ppl"]["ppl"])
        line = f"* r = {rank}: lowest held-out perplexity: {LABELS[best['method']]}"
        if "ra-sparc" in ref:
            sparc = ref["ra-sparc"]
            init = _ratio(sparc, ref.get("lora-one"), "init_seconds")
            step = _ratio(sparc, ref.get("lora"), "step_seconds")
            line += (f"; RA-SpaRC init {init} LoRA-One's (goal ≤ 2×), step {step} LoRA's "
                     f"(goal ≤ 1.10×)")
        lines.append(line + ".")
    return lines


def summary_markdown(cfg, result: dict, plots: dict[str, Path]) -> str:
    """The whole summary (module docstring); ``plots`` maps ``ranks`` / ``curves`` to the
    copied figures."""
    domains = {"ppl": Path(cfg.corpus).name} | (
        {"transfer_ppl": Path(cfg.transfer_corpus).name} if cfg.transfer_corpus else {})
    values = {**vars(cfg.train.optimizer), **vars(cfg.train), **vars(cfg)}
    out = [f"# RA-SpaRC on {cfg.model}\n", f"Command: `{result['command']}`\n",
           f"Adapted kernels: {cfg.targets} of every block ({result['kernels']} kernels).\n",
           "## How the hyperparameters were chosen\n", CHOICES.format(**values)]
    out += [cfg.notes + "\n"] if cfg.notes else []
    out += ["## Goals\n", "\n".join(goals(result)) + "\n"]
    if result["compressors"]:
        out += ["## (a) Compressors on stochastic gradients (Table 4 layout)\n",
                compressor_table(result["compressors"]),
                "\n## Unimodality of the one-step error over r (App. C.2), first gradient\n",
                "Bisection: Alg. 1's visited points (both endpoints included) on the scanned "
                "curve; excess = its error / the scan's best − 1. The library falls back to "
                "the full scan where the visited points are not unimodal.\n",
                unimodality_table(result["compressors"])]
    before = (result["pretrained"] or {}).get("ppl", {})
    if result["finetune"]:
        out.append("\n## (b) Fine-tuning at equal trainable budgets\n")
    for rank in dict.fromkeys(r["rank"] for r in result["finetune"]):
        rows = [r for r in result["finetune"] if r["rank"] == rank]
        share = rows[0]["trainable"] / result["model_params"]
        out += [f"\n### Budget r = {rank} ({rows[0]['trainable']:,} trainable, {share:.3%} of "
                f"the model's parameters)\n", finetune_table(rows, domains, before)]
    if result["finetune"] and gamma_table(result["finetune"]):
        out += ["\n### γ search (mean train loss of W0 − C(g)/γ, held-out train batches)\n",
                gamma_table(result["finetune"])]
    if "ranks" in plots:
        out.append(f"\nRA-SpaRC's rank per layer and projection: `{plots['ranks']}`\n")
    if "curves" in plots:
        out.append(f"\nTraining loss per method, and its difference to LoRA's on the same "
                   f"batches: `{plots['curves']}`\n")
    return "\n".join(out) + "\n"


def write_outputs(cfg, root: Path, result: dict) -> str:
    """``summary.md``, ``results.json``, ``rank_per_layer.png`` and ``curves.png`` in ``root``;
    the summary (and the plots, as ``<results stem>_rank_per_layer.png`` / ``_curves.png``) to
    ``cfg.results``."""
    results = Path(cfg.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    drawn = {"ranks": ("rank_per_layer.png", plot_ranks(result["finetune"], result["n_layers"],
                                                        root / "rank_per_layer.png")),
             "curves": ("curves.png", plot_curves(result["finetune"], root / "curves.png"))}
    plots = {}
    for kind, (name, done) in drawn.items():
        if done:
            plots[kind] = results.with_name(f"{results.stem}_{name}")
            shutil.copy(root / name, plots[kind])
    summary = summary_markdown(cfg, result, plots)
    (root / "summary.md").write_text(summary)
    results.write_text(summary)
    atomic_write_json(root / "results.json", result)
    print(summary)
    return summary
