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
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from admm_jax._io import atomic_write_json, atomic_write_text
from admm_jax.data import TokenizedCorpus, corpus_meta, eval_batches, get_batch
from admm_jax.models.llama import LlamaConfig, init_params
from admm_jax.training import sharding
from admm_jax.training.checkpoint import Checkpointer
from admm_jax.training.config import TrainConfig
from admm_jax.training.lm import make_nll_sum, next_token_loss, perplexity
from admm_jax.training.optim import default_optimizer, lr_schedule
from admm_jax.training.step import LossFn, Trainable, make_train_step


class TrainResult(NamedTuple):
    """Output of :func:`train`: full params, optimizer state of the trainable subset, the logged
    records of ``metrics.jsonl`` and the final validation perplexity."""

    params: dict
    opt_state: Any
    history: list[dict]
    val_perplexity: float


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 1}}`` → ``{"optimizer.lr": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resumable(run_dir: Path, cfg: TrainConfig) -> None:
    """Raise if ``run_dir`` was written with a train config that changes the trajectory (any
    field, nested optimizer settings included, except :attr:`TrainConfig.RESUMABLE_FIELDS`)."""
    path = run_dir / "train_config.json"
    requested = dataclasses.asdict(cfg)
    if path.is_file():
        stored, new = _flatten(json.loads(path.read_text())), _flatten(requested)
        diff = [f"{k}: stored {stored.get(k)!r} vs requested {new.get(k)!r}"
                for k in sorted(set(stored) | set(new))
                if k not in TrainConfig.RESUMABLE_FIELDS and stored.get(k) != new.get(k)]
        if diff:
            raise ValueError(f"run directory {str(run_dir)!r} was written by an incompatible "
                             f"train config ({'; '.join(diff)}); use a new run name or directory")
    atomic_write_json(path, requested)


def _append(path: Path, history: list[dict], record: dict) -> None:
    history.append(record)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _to_json(value) -> float | list:
    value = jax.device_get(value)
    return float(value) if jnp.ndim(value) == 0 else value.tolist()


def _resume(ckpt: Checkpointer, metrics_path: Path, params, opt_state, rng):
    """``(params, opt_state, rng, start step, history)`` from the latest checkpoint, with
    ``metrics.jsonl`` truncated to that step; the given ones at step 0 without a checkpoint."""
    history = _read_jsonl(metrics_path)
    if ckpt.latest_step() is None:
        _write_jsonl(metrics_path, [])
        return params, opt_state, rng, 0, []
    params, opt_state, rng, meta = ckpt.restore(opt_state_template=opt_state, with_rng=True)
    start = int(meta["data_position"])
    history = [r for r in history if r["step"] <= start]
    _write_jsonl(metrics_path, history)
    print(f"[train] resumed {metrics_path.parent} at step {start}", file=sys.stderr)
    return params, opt_state, rng, start, history


def _initial_state(model_config: LlamaConfig, cfg: TrainConfig, graphdef, init):
    """``(graphdef, params, rng)`` at step 0: ``init`` (copied: the train step donates its
    params buffers) or a random init from ``cfg.seed``, on ``graphdef`` if given."""
    if graphdef is not None and init is None:
        raise ValueError("train(graphdef=...) needs init=, the params of that graph")
    init_key, rng = jax.random.split(jax.random.key(cfg.seed))
    if graphdef is None:
        graphdef, params = init_params(model_config, init_key)
    if init is not None:
        params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), init)
    return graphdef, params, rng


def _check_inputs(model_config: LlamaConfig, corpus: TokenizedCorpus, cfg: TrainConfig) -> None:
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if model_config.vocab_size < corpus.vocab_size:
        raise ValueError(f"model vocab_size {model_config.vocab_size} is smaller than the "
                         f"tokenizer's vocabulary ({corpus.vocab_size})")
    if cfg.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len "
                         f"{model_config.max_seq_len}")


def _log_record(cfg: TrainConfig, done: int, metrics: dict, opt_state, state_metrics,
                t_last: float, steps_since: int) -> dict:
    """One ``metrics.jsonl`` record: the step's metrics, lr, tokens/s since ``t_last`` (read
    after the step has finished) and the optimizer state's metrics."""
    metrics = jax.device_get(metrics)  # wait for the step before reading the clock
    seconds = time.perf_counter() - t_last
    tokens = steps_since * cfg.batch_size * cfg.seq_len
    return {"step": done, **{k: _to_json(v) for k, v in metrics.items()},
            "lr": float(lr_schedule(cfg)(done - 1)),
            "tokens_per_s": tokens / max(seconds, 1e-9),
            **({} if state_metrics is None else
               {k: _to_json(v) for k, v in state_metrics(opt_state).items()})}


def train(model_config: LlamaConfig, corpus: TokenizedCorpus, run_dir: str | os.PathLike,
          cfg: TrainConfig, tx: optax.GradientTransformation | None = None, *,
          loss_fn: LossFn = next_token_loss, has_aux: bool = False,
          trainable: Trainable = None, tokenizer: tokenizers.Tokenizer | None = None,
          init: dict | None = None, state_metrics: Callable[[Any], dict[str, Any]] | None = None,
          mesh: Mesh | None = None, stop_after: int | None = None,
          progress: bool = True, graphdef: nnx.GraphDef | None = None) -> TrainResult:
    """Train ``model_config`` on ``corpus``, checkpointing into ``run_dir/checkpoints``.

    If ``run_dir`` already holds a checkpoint the run resumes from its latest step (after checking
    that model and train configs are compatible) and ``metrics.jsonl`` is truncated to that step.

    Args:
        model_config: architecture; its ``vocab_size`` must cover the corpus tokenizer.
        corpus: tokenized train/validation splits.
        run_dir: output directory (``metrics.jsonl``, ``train_config.json``, ``checkpoints/``).
        cfg: loop settings and the default optimizer's settings.
        tx: any optax transformation; defaults to :func:`default_optimizer`.
        loss_fn: training loss ``(graphdef, params, batch: int[B, T+1]) -> scalar`` (or
            ``(scalar, aux metrics)`` with ``has_aux``, logged every ``log_every`` steps);
            see :func:`admm_jax.training.step.make_train_step`. Validation is always perplexity.
        has_aux: whether ``loss_fn`` returns aux metrics.
        trainable: the params ``tx`` trains (:data:`admm_jax.training.step.Trainable`); the rest
            stay frozen and get no optimizer state (checkpoints hold the state of this subset).
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
        graphdef: the graph to train instead of ``model_config``'s dense model, e.g. one with
            adapters inserted (:func:`admm_jax.adapters.adapt_params`); needs ``init``, its
            params, whose structure the checkpoints then follow.

    Returns:
        final params, optimizer state, the logged history and the final validation perplexity.
    """
    _check_inputs(model_config, corpus, cfg)
    custom_graph = graphdef is not None
    run_dir = Path(run_dir)
    tx = default_optimizer(cfg) if tx is None else tx
    mesh = sharding.data_mesh() if mesh is None else mesh
    sharding.check_batch_divisible(cfg.batch_size, mesh)

    graphdef, params, rng = _initial_state(model_config, cfg, graphdef, init)
    run_dir.mkdir(parents=True, exist_ok=True)
    template = jax.eval_shape(lambda: params) if custom_graph else None
    ckpt = Checkpointer(run_dir / "checkpoints", model_config=model_config,
                        tokenizer=tokenizer or corpus.tokenizer, max_to_keep=cfg.keep_checkpoints,
                        template=template)
    _check_resumable(run_dir, cfg)
    train_step = make_train_step(graphdef, tx, loss_fn=loss_fn, has_aux=has_aux,
                                 trainable=trainable)
    metrics_path = run_dir / "metrics.jsonl"
    params, opt_state, rng, start, history = _resume(ckpt, metrics_path, params,
                                                     train_step.init(params), rng)
    params, opt_state = sharding.replicate((params, opt_state), mesh)
    nll_sum = make_nll_sum(graphdef)

    def evaluate(p) -> float:
        batches = eval_batches(corpus.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                               max_batches=cfg.eval_batches or None)
        return perplexity(nll_sum, p, (sharding.replicate(b, mesh) for b in batches))

    val_ppl = float("nan")
    end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress,
               desc=run_dir.name, dynamic_ncols=True, file=sys.stderr)
    t_last, steps_since = time.perf_counter(), 0
    for step in bar:
        batch = get_batch(corpus.train, step, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                          seed=cfg.seed)
        params, opt_state, m = train_step.step(params, opt_state,
                                               sharding.shard_batch(batch, mesh))
        steps_since += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = _log_record(cfg, done, m, opt_state, state_metrics, t_last, steps_since)
            if done % cfg.eval_every == 0 or done == cfg.steps:
                val_ppl = record["val_ppl"] = evaluate(params)
            _append(metrics_path, history, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
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
