"""A jitted training loop for any optax transformation, with orbax checkpoints and resume.

The loop is method-agnostic: dense AdamW, SALAAD, ELSA or PISA plug in as the ``tx`` argument.
Batches are a pure function of ``(seed, step)`` (:func:`admm_jax.data.get_batch`), so the data
position is the step number and resuming from a checkpoint reproduces an uninterrupted run
bit-exactly. With several devices the batch is sharded over a ``data`` mesh axis
(:mod:`admm_jax.training.sharding`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import tokenizers
from jax.sharding import Mesh
from tqdm.auto import tqdm

from admm_jax.data import TokenizedCorpus, corpus_meta, eval_batches, get_batch
from admm_jax.models.llama import LlamaConfig, init_params
from admm_jax.training import sharding
from admm_jax.training.checkpoint import Checkpointer
from admm_jax.training.lm import make_nll_sum, next_token_loss, perplexity


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings of :func:`train`.

    The learning rate follows linear warm-up to ``lr`` over ``warmup_steps`` and cosine decay to
    ``min_lr_ratio * lr`` at ``steps``. ``eval_batches`` bounds the validation cost (``0`` = the
    whole validation split).
    """

    steps: int = 2000
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    eval_batches: int = 16
    checkpoint_every: int = 500
    keep_checkpoints: int = 2

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every",
                     "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.eval_batches < 0:
            raise ValueError("TrainConfig.warmup_steps and eval_batches must be >= 0")

    #: fields that may change when resuming a run (they do not alter the trajectory; ``steps``
    #: does, through the learning-rate schedule)
    RESUMABLE_FIELDS = ("log_every", "eval_every", "eval_batches", "checkpoint_every",
                        "keep_checkpoints")


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up then cosine decay to ``min_lr_ratio · lr``."""
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def adamw(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the schedule of :func:`lr_schedule`; no decay on 1-D params (norm scales)."""
    return optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                       mask=lambda params: jax.tree_util.tree_map(lambda x: x.ndim > 1, params))


def default_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm → adamw``: the dense baseline."""
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw(cfg))


def make_train_step(graphdef, tx: optax.GradientTransformation) -> Callable:
    """``(params, opt_state, batch) -> (params, opt_state, metrics)``, jitted with donation."""

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(next_token_loss, argnums=1)(graphdef, params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))


class TrainResult(NamedTuple):
    params: dict
    opt_state: Any
    history: list[dict]
    val_perplexity: float


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _check_resumable(run_dir: Path, cfg: TrainConfig) -> None:
    """Raise if ``run_dir`` was written with a train config that changes the trajectory."""
    path = run_dir / "train_config.json"
    if not path.is_file():
        path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
    stored = json.loads(path.read_text())
    diff = [f"{k}: stored {stored.get(k)!r} vs requested {v!r}"
            for k, v in dataclasses.asdict(cfg).items()
            if k not in TrainConfig.RESUMABLE_FIELDS and stored.get(k) != v]
    if diff:
        raise ValueError(f"run directory {str(run_dir)!r} was written by an incompatible train "
                         f"config ({'; '.join(diff)}); use a new run name or directory")
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))


def train(model_config: LlamaConfig, corpus: TokenizedCorpus, run_dir: str | os.PathLike,
          cfg: TrainConfig, tx: optax.GradientTransformation | None = None, *,
          tokenizer: tokenizers.Tokenizer | None = None, init: dict | None = None,
          state_metrics: Callable[[Any], dict[str, Any]] | None = None,
          mesh: Mesh | None = None, stop_after: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train ``model_config`` on ``corpus``, checkpointing into ``run_dir/checkpoints``.

    If ``run_dir`` already holds a checkpoint the run resumes from its latest step (after checking
    that model and train configs are compatible) and ``metrics.jsonl`` is truncated to that step.

    Args:
        model_config: architecture; its ``vocab_size`` must cover the corpus tokenizer.
        corpus: tokenized train/validation splits.
        run_dir: output directory (``metrics.jsonl``, ``train_config.json``, ``checkpoints/``).
        cfg: optimisation and bookkeeping settings.
        tx: any optax transformation; defaults to :func:`default_optimizer`.
        tokenizer: stored with the checkpoints (default: ``corpus.tokenizer``).
        init: initial params (e.g. pretrained; copied, never donated); default: random init
            from ``cfg.seed``.
        state_metrics: ``opt_state -> {name: scalar}`` logged every ``log_every`` steps (ADMM
            transforms expose per-block metrics this way).
        mesh: device mesh with a ``data`` axis (default: all devices, see
            :func:`admm_jax.training.sharding.data_mesh`); the batch is sharded over it.
        stop_after: end this invocation (with a checkpoint) after this global step, to split
            one run into several sessions; a later call with the same config resumes it.
        progress: show a tqdm bar with loss and tokens/s.

    Returns:
        final params, optimizer state, the logged history and the final validation perplexity.
    """
    if model_config.vocab_size < corpus.vocab_size:
        raise ValueError(f"model vocab_size {model_config.vocab_size} is smaller than the "
                         f"tokenizer's vocabulary ({corpus.vocab_size})")
    if cfg.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len "
                         f"{model_config.max_seq_len}")
    run_dir = Path(run_dir)
    tx = default_optimizer(cfg) if tx is None else tx
    mesh = sharding.data_mesh() if mesh is None else mesh
    sharding.check_batch_divisible(cfg.batch_size, mesh)

    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir / "checkpoints", model_config=model_config,
                        tokenizer=tokenizer or corpus.tokenizer, max_to_keep=cfg.keep_checkpoints)
    _check_resumable(run_dir, cfg)

    key = jax.random.key(cfg.seed)
    init_key, rng = jax.random.split(key)
    graphdef, params = init_params(model_config, init_key)
    if init is not None:  # copied: the train step donates its params buffers
        params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), init)
    opt_state = tx.init(params)
    start = 0
    metrics_path = run_dir / "metrics.jsonl"
    history = _read_jsonl(metrics_path)
    if ckpt.latest_step() is not None:
        params, opt_state, rng, meta = ckpt.restore(opt_state_template=opt_state, with_rng=True)
        start = int(meta["data_position"])
        history = [r for r in history if r["step"] <= start]
        _write_jsonl_atomic(metrics_path, history)
        print(f"[train] resumed {run_dir} at step {start}", file=sys.stderr)
    else:
        _write_jsonl_atomic(metrics_path, [])
    params, opt_state = sharding.replicate((params, opt_state), mesh)

    step_fn = make_train_step(graphdef, tx)
    nll_sum = make_nll_sum(graphdef)

    def evaluate(p) -> float:
        batches = eval_batches(corpus.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                               max_batches=cfg.eval_batches or None)
        return perplexity(nll_sum, p, (sharding.replicate(b, mesh) for b in batches))

    def log(record: dict) -> None:
        history.append(record)
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    val_ppl = float("nan")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress,
               desc=run_dir.name, dynamic_ncols=True, file=sys.stderr)
    t_last, steps_since = time.perf_counter(), 0
    for step in bar:
        batch = get_batch(corpus.train, step, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                          seed=cfg.seed)
        params, opt_state, m = step_fn(params, opt_state, sharding.shard_batch(batch, mesh))
        steps_since += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            m = jax.device_get(m)
            elapsed = time.perf_counter() - t_last
            record = {"step": done, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                      "lr": float(lr_schedule(cfg)(step)),
                      "tokens_per_s": steps_since * tokens_per_step / max(elapsed, 1e-9)}
            if state_metrics is not None:
                record.update({k: float(v) if jnp.ndim(v) == 0 else jax.device_get(v).tolist()
                               for k, v in state_metrics(opt_state).items()})
            if done % cfg.eval_every == 0 or done == cfg.steps:
                val_ppl = evaluate(params)
                record["val_ppl"] = val_ppl
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}",
                            **({"val_ppl": f"{val_ppl:.1f}"} if "val_ppl" in record else {}))
            t_last, steps_since = time.perf_counter(), 0
        if done % cfg.checkpoint_every == 0 or done in (cfg.steps, end):
            ckpt.save(done, params, opt_state=opt_state, rng=rng,
                      meta={"data_position": done, "seed": cfg.seed, **corpus_meta(corpus)})
    bar.close()
    ckpt.wait()
    ckpt.close()
    if start >= end:
        val_ppl = evaluate(params)
    return TrainResult(params, opt_state, history, val_ppl)
