"""Tables and plots of :mod:`experiments.elsa`: the per-run training curves, the perplexity plot
and ``summary.md`` (copied to ``results/elsa.md``).

The summary only restates what the result rows hold: every number in it is a field of a row
(``runs/<name>/**/result.json``) or a ratio of two such fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from admm_jax.core import state_memory
from admm_jax.elsa import elsa
from experiments.runs import markdown_table

#: one-shot methods (their best row is the baseline of the ratio table)
ONESHOT = ("magnitude", "wanda", "sparsegpt")
#: ELSA variants (method names of :mod:`experiments.elsa`)
ELSA_VARIANTS = ("elsa", "elsa-paper", "elsa-global")
#: one-shot methods fine-tuned with their mask fixed
ONESHOT_FT = tuple(f"{m}+ft" for m in ONESHOT)
#: the logged curves of an ELSA run: (history key, panel title, log scale)
_CURVES = (("loss", "train loss", False), ("admm/residual_mean", "mean ‖W − Z‖/‖W‖", True),
           ("admm/flip_rate_mean", "mask flip rate at projections", False),
           ("admm/rho_mean", "mean ρ", True),
           ("lr", "AdamW learning rate", False))

_PULL = {"lr": "lr schedule / peak lr", "constant": "1"}


def label(setting: str) -> str:
    """``"0.9"`` → ``"90%"``; N:M patterns and ``"dense"`` unchanged."""
    return f"{float(setting):.0%}" if setting.replace(".", "", 1).isdigit() else setting


def plot_run(history: list[dict], path: Path, title: str) -> None:
    """Train loss and, when logged, the ADMM residual, mask flip rate and ρ against step: a run
    that does not reach the constraint shows it in the residual panel."""
    curves = [c for c in _CURVES if any(c[0] in r for r in history)]
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.2), squeeze=False)
    for ax, (key, name, log) in zip(axes[0], curves):
        points = [(r["step"], r[key]) for r in history if key in r]
        ax.plot(*zip(*points), "-", color="tab:blue")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        if log and all(v > 0 for _, v in points):
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_results(rows: list[dict], settings: list[str], domains: list[tuple[str, str]],
                 path: Path) -> None:
    """Perplexity against sparsity setting, one line per method, one panel per domain."""
    by = {(r["method"], r["setting"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows if r["setting"] != "dense"))
    fig, axes = plt.subplots(1, len(domains), figsize=(6.5 * len(domains), 4), squeeze=False)
    for ax, (key, name) in zip(axes[0], domains):
        for m in methods:
            pts = [(i, by[(m, s)][key]) for i, s in enumerate(settings) if (m, s) in by]
            if pts:
                ax.plot(*zip(*pts), "o-", label=m)
        for m, style in (("dense", "--"), ("dense+ft", ":")):
            if (m, "dense") in by:
                ax.axhline(by[(m, "dense")][key], color="gray", ls=style, label=m)
        ax.set_xticks(range(len(settings)), [label(s) for s in settings])
        ax.set_yscale("log")
        ax.set_xlabel("sparsity of the decoder kernels")
        ax.set_ylabel(f"perplexity on {name} (validation)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value) -> str | float:
    return "—" if value is None else value


def results_table(rows: list[dict], domains: list[tuple[str, str]],
                  commands: list[str]) -> str:
    """One line per checkpoint: sparsity, perplexity per domain, tokens seen, time, command."""
    header = ["setting", "method", "sparsity", *[f"ppl {name}" for _, name in domains],
              "calibration tokens", "training tokens", "tokens seen", "wall s",
              "final ‖W−Z‖/‖W‖", "cmd"]
    lines = [[label(r["setting"]), r["method"], r["sparsity"], *[r[k] for k, _ in domains],
              r["calibration_tokens"], r["train_tokens"],
              r["calibration_tokens"] + r["train_tokens"], r["seconds"],
              _fmt(r.get("residual")), commands.index(r["command"]) + 1] for r in rows]
    return markdown_table(header, lines)


def ratio_table(rows: list[dict], settings: list[str], domains: list[tuple[str, str]],
                baselines: Sequence[str], header: str) -> str:
    """Per setting and ELSA variant: the lowest perplexity among ``baselines`` over the
    variant's, per domain (> 1: the ELSA variant has the lower perplexity)."""
    by = {(r["method"], r["setting"]): r for r in rows}
    lines = []
    for s in settings:
        for variant in (v for v in ELSA_VARIANTS if (v, s) in by):
            cells = []
            for key, _ in domains:
                base = [(by[(b, s)][key], b) for b in baselines if (b, s) in by]
                if base:
                    ppl, name = min(base)
                    cells += [name, ppl / by[(variant, s)][key]]
                else:
                    cells += ["—", "—"]
            lines.append([label(s), variant, *cells])
    cols = [c for _, name in domains for c in (f"{header} ({name})", f"ratio {name}")]
    return markdown_table(["setting", "ELSA variant", *cols], lines) if lines else "(no rows)\n"


def memory_table(params, rho: float, weighted: bool, mask: str) -> list[dict]:
    """Bytes of ELSA state per constrained parameter (the ``mask`` leaves of ``params``), measured
    from ``tx.init`` for every storage of Z and U (ELSA-L)."""
    rows = []
    for dtype, scaling in (("float32", None), ("bfloat16", None), ("float8_e4m3fn", "tensor"),
                           ("float8_e4m3fn", "row"), ("float8_e5m2", "tensor")):
        tx = elsa(0.9, rho, weighted=weighted, state_dtype=dtype, state_scaling=scaling,
                  mask=mask)
        memory = state_memory(jax.eval_shape(tx.init, params))
        rows.append({"state_dtype": dtype, "scaling": scaling or "none", **memory})
    return rows


def memory_lines(memory: list[dict]) -> str:
    rows = [[r["state_dtype"], r["scaling"], r["z_u_per_param"], r["per_param"],
             r["total"] / 2 ** 20] for r in memory]
    return markdown_table(["Z/U dtype", "scales", "Z+U B/param", "state B/param", "state MiB"],
                          rows)


def _setup(cfg, domains: list[tuple[str, str]]) -> list[str]:
    """What every row was measured on and with which budget (all from the config)."""
    t, opt = cfg.train, cfg.train.optimizer
    return [
        f"Perplexity on the validation documents of {' and '.join(f'`{n}`' for _, n in domains)}"
        f" ({cfg.eval_batches} × {cfg.eval_batch_size} windows of {cfg.eval_seq_len} tokens per "
        "domain; 0 = all), every domain tokenized with the model's tokenizer. Training and "
        f"calibration tokens come from the train split of `{cfg.corpus}` only.",
        f"One-shot: {cfg.n_calibration} × {cfg.calibration_len} calibration tokens (magnitude: "
        f"none). Training (ELSA variants, `+ft`, `dense+ft`): {t.steps} steps × {t.batch_size} × "
        f"{t.seq_len} tokens, data seed {t.seed}, AdamW lr {opt.lr:g} (warm-up {opt.warmup_steps}"
        f", cosine to ×{opt.min_lr_ratio}), weight decay {opt.weight_decay:g}, clip "
        f"{opt.grad_clip:g}. `+ft`: the one-shot checkpoint fine-tuned with its mask fixed "
        "(`masked_updates` after AdamW).",
        f"`elsa`: decoupled coupling wrapping AdamW, ρ {cfg.rho:g}, pull η_t = "
        f"{_PULL[cfg.decoupled_schedule]}; `elsa-paper`: λ(W − Z + U) added to the gradient before "
        f"AdamW, λ {cfg.paper_rho:g}; `elsa-global`: `elsa` with one budget over all kernels "
        f"(scope=global). All: {cfg.rho_ramp} ramp ×{cfg.rho_factor}, projection every "
        f"{cfg.interval} steps, weighted={cfg.weighted}, Z/U in {cfg.state_dtype}.\n"]


def write_summary(cfg, root: Path, rows: list[dict], memory: list[dict],
                  domains: list[tuple[str, str]]) -> str:
    """``summary.md`` and ``perplexity.png`` of the rows computed so far."""
    settings = list(dict.fromkeys([*cfg.settings.split(","),
                                   *[r["setting"] for r in rows if r["setting"] != "dense"]]))
    commands = list(dict.fromkeys(r["command"] for r in rows))
    tuned = sorted({r["method"] for r in rows if r["method"] in ONESHOT_FT})
    text = [f"# ELSA vs one-shot pruning on {cfg.checkpoint or cfg.model}\n",
            *_setup(cfg, domains),
            "## How the hyperparameters were chosen\n",
            (cfg.notes or "Not stated for this run (`--notes TEXT` fills this paragraph).") + "\n",
            "## Every checkpoint\n",
            "Sparsity: fraction of zeros counted in the pruned kernels themselves. Tokens seen: "
            "calibration plus training tokens. Wall time: one-shot = capture + prune; ELSA = "
            "training + final projection; `+ft` = its one-shot time + fine-tuning. "
            "‖W−Z‖/‖W‖: the last logged mean ADMM residual.\n",
            results_table(rows, domains, commands),
            "\nCommands (column cmd):\n",
            *[f"{i}. `{c}`" for i, c in enumerate(commands, 1)],
            "\n## Best one-shot / ELSA (ratio > 1: the ELSA variant has the lower perplexity)\n",
            ratio_table(rows, settings, domains, ONESHOT, "best one-shot"),
            "\n## Fine-tuned one-shot / ELSA at equal training tokens\n",
            ratio_table(rows, settings, domains, ["sparsegpt+ft"], "SparseGPT+ft"),
            ratio_table(rows, settings, domains, tuned, "best one-shot+ft")
            if set(tuned) - {"sparsegpt+ft"} else "",
            "\n## ELSA-L: ADMM state memory measured from the state pytree\n",
            "Bytes per constrained parameter (Z + U, and all ADMM state: Z, U, the kept mask, "
            "the curvature EMA and per-block scalars); MiB for the full model.\n",
            memory_lines(memory)]
    summary = "\n".join(text)
    (root / "summary.md").write_text(summary)
    plot_results(rows, settings, domains, root / "perplexity.png")
    return summary
