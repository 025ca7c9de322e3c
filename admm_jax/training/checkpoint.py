"""Self-describing model checkpoints on top of orbax.

A checkpoint directory holds everything needed to rebuild a model, and nothing else is needed::

    <dir>/
      model.json        {"format": ..., "model_config": {...}}   (LlamaConfig.to_dict(); per-layer
                        widths as lists, so a structurally pruned model reloads as itself)
                        and, in a compact checkpoint, "layouts": {path: layout}
      tokenizer.json    the tokenizer (``tokenizers`` JSON)
      <step>/           orbax step directories with the items
                          params       parameter pytree
                          train_state  optimizer state and RNG key (training checkpoints only)
                          meta         JSON: step, data position and free-form fields

Training runs write ``runs/<name>/checkpoints/``; one-shot tools (pruning, deployment, adapters)
write a single step with :func:`save_model`. :func:`load_model` accepts either a checkpoint
directory or a run directory that contains one.

Compact checkpoints (format :data:`COMPACT_FORMAT`) hold a model whose linears are compact layers
(:mod:`admm_jax.models.linears`: low-rank factors, sparse values + int16/int32 indices, N:M values
+ uint8 in-group indices, sums of these). ``model.json`` then carries ``"layouts"``, the
shape-only JSON of :func:`admm_jax.models.layouts.layouts_to_json` (a sparse layout stores only
``nnz``: its indices are integer leaves of the params), and the params are restored into
``abstract_params(config, linear=structured_factory(layouts, config))``. Dense checkpoints keep
format :data:`FORMAT` and no ``layouts`` entry, so they read as before and an older reader refuses
a compact checkpoint by its format id instead of misreading it. :func:`load_model` returns the
layouts in :attr:`LoadedModel.layouts`; build the model with :func:`model_graphdef` (or
:func:`linear_factory`), never from the config alone. Before restoring, the stored params are
compared with what the layouts describe: a missing, unexpected or mis-shaped leaf raises a
``ValueError`` that names it.

Orbax writes each step to a temporary directory and renames it on commit, so a process killed
during a save leaves the previous step loadable. Parameters that contain NaN or inf are refused
(:class:`NonFiniteError`) and never written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tokenizers
from flax import nnx

from admm_jax._io import atomic_write_text
from admm_jax.core.tree import path_str
from admm_jax.data import load_tokenizer, save_tokenizer
from admm_jax.models.layouts import (
    Layout,
    layouts_from_json,
    layouts_to_json,
    structured_factory,
)
from admm_jax.models.llama import LinearFactory, LlamaConfig, abstract_params, dense_linear

FORMAT = "admm_jax.checkpoint.v1"  # on-disk format id (not a module path)
COMPACT_FORMAT = "admm_jax.checkpoint.compact.v1"  # v1 plus a "layouts" entry in model.json
LAYOUTS_KEY = "layouts"
MODEL_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"


class NonFiniteError(FloatingPointError):
    """Raised instead of writing a checkpoint whose parameters contain NaN or inf."""


class LoadedModel(NamedTuple):
    """A loaded model; ``layouts`` (empty for a dense model) name its compact linears, and
    :func:`model_graphdef` builds the graph that ``params`` fit."""

    config: LlamaConfig
    params: dict
    tokenizer: tokenizers.Tokenizer
    meta: dict
    step: int
    layouts: Mapping[str, Layout] = MappingProxyType({})


def linear_factory(config: LlamaConfig, layouts: Mapping[str, Layout] | None) -> LinearFactory:
    """The linear factory of a model with ``layouts`` (``dense_linear`` when there are none)."""
    return structured_factory(layouts, config) if layouts else dense_linear


def model_graphdef(loaded: LoadedModel) -> nnx.GraphDef:
    """The graphdef ``loaded.params`` belong to: ``abstract_params(config, linear=factory)``
    with the factory of ``loaded.layouts``."""
    return abstract_params(loaded.config, linear=linear_factory(loaded.config,
                                                                loaded.layouts))[0]


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of the array leaves (arrays, ``ShapeDtypeStruct`` or orbax metadata)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_like)[0]
    return {path_str(p): tuple(int(d) for d in x.shape) for p, x in flat}


def params_mismatch(actual: Any, expected: Any) -> str:
    """``""`` if the array leaves of ``actual`` and ``expected`` have the same paths and shapes,
    else a sentence naming the missing, unexpected and mis-shaped leaves (first five of each)."""
    have, want = _leaf_shapes(actual), _leaf_shapes(expected)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shaped = [f"{p} {have[p]} vs {want[p]}" for p in sorted(set(have) & set(want))
              if have[p] != want[p]]
    parts = [f"{what} {items[:5]}{' …' if len(items) > 5 else ''}"
             for what, items in (("missing leaves", missing), ("unexpected leaves", extra),
                                 ("mis-shaped leaves (stored vs expected)", shaped)) if items]
    return "; ".join(parts)


def _describe_layouts(layouts: Mapping[str, Layout]) -> str:
    return (f"compact, with layouts for {len(layouts)} linears" if layouts
            else "dense, without layouts")


def _model_info(config: LlamaConfig, layouts: Mapping[str, Layout]) -> dict:
    """The ``model.json`` object of a checkpoint of ``config`` with ``layouts``."""
    if not layouts:
        return {"format": FORMAT, "model_config": config.to_dict()}
    return {"format": COMPACT_FORMAT, "model_config": config.to_dict(),
            LAYOUTS_KEY: layouts_to_json(layouts)}


def read_layouts(info: dict, directory: str | os.PathLike) -> dict[str, Layout]:
    """The layouts of a parsed ``model.json`` (``{}`` for a dense checkpoint); ``ValueError`` for
    an unknown format, a compact checkpoint without its ``layouts`` entry or a dense one with."""
    fmt, where = info.get("format"), str(directory)
    if fmt not in (FORMAT, COMPACT_FORMAT):
        raise ValueError(f"{where!r} has unsupported checkpoint format {fmt!r}; expected "
                         f"{FORMAT!r} or {COMPACT_FORMAT!r}")
    if fmt == COMPACT_FORMAT and LAYOUTS_KEY not in info:
        raise ValueError(f"{where!r} is a compact checkpoint ({COMPACT_FORMAT!r}) but its "
                         f"{MODEL_FILE} has no {LAYOUTS_KEY!r} entry: the compact linears "
                         "cannot be rebuilt")
    if fmt == FORMAT and LAYOUTS_KEY in info:
        raise ValueError(f"{where!r} has a {LAYOUTS_KEY!r} entry in a dense {FORMAT!r} "
                         f"{MODEL_FILE}; compact checkpoints use format {COMPACT_FORMAT!r}")
    return layouts_from_json(info.get(LAYOUTS_KEY, {}))


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
    """An orbax ``CheckpointManager`` bound to one model config (and layouts) and tokenizer.

    Args:
        directory: checkpoint directory (created if missing).
        model_config: the architecture the params belong to. If the directory already holds a
            checkpoint of a *different* config or layouts, a ``ValueError`` names the differing
            fields and nothing on disk is touched.
        tokenizer: written once as ``tokenizer.json``.
        max_to_keep: number of most recent steps kept.
        layouts: ``{path: Layout}`` of the compact linears (none: a dense model); checked
            against ``model_config`` here (:func:`admm_jax.models.layouts.structured_factory`).
        template: the params template of a model that config and layouts do not describe
            (e.g. one with adapters inserted, :mod:`admm_jax.adapters`); the training loop's
            checkpoints of it restore into this template (``load_model`` reads only the models
            ``model.json`` describes: merge adapters and save the result for that).
    """

    def __init__(self, directory: str | os.PathLike, *, model_config: LlamaConfig,
                 tokenizer: tokenizers.Tokenizer, max_to_keep: int = 2,
                 layouts: Mapping[str, Layout] | None = None, template: Any = None):
        self.directory = Path(directory).absolute()
        self.model_config = model_config
        self.layouts = dict(layouts or {})
        self.template = template
        self.linear = linear_factory(model_config, self.layouts)
        model_file = self.directory / MODEL_FILE
        info = _model_info(model_config, self.layouts)
        if model_file.is_file():
            _check_same_model(self.directory, json.loads(model_file.read_text()), info)
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_tokenizer(tokenizer, self.directory / TOKENIZER_FILE)
            atomic_write_text(model_file, json.dumps(info, indent=2))
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))

    def abstract_params(self) -> dict:
        """The params template (``jax.ShapeDtypeStruct`` leaves) of this config and layouts, or
        the ``template`` given at construction."""
        if self.template is not None:
            return self.template
        return abstract_params(self.model_config, linear=self.linear)[1]

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
        abstract = self.abstract_params()
        stored = ocp.StandardCheckpointHandler().metadata(  # shapes only, no array is read
            self.directory / str(step) / "params").tree
        mismatch = params_mismatch(stored, abstract)
        if mismatch:
            raise ValueError(
                f"checkpoint step {step} in {str(self.directory)!r} does not hold the params its "
                f"{MODEL_FILE} describes ({_describe_layouts(self.layouts)}): {mismatch}")
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


def _check_same_model(directory: Path, stored: dict, requested: dict) -> None:
    """``ValueError`` naming the fields in which an existing ``model.json`` differs."""
    have, want = stored.get("model_config", {}), requested["model_config"]
    diff = [f"{k}: stored {have.get(k)!r} vs requested {v!r}" for k, v in sorted(want.items())
            if have.get(k) != v]
    have, want = stored.get(LAYOUTS_KEY) or {}, requested.get(LAYOUTS_KEY) or {}
    paths = sorted(p for p in set(have) | set(want) if have.get(p) != want.get(p))
    if paths:
        diff.append(f"layouts differ at {paths[:5]}{' …' if len(paths) > 5 else ''}")
    if diff:
        raise ValueError(
            f"checkpoint directory {str(directory)!r} was written for an incompatible model "
            f"config ({', '.join(diff)}); use a new run name or directory")


def save_model(directory: str | os.PathLike, params, *, model_config: LlamaConfig,
               tokenizer: tokenizers.Tokenizer, step: int = 0,
               meta: dict[str, Any] | None = None,
               layouts: Mapping[str, Layout] | None = None) -> Path:
    """Write ``params`` as a one-step checkpoint that :func:`load_model` reads back.

    With ``layouts`` (``{path: Layout}``, e.g. from :mod:`admm_jax.models.compact`) it is a
    compact checkpoint (:data:`COMPACT_FORMAT`); ``params`` must then have exactly the leaves
    and shapes of ``abstract_params(config, linear=structured_factory(layouts, config))``, or a
    ``ValueError`` names the difference before anything is written."""
    layouts = dict(layouts or {})
    if layouts:
        expected = abstract_params(model_config,
                                   linear=linear_factory(model_config, layouts))[1]
        mismatch = params_mismatch(params, expected)
        if mismatch:
            raise ValueError(f"params do not fit their layouts "
                             f"({_describe_layouts(layouts)}): {mismatch}")
    ckpt = Checkpointer(directory, model_config=model_config, tokenizer=tokenizer,
                        layouts=layouts)
    ckpt.save(step, params, meta=meta)
    ckpt.wait()
    ckpt.close()
    return ckpt.directory


def load_model(path: str | os.PathLike, step: int | None = None) -> LoadedModel:
    """Load the params, config, tokenizer, meta and layouts of a checkpoint (or run) directory,
    dense (:data:`FORMAT`) or compact (:data:`COMPACT_FORMAT`)."""
    directory = resolve_checkpoint_dir(path)
    info = json.loads((directory / MODEL_FILE).read_text())
    layouts = read_layouts(info, directory)
    config = LlamaConfig.from_dict(info["model_config"])
    tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
    ckpt = Checkpointer(directory, model_config=config, tokenizer=tokenizer, layouts=layouts)
    params, _, _, meta = ckpt.restore(step)
    ckpt.close()
    return LoadedModel(config, params, tokenizer, meta, int(meta["step"]), layouts)


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a checkpoint (or run) directory: the sizes of all files under it
    (params of every step, ``model.json``, the tokenizer, orbax metadata)."""
    directory = resolve_checkpoint_dir(path)
    return int(sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()))
