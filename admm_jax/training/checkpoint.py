"""Self-describing model checkpoints on top of orbax.

A checkpoint directory holds everything needed to rebuild a model, and nothing else is needed::

    <dir>/
      model.json        {"format": ..., "model_config": {...}}   (LlamaConfig.to_dict(); per-layer
                        widths as lists, so a structurally pruned model reloads as itself)
      tokenizer.json    the tokenizer (``tokenizers`` JSON)
      <step>/           orbax step directories with the items
                          params       parameter pytree
                          train_state  optimizer state and RNG key (training checkpoints only)
                          meta         JSON: step, data position and free-form fields

Training runs write ``runs/<name>/checkpoints/``; one-shot tools (pruning, deployment, adapters)
write a single step with :func:`save_model`. :func:`load_model` accepts either a checkpoint
directory or a run directory that contains one.

Orbax writes each step to a temporary directory and renames it on commit, so a process killed
during a save leaves the previous step loadable. Parameters that contain NaN or inf are refused
(:class:`NonFiniteError`) and never written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tokenizers

from admm_jax._io import atomic_write_text
from admm_jax.data import load_tokenizer, save_tokenizer
from admm_jax.models.llama import LlamaConfig, abstract_params

FORMAT = "admm_jax.checkpoint.v1"  # on-disk format id (not a module path)
MODEL_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"


class NonFiniteError(FloatingPointError):
    """Raised instead of writing a checkpoint whose parameters contain NaN or inf."""


class LoadedModel(NamedTuple):
    config: LlamaConfig
    params: dict
    tokenizer: tokenizers.Tokenizer
    meta: dict
    step: int


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory at ``path`` or at ``path/checkpoints`` (a run directory)."""
    p = Path(path).absolute()  # orbax needs absolute paths
    for candidate in (p, p / "checkpoints"):
        if (candidate / MODEL_FILE).is_file():
            return candidate
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {str(p)!r} does not exist")
    raise FileNotFoundError(
        f"{str(p)!r} is not an admm_jax checkpoint: no {MODEL_FILE} in it or in its "
        "'checkpoints' subdirectory")


def nonfinite_leaves(tree) -> list[str]:
    """Paths of the leaves of ``tree`` that contain NaN or inf."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    finite = jax.device_get([jnp.isfinite(x).all() for _, x in flat])
    return [jax.tree_util.keystr(path) for (path, _), ok in zip(flat, finite) if not ok]


class Checkpointer:
    """An orbax ``CheckpointManager`` bound to one model config and tokenizer.

    Args:
        directory: checkpoint directory (created if missing).
        model_config: the architecture the params belong to. If the directory already holds a
            checkpoint of a *different* config, a ``ValueError`` names the differing fields and
            nothing on disk is touched.
        tokenizer: written once as ``tokenizer.json``.
        max_to_keep: number of most recent steps kept.
    """

    def __init__(self, directory: str | os.PathLike, *, model_config: LlamaConfig,
                 tokenizer: tokenizers.Tokenizer, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.model_config = model_config
        model_file = self.directory / MODEL_FILE
        if model_file.is_file():
            stored = json.loads(model_file.read_text())["model_config"]
            diff = {k: (stored.get(k), v) for k, v in model_config.to_dict().items()
                    if stored.get(k) != v}
            if diff:
                detail = ", ".join(f"{k}: stored {a!r} vs requested {b!r}"
                                   for k, (a, b) in sorted(diff.items()))
                raise ValueError(
                    f"checkpoint directory {str(self.directory)!r} was written for an "
                    f"incompatible model config ({detail}); use a new run name or directory")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_tokenizer(tokenizer, self.directory / TOKENIZER_FILE)
            atomic_write_text(model_file, json.dumps(
                {"format": FORMAT, "model_config": model_config.to_dict()}, indent=2))
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, params, *, opt_state=None, rng: jax.Array | None = None,
             meta: dict[str, Any] | None = None) -> None:
        """Save ``params`` (and optionally optimizer state and RNG key) as step ``step``.

        Raises:
            NonFiniteError: if any parameter is NaN or inf (nothing is written).
        """
        bad = nonfinite_leaves(params)
        if opt_state is not None:
            bad += [f"opt_state{p}" for p in nonfinite_leaves(opt_state)]
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise NonFiniteError(
                f"refusing to checkpoint step {step}: non-finite values in {bad[:5]}{more}")
        items = {"params": ocp.args.StandardSave(params),
                 "meta": ocp.args.JsonSave({"step": int(step), **(meta or {})})}
        if opt_state is not None:
            train_state = {"opt_state": opt_state}
            if rng is not None:
                train_state["rng"] = jax.random.key_data(rng)
            items["train_state"] = ocp.args.StandardSave(train_state)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int | None = None, *, opt_state_template=None,
                with_rng: bool = False):
        """Restore ``(params, opt_state, rng, meta)`` of ``step`` (default: latest).

        ``opt_state_template`` is a pytree with the optimizer state's structure (e.g.
        ``tx.init(params)`` or its ``jax.eval_shape``); without it only params and meta are read
        and ``opt_state``/``rng`` are ``None``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint step in {str(self.directory)!r}")
        _, abstract = abstract_params(self.model_config)
        items = {"params": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        if opt_state_template is not None:
            template = {"opt_state": jax.eval_shape(lambda: opt_state_template)}
            if with_rng:
                template["rng"] = jax.ShapeDtypeStruct((2,), jnp.uint32)
            items["train_state"] = ocp.args.StandardRestore(template)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"checkpoint step {step} in {str(self.directory)!r} does not match the requested "
                f"model/optimizer structure: {e}") from e
        opt_state = rng = None
        if opt_state_template is not None:
            opt_state = restored.train_state["opt_state"]
            if with_rng:
                rng = jax.random.wrap_key_data(restored.train_state["rng"])
        return restored.params, opt_state, rng, dict(restored.meta)

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def save_model(directory: str | os.PathLike, params, *, model_config: LlamaConfig,
               tokenizer: tokenizers.Tokenizer, step: int = 0,
               meta: dict[str, Any] | None = None) -> Path:
    """Write ``params`` as a one-step checkpoint that :func:`load_model` reads back."""
    ckpt = Checkpointer(directory, model_config=model_config, tokenizer=tokenizer)
    ckpt.save(step, params, meta=meta)
    ckpt.wait()
    ckpt.close()
    return ckpt.directory


def load_model(path: str | os.PathLike, step: int | None = None) -> LoadedModel:
    """Load the params, config, tokenizer and meta of a checkpoint (or run) directory."""
    directory = resolve_checkpoint_dir(path)
    info = json.loads((directory / MODEL_FILE).read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{str(directory)!r} has unsupported checkpoint format "
                         f"{info.get('format')!r}; expected {FORMAT!r}")
    config = LlamaConfig.from_dict(info["model_config"])
    tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
    ckpt = Checkpointer(directory, model_config=config, tokenizer=tokenizer)
    params, _, _, meta = ckpt.restore(step)
    ckpt.close()
    return LoadedModel(config, params, tokenizer, meta, int(meta["step"]))
