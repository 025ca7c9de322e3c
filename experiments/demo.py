"""The README demo: one-shot pruning of the pretrained SmolLM2-135M, in a few minutes on a CPU.

    python -m experiments.demo                # ~6 min on 2 CPU cores (+ ~93 MB download once)
    python -m experiments.demo --full true    # the full-size experiments instead (hours on a CPU)

Stages (progress on stderr):

1. load SmolLM2-135M-Instruct — its 4-bit (Q4_1) GGUF weights, dequantized to fp32 — and the
   Shakespeare corpus tokenized with SmolLM2's own tokenizer (both cached under
   ``$ADMM_JAX_CACHE``, default ``~/.cache/admm_jax``);
2. score the dense model's perplexity on the corpus's *validation* documents;
3. prune the seven projection kernels of every decoder block (the tied embedding / LM head and the
   norms stay dense) with each of ``methods`` at each of ``settings`` —
   :func:`admm_jax.pruning.prune`, calibrated on random windows of the *train* split — and score
   each pruned model on the same validation windows;
4. print the table and write ``runs/<name>/{results.json, summary.md, perplexity.png}``.

``--full true`` runs the full-size experiments in their place: :mod:`experiments.elsa` (ELSA
fine-tune-pruning against these one-shot baselines at 50–90 % and 2:4, 64 × 256 calibration
tokens) and then :mod:`experiments.salaad` (SALAAD sparse + low-rank pretraining and elastic
deployment), each with its own defaults.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from admm_jax._checks import check_int
from admm_jax._io import atomic_write_json, atomic_write_text
from admm_jax.data import calibration_samples, eval_batches, prepare_corpus
from admm_jax.models.llama import abstract_params
from admm_jax.pruning import METHODS, prune
from admm_jax.training.lm import make_nll_sum, perplexity
from experiments import elsa as elsa_experiment
from experiments import salaad as salaad_experiment
from experiments.cli import parse_config, to_dict
from experiments.elsa import measured_sparsity, parse_setting
from experiments.loading import load_model_source
from experiments.runs import markdown_table, run_dir

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """One-shot pruning of the pretrained SmolLM2-135M (a few minutes on a CPU)."""

    model: str = "smollm2"
    """Pretrained model to prune (ignored when --checkpoint is given)."""
    checkpoint: str = ""
    """Prune this checkpoint or run directory of the library instead of --model."""
    corpus: str = "shakespeare"
    """Corpus (name or directory of .txt files): calibration windows from its train split,
    perplexity on its validation documents."""
    methods: str = "magnitude,wanda,sparsegpt"
    """Comma-separated one-shot pruning methods."""
    settings: str = "0.5,2:4"
    """Comma-separated sparsity settings: a fraction of zeros (unstructured) or N:M."""
    n_calibration: int = 32
    """Calibration windows (used by Wanda and SparseGPT)."""
    calibration_len: int = 256
    """Tokens per calibration window."""
    eval_seq_len: int = 256
    """Tokens per evaluation window (capped at the model's max_seq_len)."""
    eval_batch_size: int = 8
    """Evaluation windows per batch."""
    eval_batches: int = 4
    """Evaluation batches; 0 = the whole validation split."""
    name: str = "demo"
    """Run directory name under --runs_root."""
    runs_root: str = "runs"
    """Root of the run directories."""
    full: bool = False
    """Run the full-size experiments instead: python -m experiments.elsa, then
    python -m experiments.salaad (hours on a CPU)."""

    def __post_init__(self):
        unknown = sorted(set(self.methods.split(",")) - set(METHODS))
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; choose from {list(METHODS)}")
        for setting in self.settings.split(","):
            parse_setting(setting)
        for field in ("n_calibration", "calibration_len", "eval_seq_len", "eval_batch_size"):
            check_int(field, getattr(self, field), 1)
        check_int("eval_batches", self.eval_batches, 0)


def _stage(timings: dict[str, float], label: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)``, announced on stderr and timed into ``timings[label]``."""
    print(f"[demo] {label} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    timings[label] = time.perf_counter() - t0
    print(f"[demo] {label}: {timings[label]:.1f}s", file=sys.stderr, flush=True)
    return out


def label(setting: str) -> str:
    """``"0.5"`` → ``"50%"``; ``"2:4"`` stays."""
    return setting if ":" in setting else f"{float(setting):.0%}"


def plot_perplexity(rows: list[dict], path: Path, title: str) -> None:
    """Held-out perplexity per setting (groups) and method (bars), log scale; dense as a line."""
    dense, pruned = rows[0], rows[1:]
    settings = list(dict.fromkeys(r["setting"] for r in pruned))
    methods = list(dict.fromkeys(r["method"] for r in pruned))
    by = {(r["method"], r["setting"]): r["ppl"] for r in pruned}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, method in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(settings))]
        bars = ax.bar(xs, [by[(method, s)] for s in settings], width, label=method)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.axhline(dense["ppl"], color="black", ls="--", label=f"dense ({dense['ppl']:.1f})")
    ax.set_xticks(range(len(settings)), [label(s) for s in settings])
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the decoder-block kernels")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(cfg: DemoConfig, result: dict[str, Any]) -> str:
    """The markdown summary of ``result``: what was measured, the table, the best method per
    setting, the stage times."""
    rows, timings = result["rows"], result["timings"]
    dense = rows[0]["ppl"]
    table = [[r["method"], "—", r["ppl"], 1.0, r["sparsity"], "—"] for r in rows[:1]]
    table += [[r["method"], label(r["setting"]), r["ppl"], r["ppl"] / dense, r["sparsity"],
               r["seconds"]] for r in rows[1:]]
    best = []
    for setting in cfg.settings.split(","):
        top = min((r for r in rows if r["setting"] == setting), key=lambda r: r["ppl"])
        best.append(f"{label(setting)}: {top['method']} ({top['ppl']:.1f}, "
                    f"{top['ppl'] / dense:.2f}× dense)")
    model = f"checkpoint {cfg.checkpoint}" if cfg.checkpoint else f"pretrained {cfg.model}"
    if not cfg.checkpoint and cfg.model == "smollm2":
        model += " (its 4-bit Q4_1 GGUF weights, dequantized to fp32)"
    return "\n".join([
        f"# admm_jax demo: one-shot pruning of {cfg.checkpoint or cfg.model}\n",
        f"The {model}, pruned in one shot — no training — in all seven "
        "projection kernels of every decoder block (embedding / LM head and norms stay dense). "
        f"Calibration: {cfg.n_calibration} × {cfg.calibration_len} tokens from the train split "
        f"of `{cfg.corpus}`; perplexity: {result['eval_tokens']:,} tokens of its validation "
        "documents.\n",
        markdown_table(["method", "sparsity setting", "perplexity", "× dense",
                        "achieved sparsity", "prune seconds"], table),
        f"Best per setting: {'; '.join(best)}.\n",
        "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + f"; total {result['total_seconds']:.0f}.\n"])


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Stages 1–4 of the module docstring; returns the ``results.json`` content."""
    start = time.perf_counter()
    root = run_dir(cfg.runs_root, cfg.name)
    timings: dict[str, float] = {}
    model = _stage(timings, f"load {cfg.checkpoint or cfg.model}", load_model_source,
                   cfg.checkpoint, cfg.model)
    config, params = model.config, model.params
    corpus = _stage(timings, f"prepare corpus {cfg.corpus}", prepare_corpus, cfg.corpus,
                    tokenizer=model.tokenizer)
    calibration = calibration_samples(corpus, cfg.n_calibration, cfg.calibration_len, seed=0)
    nll_sum = make_nll_sum(abstract_params(config)[0])
    seq_len = min(cfg.eval_seq_len, config.max_seq_len)
    eval_windows = list(eval_batches(corpus.val, batch_size=cfg.eval_batch_size, seq_len=seq_len,
                                     max_batches=cfg.eval_batches or None))
    n_eval = sum(w.shape[0] for w in eval_windows) * seq_len

    def score(what: str, pruned: dict) -> float:
        return _stage(timings, f"perplexity {what}", perplexity, nll_sum, pruned, eval_windows)

    rows = [{"method": "dense", "setting": "dense", "ppl": score("dense", params),
             "sparsity": 0.0, "seconds": 0.0}]
    for setting in cfg.settings.split(","):
        sparsity, structure = parse_setting(setting)
        for method in cfg.methods.split(","):
            what = f"{method} {label(setting)}"
            pruned, masks = _stage(timings, f"prune {what}", prune, config, params, calibration,
                                   method=method, sparsity=sparsity, structure=structure,
                                   verbose=False)
            rows.append({"method": method, "setting": setting, "ppl": score(what, pruned),
                         "sparsity": measured_sparsity(pruned, masks),
                         "seconds": timings[f"prune {what}"]})
    plot_perplexity(rows, root / "perplexity.png",
                    f"one-shot pruning of {Path(cfg.checkpoint).name or cfg.model} on "
                    f"{Path(cfg.corpus).name}")
    result = {"config": to_dict(cfg), "rows": rows, "timings": timings, "eval_tokens": n_eval,
              "total_seconds": time.perf_counter() - start}
    atomic_write_text(root / "summary.md", summarize(cfg, result))
    atomic_write_json(root / "results.json", result)
    return result


def run_full() -> None:
    """The full-size experiments, each with its defaults (hours on a 2-core CPU)."""
    for module in (elsa_experiment, salaad_experiment):
        print(f"[demo] full size: python -m {module.__name__}", file=sys.stderr, flush=True)
        module.main([])


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    cfg = parse_config(DemoConfig, argv)
    if cfg.full:
        run_full()
        return None
    print(f"admm_jax demo: one-shot pruning ({cfg.methods.replace(',', ', ')}) of "
          f"{cfg.checkpoint or cfg.model}, scored on held-out text", file=sys.stderr, flush=True)
    result = run_demo(cfg)
    root = Path(cfg.runs_root) / cfg.name
    print((root / "summary.md").read_text())
    print(f"Picture: {root / 'perplexity.png'}  (table: {root / 'summary.md'})")
    print("Full-size experiments (ELSA fine-tune-pruning vs these baselines at 50-90 % and 2:4, "
          "then SALAAD pretraining; hours on a CPU): python -m experiments.demo --full true")
    return result


if __name__ == "__main__":
    main()
