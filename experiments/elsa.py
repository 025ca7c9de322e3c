"""ELSA vs one-shot pruning (magnitude, Wanda, SparseGPT) on SmolLM2-135M.

    python -m experiments.elsa                                        # CPU preset (~1 h, 2 cores)
    python -m experiments.elsa --config experiments/configs/elsa_paper.json   # accelerators

For every sparsity setting (unstructured 50/70/80/90 % and 2:4 by default) and method:

* **magnitude / Wanda / SparseGPT**: one shot from ``n_calibration × calibration_len`` windows
  of the corpus's *train* split, layer by layer (:func:`admm_jax.pruning.prune`);
* **ELSA**: ``clip → adamw → elsa`` from the pretrained weights for ``train.steps`` steps on the
  *train* split, then the final hard projection (:func:`admm_jax.elsa.finalize`).

Every method prunes the same leaves — the seven projection kernels of every decoder block (the
tied embedding / LM head and the norms stay dense) — to the same per-tensor sparsity. Each pruned
model is saved as a checkpoint (``runs/<name>/<method>-<setting>/model``) that
``python -m experiments.evaluate --checkpoint DIR`` scores on the held-out split (or on any
``--text``). Perplexity is measured on the *validation* documents of the corpus, which neither the
calibration windows nor ELSA's training batches come from.

Because ELSA trains on the corpus, part of its gain can be adaptation to the corpus rather than
better pruning; ``dense_reference`` also fine-tunes the dense model with the same optimizer and
budget (no sparsity) to show that effect.

Results are cached per (method, setting) in ``result.json``, so an interrupted run resumes; the
table goes to ``runs/<name>/summary.md`` and ``results/elsa.md``. The ADMM-state memory of ELSA-L
(fp32, bf16, fp8 Z/U) is measured from the state pytree of the full model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import optax

from admm_jax._checks import check_int, check_real
from admm_jax._io import atomic_write_json
from admm_jax.core import admm_metrics, path_str, rho_ramp, state_memory
from admm_jax.data import calibration_samples, corpus_meta, eval_batches, prepare_corpus
from admm_jax.elsa import elsa, finalize
from admm_jax.models.llama import abstract_params
from admm_jax.pruning import prune
from admm_jax.training import OptimizerConfig, TrainConfig, adamw, train
from admm_jax.training.checkpoint import save_model
from admm_jax.training.lm import make_nll_sum, perplexity
from experiments.cli import parse_config, to_dict
from experiments.loading import load_model_source
from experiments.runs import markdown_table, plot_training, run_dir

#: the leaves every method prunes: the projection kernels of the decoder blocks
PRUNED = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"
METHODS = ("magnitude", "wanda", "sparsegpt", "elsa")


@dataclasses.dataclass(frozen=True)
class ElsaConfig:
    """ELSA vs one-shot baselines (module docstring). Defaults: the CPU preset."""

    name: str = "elsa-smollm2"
    """Run name: outputs go to RUNS_ROOT/NAME (cached per method and setting; re-runs resume)."""
    model: str = "smollm2"
    """Pretrained model to prune (ignored when --checkpoint is given)."""
    checkpoint: str = ""
    """Checkpoint or run directory of this library to prune instead of --model."""
    corpus: str = "shakespeare"
    """Corpus name (shakespeare, kjv) or a directory / file of .txt documents."""
    runs_root: str = "runs"
    """Directory that holds the run directories."""
    results: str = "results/elsa.md"
    """Markdown results table (the plot is written next to it)."""
    settings: str = "0.9,0.8,0.7,0.5,2:4"
    """Comma-separated sparsity settings: fractions of zeros, or N:M patterns such as 2:4."""
    methods: str = "magnitude,wanda,sparsegpt,elsa"
    """Comma-separated methods, from magnitude, wanda, sparsegpt, elsa."""
    n_calibration: int = 64
    """Calibration windows of the one-shot methods (from the train split)."""
    calibration_len: int = 256
    """Tokens per calibration window."""
    sparsegpt_blocksize: int = 128
    """Columns SparseGPT prunes per lazy-update block."""
    sparsegpt_damp: float = 0.01
    """SparseGPT Hessian dampening, as a fraction of the mean diagonal."""
    rho: float = 0.02
    """Initial ADMM penalty ρ (decoupled: the fraction of W − Z + U removed per step)."""
    rho_ramp: Literal["constant", "linear", "cosine", "exponential"] = "exponential"
    """Shape of the ρ ramp from RHO to RHO·RHO_FACTOR over the training steps."""
    rho_factor: float = 10.0
    """Final ρ as a multiple of the initial one."""
    interval: int = 8
    """Steps between projections of W + U onto the sparsity set (ADMM stage 2)."""
    weighted: bool = True
    """Score entries by Adam's second moment · w² (diagonal-Hessian weighting), else by w²."""
    state_dtype: str = "float32"
    """Storage dtype of Z and U (ELSA-L): float32, bfloat16, float8_e4m3fn, float8_e5m2."""
    dense_reference: bool = True
    """Also fine-tune the dense model with ELSA's optimizer and budget (no sparsity)."""
    eval_seq_len: int = 256
    """Tokens per held-out evaluation window."""
    eval_batch_size: int = 8
    """Windows per held-out evaluation batch."""
    eval_batches: int = 8
    """Held-out evaluation batches; 0 = the whole validation split."""
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=150, batch_size=4, seq_len=128, log_every=5, eval_every=150, eval_batches=4,
        checkpoint_every=150, keep_checkpoints=1, optimizer=OptimizerConfig(
            lr=1e-4, min_lr_ratio=0.1, warmup_steps=10, weight_decay=0.0)))
    """ELSA's (and the dense reference's) fine-tuning loop and AdamW settings."""

    def __post_init__(self):
        unknown = set(self.methods.split(",")) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
        for setting in self.settings.split(","):
            parse_setting(setting)
        for name in ("n_calibration", "calibration_len", "sparsegpt_blocksize", "interval",
                     "eval_seq_len", "eval_batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("eval_batches", self.eval_batches, minimum=0)
        check_real("rho", self.rho, low=0.0, low_open=True)
        check_real("rho_factor", self.rho_factor, low=0.0, low_open=True)
        check_real("sparsegpt_damp", self.sparsegpt_damp, low=0.0)


def parse_setting(setting: str) -> tuple[float, str]:
    """``"0.9"`` → (0.9, unstructured); ``"2:4"`` → (0.5, "2:4")."""
    try:
        if ":" in setting:
            n, m = (int(p) for p in setting.split(":"))
            if not 0 < n < m:
                raise ValueError
            return 1 - n / m, setting
        sparsity = float(setting)
    except ValueError:
        raise ValueError(f"sparsity setting must be a fraction in (0, 1) or N:M with "
                         f"0 < N < M, got {setting!r}") from None
    check_real("sparsity setting", sparsity, low=0.0, high=1.0, low_open=True, high_open=True)
    return sparsity, "unstructured"


def elsa_optimizer(cfg: ElsaConfig, sparsity: float,
                   structure: str) -> optax.GradientTransformation:
    """``clip → adamw → elsa`` with decoupled coupling: every step removes ``ρ_t`` of
    ``W − Z + U`` after the Adam update (ρ_t ramps from ``rho`` to ``rho·rho_factor``)."""
    schedule = rho_ramp(cfg.rho_ramp, cfg.train.steps, cfg.rho_factor)
    sparsify = elsa(sparsity, cfg.rho, structure=structure, interval=cfg.interval,
                    weighted=cfg.weighted, state_dtype=cfg.state_dtype,
                    mask=PRUNED, rho_schedule=schedule, coupling="decoupled",
                    halt_on_nonfinite=True)
    return optax.chain(optax.clip_by_global_norm(cfg.train.optimizer.grad_clip),
                       adamw(cfg.train), sparsify)


def held_out_perplexity(cfg: ElsaConfig, model_config, params, tokens: np.ndarray) -> float:
    """Perplexity on ``cfg.eval_batches`` windows of ``tokens`` (the held-out split)."""
    graphdef, _ = abstract_params(model_config)
    batches = eval_batches(tokens, batch_size=cfg.eval_batch_size, seq_len=cfg.eval_seq_len,
                           max_batches=cfg.eval_batches or None)
    return perplexity(make_nll_sum(graphdef), params, batches)


def measured_sparsity(params, masks: dict) -> float:
    """Fraction of zeros over the pruned leaves, counted in the weights themselves."""
    pruned = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
              if path_str(p) in masks]
    zeros = sum(int(np.sum(np.asarray(x) == 0)) for x in pruned)
    return zeros / sum(x.size for x in pruned)


def run_method(cfg: ElsaConfig, method: str, setting: str, model, corpus, calibration,
               out: Path) -> dict:
    """Prune with one method at one setting; save the checkpoint; return the result row."""
    sparsity, structure = parse_setting(setting)
    t0 = time.perf_counter()
    history = None
    if method == "elsa":
        tx = elsa_optimizer(cfg, sparsity, structure)
        result = train(model.config, corpus, out / "train", cfg.train, tx,
                       tokenizer=model.tokenizer, init=model.params,
                       state_metrics=lambda s: admm_metrics(s, per_block=False))
        params, masks = finalize(result.params, result.opt_state, sparsity, structure,
                                 weighted=cfg.weighted)
        history = result.history
    else:
        params, masks = prune(model.config, model.params, calibration, method=method,
                              sparsity=sparsity, structure=structure,
                              blocksize=cfg.sparsegpt_blocksize, percdamp=cfg.sparsegpt_damp)
    params = jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    ppl = held_out_perplexity(cfg, model.config, params, corpus.val)
    save_model(out / "model", params, model_config=model.config, tokenizer=model.tokenizer,
               meta={**corpus_meta(corpus), "method": method, "setting": setting})
    row = {"method": method, "setting": setting, "sparsity": measured_sparsity(params, masks),
           "ppl": ppl, "seconds": seconds, "checkpoint": str(out / "model")}
    if history:
        plot_training(history, out / "training.png", f"ELSA {setting}")
        row["final_train_loss"] = history[-1]["loss"]
    return row


def dense_reference(cfg: ElsaConfig, model, corpus, out: Path) -> dict:
    """The dense model fine-tuned with ELSA's optimizer and budget but no constraint."""
    t0 = time.perf_counter()
    result = train(model.config, corpus, out / "train", cfg.train,
                   tokenizer=model.tokenizer, init=model.params)
    return {"method": "dense fine-tuned", "setting": "dense", "sparsity": 0.0,
            "ppl": held_out_perplexity(cfg, model.config, result.params, corpus.val),
            "seconds": time.perf_counter() - t0}


def memory_table(cfg: ElsaConfig, model) -> list[dict]:
    """Bytes of ELSA state per constrained parameter, measured from ``tx.init`` on the model."""
    rows = []
    for dtype, scaling in (("float32", None), ("bfloat16", None), ("float8_e4m3fn", "tensor"),
                           ("float8_e4m3fn", "row"), ("float8_e5m2", "tensor")):
        tx = elsa(0.9, cfg.rho, weighted=cfg.weighted, state_dtype=dtype, state_scaling=scaling,
                  mask=PRUNED)
        memory = state_memory(jax.eval_shape(tx.init, model.params))
        rows.append({"state_dtype": dtype, "scaling": scaling or "none", **memory})
    return rows


#: the config fields each kind of result depends on (a cached result is reused only if they match)
_EVAL_FIELDS = ("model", "checkpoint", "corpus", "eval_seq_len", "eval_batch_size", "eval_batches")
_DEPENDS = {
    "magnitude": _EVAL_FIELDS,
    "wanda": (*_EVAL_FIELDS, "n_calibration", "calibration_len"),
    "sparsegpt": (*_EVAL_FIELDS, "n_calibration", "calibration_len", "sparsegpt_blocksize",
                  "sparsegpt_damp"),
    "elsa": (*_EVAL_FIELDS, "rho", "rho_ramp", "rho_factor", "interval", "weighted",
             "state_dtype", "train"),
    "dense": _EVAL_FIELDS,
    "dense fine-tuned": (*_EVAL_FIELDS, "train"),
}


def _cached(path: Path, cfg: ElsaConfig, kind: str, compute) -> dict:
    """The result stored at ``path`` if it was computed under the same relevant config, else
    ``compute()`` (after removing a stale training run next to it), stored with that config."""
    key = {f: to_dict(cfg)[f] for f in _DEPENDS[kind]}
    if path.exists():
        row = json.loads(path.read_text())
        if row.get("config") == key:
            return row
        print(f"{path} was computed under another config; recomputing", flush=True)
    shutil.rmtree(path.parent / "train", ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {**compute(), "config": key}
    atomic_write_json(path, row)
    return row


def _label(setting: str) -> str:
    return setting if ":" in setting else f"{float(setting):.0%}"


def plot_results(rows: list[dict], settings: list[str], methods: list[str], dense_ppl: float,
                 path: Path) -> None:
    """Held-out perplexity against sparsity setting, one line per method (log scale)."""
    by = {(r["method"], r["setting"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in methods:
        pts = [(i, by[(m, s)]["ppl"]) for i, s in enumerate(settings) if (m, s) in by]
        if pts:
            ax.plot(*zip(*pts), "o-", label=m)
    ax.axhline(dense_ppl, color="gray", ls="--", label="dense")
    ax.set_xticks(range(len(settings)), [_label(s) for s in settings])
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the decoder kernels")
    ax.set_ylabel("held-out perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(cfg: ElsaConfig, root: Path, dense_ppl: float, rows: list[dict],
                  reference: dict | None, memory: list[dict], argv: list[str]) -> str:
    """``summary.md`` (and ``perplexity.png``) of the rows computed so far."""
    settings, methods = cfg.settings.split(","), cfg.methods.split(",")
    by = {(r["method"], r["setting"]): r for r in rows}

    def table(field: str) -> list[list]:
        return [[_label(s), *[by[(m, s)][field] if (m, s) in by else "—" for m in methods]]
                for s in settings]

    ppl = table("ppl")
    for row, s in zip(ppl, settings):
        base = [by[(m, s)]["ppl"] for m in methods if m != "elsa" and (m, s) in by]
        row.append(min(base) / by[("elsa", s)]["ppl"] if base and ("elsa", s) in by else "—")
    mem_rows = [[r["state_dtype"], r["scaling"], r["z_u_per_param"], r["per_param"],
                 r["total"] / 2 ** 20] for r in memory]
    command = "python -m experiments.elsa " + " ".join(argv)
    text = [f"# ELSA vs one-shot pruning on {cfg.checkpoint or cfg.model}\n",
            f"Command: `{command.strip()}`\n",
            f"Held-out perplexity on the validation documents of `{cfg.corpus}` "
            f"({cfg.eval_batches} × {cfg.eval_batch_size} windows of {cfg.eval_seq_len} "
            f"tokens; 0 = all). Dense model: **{dense_ppl:.2f}**.",
            f"Calibration: {cfg.n_calibration} × {cfg.calibration_len} train-split tokens. "
            f"ELSA: {cfg.train.steps} steps × {cfg.train.batch_size} × {cfg.train.seq_len} "
            f"train-split tokens, AdamW lr {cfg.train.optimizer.lr:g}, ρ {cfg.rho} "
            f"({cfg.rho_ramp} ramp ×{cfg.rho_factor}, decoupled), interval {cfg.interval}, "
            f"weighted={cfg.weighted}, Z/U in {cfg.state_dtype}.\n"]
    if reference:
        text.append(f"Dense model fine-tuned with ELSA's optimizer and budget (no sparsity): "
                    f"**{reference['ppl']:.2f}** ({reference['seconds']:.0f} s) — the share "
                    "of ELSA's numbers that is adaptation to the corpus.\n")
    text += ["## Perplexity (lower is better)\n",
             markdown_table(["setting", *methods, "best baseline / ELSA"], ppl),
             "\n## Achieved sparsity of the pruned kernels (zeros counted in the weights)\n",
             markdown_table(["setting", *methods], table("sparsity")),
             "\n## Wall time (seconds; one-shot: capture + prune; ELSA: training + finalize)\n",
             markdown_table(["setting", *methods], table("seconds")),
             "\n## ELSA-L: ADMM state memory measured from the state pytree\n",
             "Bytes per constrained parameter (Z + U, and all ADMM state: Z, U, the kept mask, "
             "the curvature EMA and per-block scalars); MiB for the full model.\n",
             markdown_table(["Z/U dtype", "scales", "Z+U B/param", "state B/param",
                             "state MiB"], mem_rows)]
    summary = "\n".join(text)
    (root / "summary.md").write_text(summary)
    plot_results(rows, settings, methods, dense_ppl, root / "perplexity.png")
    return summary


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(ElsaConfig, argv)
    settings = cfg.settings.split(",")
    root = run_dir(cfg.runs_root, cfg.name)
    atomic_write_json(root / "config.json", to_dict(cfg))
    model = load_model_source(cfg.checkpoint, cfg.model)
    corpus = prepare_corpus(cfg.corpus, tokenizer=model.tokenizer)
    calibration = calibration_samples(corpus, cfg.n_calibration, cfg.calibration_len, seed=0)
    dense = _cached(root / "dense.json", cfg, "dense", lambda: {
        "ppl": held_out_perplexity(cfg, model.config, model.params, corpus.val)})
    print(f"dense held-out perplexity {dense['ppl']:.2f}", flush=True)
    memory = memory_table(cfg, model)
    rows = []
    for setting in settings:
        for method in cfg.methods.split(","):
            out = root / f"{method}-{setting.replace(':', 'of')}"
            out.mkdir(exist_ok=True)
            print(f"== {method} at {setting} ==", flush=True)
            row = _cached(out / "result.json", cfg, method, functools.partial(
                run_method, cfg, method, setting, model, corpus, calibration, out))
            print(f"{method} {setting}: ppl {row['ppl']:.2f}, sparsity {row['sparsity']:.4f}, "
                  f"{row['seconds']:.0f}s", flush=True)
            rows.append(row)
            write_summary(cfg, root, dense["ppl"], rows, None, memory, argv)
    reference = (_cached(root / "dense-finetuned" / "result.json", cfg, "dense fine-tuned",
                         lambda: dense_reference(cfg, model, corpus, root / "dense-finetuned"))
                 if cfg.dense_reference else None)
    summary = write_summary(cfg, root, dense["ppl"], rows, reference, memory, argv)
    Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.results).write_text(summary)
    shutil.copy(root / "perplexity.png", Path(cfg.results).with_suffix(".png"))
    print(summary)
    return rows


if __name__ == "__main__":
    main()
