"""ELSA vs one-shot pruning (magnitude, Wanda, SparseGPT), with and without fine-tuning, on
SmolLM2-135M.

    python -m experiments.elsa                                        # CPU preset
    python -m experiments.elsa --config experiments/configs/elsa_paper.json   # accelerators

For every sparsity setting (unstructured 50/70/80/90 % and 2:4 by default) and method:

* ``magnitude`` / ``wanda`` / ``sparsegpt``: one shot from ``n_calibration × calibration_len``
  windows of the corpus's *train* split, layer by layer (:func:`admm_jax.pruning.prune`);
* ``wanda+ft`` / ``sparsegpt+ft`` / ``magnitude+ft``: that one-shot checkpoint fine-tuned with
  its mask fixed (``clip → adamw → masked_updates(masks)``) with exactly ELSA's training budget
  (steps, batch, sequence length, lr schedule, data seed, hence the same training tokens);
* ``elsa``: decoupled coupling, one transform wrapping AdamW (``clip → elsa(base=adamw)``: the
  update is pulled by ``η_t ρ_t (W − Z + U)``), then the final hard projection
  (:func:`admm_jax.elsa.finalize`);
* ``elsa-paper``: the paper's coupling, ``clip → elsa → adamw`` (``λ(W − Z + U)`` added to the
  gradient, the curvature EMA fed by the gradients), then the final projection;
* ``elsa-global``: ``elsa`` with one sparsity budget over all pruned kernels (``scope="global"``,
  objective-aware allocation across blocks), at the unstructured settings of ``global_settings``.

``dense_reference`` adds ``dense+ft``: the dense model fine-tuned with the same loop and budget
(no sparsity) — the share of a fine-tuned row's gain that is adaptation to the corpus.

Every method prunes the same leaves — the seven projection kernels of every decoder block (the
tied embedding / LM head and the norms stay dense). Every checkpoint (``runs/<name>/<method>-
<setting>/model``, which ``python -m experiments.evaluate --checkpoint DIR`` reads) is scored on
the *validation* documents of ``corpus`` and of ``transfer_corpus`` (a second domain, tokenized
with the model's tokenizer); no calibration window or training batch comes from either.

Results are cached per (method, setting) in ``result.json`` (:mod:`experiments.elsa_cache`: valid
under the current result format and the config fields the result depends on), so an interrupted
run resumes and results of another format or config are recomputed. Each row states its tokens
seen, wall time and the command that computed it; the tables of every cached row go to
``runs/<name>/summary.md`` and ``results`` (:mod:`experiments.elsa_report`).
"""

from __future__ import annotations

import dataclasses
import functools
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import numpy as np
import optax

from admm_jax._checks import check_choice, check_int, check_real
from admm_jax._io import atomic_write_json
from admm_jax.core import admm_metrics, path_str, rho_ramp, select, selected_paths
from admm_jax.data import calibration_samples, corpus_meta, eval_batches
from admm_jax.elsa import elsa, finalize, masked_updates
from admm_jax.models.compact import dense_params
from admm_jax.models.llama import abstract_params
from admm_jax.pruning import prune
from admm_jax.training import (
    OptimizerConfig,
    TrainConfig,
    adamw,
    default_optimizer,
    load_model,
    relative_lr_schedule,
    train,
)
from admm_jax.training.checkpoint import save_model
from admm_jax.training.lm import make_nll_sum, perplexity
from experiments.cli import parse_config, to_dict
from experiments.compact import write_compact
from experiments.elsa_cache import cached, collect_rows
from experiments.elsa_report import (
    ELSA_VARIANTS,
    ONESHOT,
    ONESHOT_FT,
    label,
    memory_table,
    plot_run,
    write_summary,
)
from experiments.loading import load_with_domains
from experiments.runs import run_dir

#: the leaves every method prunes: the projection kernels of the decoder blocks
PRUNED = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"
FINETUNED = ONESHOT_FT
METHODS = (*ONESHOT, *FINETUNED, *ELSA_VARIANTS)


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
    """Corpus name (shakespeare, kjv) or a directory / file of .txt documents: training,
    calibration and the first evaluation domain."""
    transfer_corpus: str = "kjv"
    """Second evaluation domain (its validation documents only); '' = none."""
    runs_root: str = "runs"
    """Directory that holds the run directories."""
    results: str = "results/elsa.md"
    """Markdown results table (the plot is written next to it)."""
    settings: str = "0.9,0.8,0.7,0.5,2:4"
    """Comma-separated sparsity settings: fractions of zeros, or N:M patterns such as 2:4."""
    methods: str = "magnitude,wanda,sparsegpt,wanda+ft,sparsegpt+ft,elsa,elsa-paper,elsa-global"
    """Comma-separated methods, from magnitude, wanda, sparsegpt, magnitude+ft, wanda+ft,
    sparsegpt+ft, elsa, elsa-paper, elsa-global."""
    global_settings: str = "0.9"
    """Comma-separated settings at which elsa-global runs (unstructured ones of --settings)."""
    n_calibration: int = 64
    """Calibration windows of the one-shot methods (from the train split)."""
    calibration_len: int = 256
    """Tokens per calibration window."""
    sparsegpt_blocksize: int = 128
    """Columns SparseGPT prunes per lazy-update block."""
    sparsegpt_damp: float = 0.01
    """SparseGPT Hessian dampening, as a fraction of the mean diagonal."""
    rho: float = 0.02
    """Initial ρ of elsa / elsa-global (decoupled: the fraction of W − Z + U removed per step
    at η_t = 1)."""
    decoupled_schedule: Literal["lr", "constant"] = "constant"
    """η_t of the decoupled pull: 'constant' = 1 (the committed CPU preset's pull), 'lr' = the
    learning-rate schedule divided by its peak (warm-up and cosine, like decoupled weight
    decay)."""
    paper_rho: float = 0.02
    """Initial λ of elsa-paper (the gradient term λ(W − Z + U) before AdamW)."""
    rho_ramp: Literal["constant", "linear", "cosine", "exponential"] = "exponential"
    """Shape of the ρ ramp from RHO to RHO·RHO_FACTOR over the training steps."""
    rho_factor: float = 10.0
    """Final ρ as a multiple of the initial one."""
    interval: int = 8
    """Steps between projections of W + U onto the sparsity set (ADMM stage 2)."""
    weighted: bool = True
    """Score entries by h·w² (h: ELSA's EMA of squared gradients, a diagonal Hessian
    estimate), else by w²."""
    state_dtype: str = "float32"
    """Storage dtype of Z and U (ELSA-L): float32, bfloat16, float8_e4m3fn, float8_e5m2."""
    dense_reference: bool = True
    """Also fine-tune the dense model with the same loop and budget (the dense+ft row)."""
    eval_seq_len: int = 256
    """Tokens per held-out evaluation window."""
    eval_batch_size: int = 8
    """Windows per held-out evaluation batch."""
    eval_batches: int = 8
    """Held-out evaluation batches per domain; 0 = the whole validation split."""
    notes: str = ""
    """Text of the summary's 'How the hyperparameters were chosen' section."""
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=150, batch_size=4, seq_len=128, log_every=5, eval_every=150, eval_batches=4,
        checkpoint_every=150, keep_checkpoints=1, optimizer=OptimizerConfig(
            lr=1e-4, min_lr_ratio=0.1, warmup_steps=10, weight_decay=0.0)))
    """The training loop and AdamW of every trained row (ELSA variants, +ft, dense+ft)."""

    def __post_init__(self):
        unknown = set(self.methods.split(",")) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
        for setting in (*self.settings.split(","), *self.global_settings.split(",")):
            parse_setting(setting)
        for name in ("n_calibration", "calibration_len", "sparsegpt_blocksize", "interval",
                     "eval_seq_len", "eval_batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("eval_batches", self.eval_batches, minimum=0)
        for name in ("rho", "paper_rho", "rho_factor"):
            check_real(name, getattr(self, name), low=0.0, low_open=True)
        check_real("sparsegpt_damp", self.sparsegpt_damp, low=0.0)
        check_choice("decoupled_schedule", self.decoupled_schedule, ("lr", "constant"))


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


def runs_at(cfg: ElsaConfig, method: str, setting: str) -> bool:
    """Whether ``method`` runs at ``setting`` (elsa-global: unstructured ``global_settings``)."""
    if method != "elsa-global":
        return True
    return ":" not in setting and setting in cfg.global_settings.split(",")


def elsa_optimizer(cfg: ElsaConfig, method: str, sparsity: float,
                   structure: str) -> optax.GradientTransformation:
    """The optimizer of an ELSA variant (module docstring); ρ_t ramps ×``rho_factor``."""
    opt = cfg.train.optimizer
    clip = optax.clip_by_global_norm(opt.grad_clip)
    common = dict(structure=structure, interval=cfg.interval, weighted=cfg.weighted,
                  state_dtype=cfg.state_dtype, mask=PRUNED, halt_on_nonfinite=True,
                  rho_schedule=rho_ramp(cfg.rho_ramp, cfg.train.steps, cfg.rho_factor))
    if method == "elsa-paper":
        return optax.chain(clip, elsa(sparsity, cfg.paper_rho, coupling="gradient", **common),
                           adamw(cfg.train))
    pull = relative_lr_schedule(cfg.train) if cfg.decoupled_schedule == "lr" else 1.0
    scope = "global" if method == "elsa-global" else "tensor"
    return optax.chain(clip, elsa(sparsity, cfg.rho, scope=scope, coupling="decoupled",
                                  base=adamw(cfg.train), decoupled_lr=pull, **common))


class Context(NamedTuple):
    """What every run of one invocation shares."""

    cfg: ElsaConfig
    model: object  # LoadedModel
    corpus: object  # TokenizedCorpus of cfg.corpus
    calibration: np.ndarray
    domains: dict[str, np.ndarray]  # row key ("ppl", "transfer_ppl") -> validation tokens
    command: str


def evaluate_domains(ctx: Context, params) -> dict[str, float]:
    """Perplexity on ``eval_batches`` windows of every domain's validation tokens."""
    cfg = ctx.cfg
    graphdef, _ = abstract_params(ctx.model.config)
    nll_sum = make_nll_sum(graphdef)
    return {key: perplexity(nll_sum, params, eval_batches(
        tokens, batch_size=cfg.eval_batch_size, seq_len=cfg.eval_seq_len,
        max_batches=cfg.eval_batches or None)) for key, tokens in ctx.domains.items()}


def measured_sparsity(params, masks: dict | None = None) -> float:
    """Fraction of zeros over the pruned leaves (the paths of ``masks``, default the
    :data:`PRUNED` leaves), counted in the weights themselves."""
    paths = set(masks if masks is not None else selected_paths(params, select(params, PRUNED)))
    pruned = [np.asarray(x) for p, x in _flat(params).items() if p in paths]
    return sum(int(np.sum(x == 0)) for x in pruned) / sum(x.size for x in pruned)


def _flat(params) -> dict:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _trained_tokens(ctx: Context, history: list[dict]) -> int:
    """Training tokens of a finished run: its last step × batch size × sequence length."""
    return history[-1]["step"] * ctx.cfg.train.batch_size * ctx.cfg.train.seq_len


def finish(ctx: Context, method: str, setting: str, params, out: Path, t0: float, *,
           masks: dict | None = None, calibration_tokens: int = 0,
           history: list[dict] | None = None, **extra) -> dict:
    """Save the checkpoint of a run, score it on every domain and return its result row.

    A pruned run (``masks`` given) is saved as a compact checkpoint
    (:func:`experiments.compact.write_compact`: COO values + indices, or N:M for an N:M
    setting) and its row records the bytes; the dense-model rows are saved dense. Perplexity is
    computed on the dense ``params``, the compact model's dense twin."""
    params = jax.block_until_ready(params)
    seconds = time.perf_counter() - t0 + extra.pop("seconds_before", 0.0)
    kw = dict(tokenizer=ctx.model.tokenizer,
              meta={**corpus_meta(ctx.corpus), "method": method, "setting": setting})
    if masks is None:
        save_model(out / "model", params, model_config=ctx.model.config, **kw)
    else:
        extra["compact"] = write_compact(out / "model", ctx.model.config, params, masks,
                                         structure=parse_setting(setting)[1], **kw)
    row = {"method": method, "setting": setting, "sparsity": measured_sparsity(params),
           **evaluate_domains(ctx, params), "calibration_tokens": calibration_tokens,
           "train_tokens": _trained_tokens(ctx, history) if history else 0, "seconds": seconds,
           "command": ctx.command, "checkpoint": str(out / "model"), **extra}
    if history:
        row["final_train_loss"] = history[-1]["loss"]
        plot_run(history, out / "training.png", f"{method} {label(setting)}")
    return row


def run_oneshot(ctx: Context, method: str, setting: str, out: Path) -> dict:
    """One-shot pruning; the keep masks go to ``out/masks.npz`` for the ``+ft`` row."""
    sparsity, structure = parse_setting(setting)
    t0 = time.perf_counter()
    params, masks = prune(ctx.model.config, ctx.model.params, ctx.calibration, method=method,
                          sparsity=sparsity, structure=structure,
                          blocksize=ctx.cfg.sparsegpt_blocksize, percdamp=ctx.cfg.sparsegpt_damp)
    np.savez(out / "masks.npz", **{p: np.asarray(m) for p, m in masks.items()})
    return finish(ctx, method, setting, params, out, t0, masks=masks,
                  calibration_tokens=0 if method == "magnitude" else int(ctx.calibration.size))


def run_finetune(ctx: Context, method: str, setting: str, oneshot: dict, out: Path) -> dict:
    """The one-shot checkpoint fine-tuned with its masks fixed, on ELSA's training budget."""
    t0 = time.perf_counter()
    source = Path(oneshot["checkpoint"])
    with np.load(source.parent / "masks.npz") as stored:
        masks = {p: stored[p] for p in stored.files}
    tx = optax.chain(default_optimizer(ctx.cfg.train), masked_updates(masks))
    loaded = load_model(source)
    init = dense_params(loaded.config, loaded.layouts, loaded.params)
    result = train(ctx.model.config, ctx.corpus, out / "train", ctx.cfg.train, tx,
                   tokenizer=ctx.model.tokenizer, init=init)
    return finish(ctx, method, setting, result.params, out, t0, masks=masks,
                  calibration_tokens=oneshot["calibration_tokens"], history=result.history,
                  seconds_before=oneshot["seconds"])


def run_elsa(ctx: Context, method: str, setting: str, out: Path) -> dict:
    """An ELSA variant: training, then the final hard projection; the row adds the last logged
    residual and ``projection_gap`` = ‖W − P(W)‖/‖W‖ over the pruned kernels at the end."""
    sparsity, structure = parse_setting(setting)
    scope = "global" if method == "elsa-global" else "tensor"
    t0 = time.perf_counter()
    result = train(ctx.model.config, ctx.corpus, out / "train", ctx.cfg.train,
                   elsa_optimizer(ctx.cfg, method, sparsity, structure),
                   tokenizer=ctx.model.tokenizer, init=ctx.model.params,
                   state_metrics=lambda s: admm_metrics(s, per_block=False))
    params, masks = finalize(result.params, result.opt_state, sparsity, structure, scope=scope,
                             weighted=ctx.cfg.weighted)
    trained = {p: np.asarray(x) for p, x in _flat(result.params).items() if p in masks}
    gap = np.sqrt(sum(np.sum((x * ~np.asarray(masks[p])) ** 2) for p, x in trained.items())
                  / sum(np.sum(x ** 2) for x in trained.values()))
    return finish(ctx, method, setting, params, out, t0, masks=masks, history=result.history,
                  residual=result.history[-1].get("admm/residual_mean"),
                  projection_gap=float(gap))


def run_dense(ctx: Context, method: str, out: Path) -> dict:
    """``dense``: the model as loaded; ``dense+ft``: fine-tuned with the same loop, no mask."""
    t0 = time.perf_counter()
    if method == "dense":
        return {"method": method, "setting": "dense", "sparsity": measured_sparsity(
            ctx.model.params), **evaluate_domains(ctx, ctx.model.params),
            "calibration_tokens": 0, "train_tokens": 0, "seconds": 0.0,
            "command": ctx.command, "checkpoint": ctx.cfg.checkpoint or ctx.cfg.model}
    result = train(ctx.model.config, ctx.corpus, out / "train", ctx.cfg.train,
                   tokenizer=ctx.model.tokenizer, init=ctx.model.params)
    return finish(ctx, method, "dense", result.params, out, t0, history=result.history)


def run_row(ctx: Context, root: Path, method: str, setting: str) -> dict:
    """The cached row of ``method`` at ``setting`` (a ``+ft`` row first gets its one-shot)."""
    out = root / f"{method}-{setting.replace(':', 'of')}"
    if method in FINETUNED:
        base = run_row(ctx, root, method.removesuffix("+ft"), setting)
        compute = functools.partial(run_finetune, ctx, method, setting, base, out)
    elif method in ONESHOT:
        compute = functools.partial(run_oneshot, ctx, method, setting, out)
    else:
        compute = functools.partial(run_elsa, ctx, method, setting, out)
    print(f"== {method} at {setting} ==", flush=True)
    row = cached(out / "result.json", ctx.cfg, method, compute)
    print(f"{method} {setting}: ppl {row['ppl']:.2f}, sparsity {row['sparsity']:.4f}, "
          f"{row['seconds']:.0f}s", flush=True)
    return row


def load_context(cfg: ElsaConfig, argv: list[str]) -> Context:
    """Model, corpus, calibration windows and the validation tokens of every domain."""
    model, corpus, domains = load_with_domains(cfg.checkpoint, cfg.model, cfg.corpus,
                                               cfg.transfer_corpus)
    calibration = calibration_samples(corpus, cfg.n_calibration, cfg.calibration_len, seed=0)
    return Context(cfg, model, corpus, calibration, domains,
                   "python -m experiments.elsa " + shlex.join(argv))


def main(argv: list[str] | None = None) -> list[dict]:
    """Run (or read from the cache) every requested row and return them; the summary, rewritten
    after each row, holds every cached row of the run directory that this config would reuse
    (so separate invocations, e.g. ``--methods elsa-global --settings 0.9``, add up)."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(ElsaConfig, argv)
    root = run_dir(cfg.runs_root, cfg.name)
    atomic_write_json(root / "config.json", to_dict(cfg))
    ctx = load_context(cfg, argv)
    domains = [("ppl", Path(cfg.corpus).name)] + (
        [("transfer_ppl", Path(cfg.transfer_corpus).name)] if cfg.transfer_corpus else [])
    memory = memory_table(ctx.model.params, cfg.rho, cfg.weighted, PRUNED)
    rows = [cached(root / "dense.json", cfg, "dense", lambda: run_dense(ctx, "dense", root))]
    if cfg.dense_reference:
        rows.append(cached(root / "dense+ft" / "result.json", cfg, "dense+ft",
                            lambda: run_dense(ctx, "dense+ft", root / "dense+ft")))
    for setting in cfg.settings.split(","):
        for method in cfg.methods.split(","):
            if runs_at(cfg, method, setting):
                rows.append(run_row(ctx, root, method, setting))
                write_summary(cfg, root, collect_rows(cfg, root, METHODS), memory, domains)
    summary = write_summary(cfg, root, collect_rows(cfg, root, METHODS), memory, domains)
    Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.results).write_text(summary)
    shutil.copy(root / "perplexity.png", Path(cfg.results).with_suffix(".png"))
    print(summary)
    return rows


if __name__ == "__main__":
    main()
