"""Adapters in a LLaMA model: choose linears, insert, count, merge into dense and unmerge.

A model's linears are named by their parameter paths (``"layers/3/attn/q_proj"``,
``"layers/0/mlp/down_proj"``, ``"lm_head"``; :func:`admm_jax.models.layouts.linear_specs`).
Any initialisation (standard LoRA, one from gradients, RoSA's masks, RA-SpaRC's split) gives one
:class:`~admm_jax.adapters.modules.AdapterInit` per path; :func:`insert_adapters` swaps each of
those linears for a :class:`~admm_jax.adapters.modules.SparseLoRA` around it::

    paths = adapter_paths(model.config, ("q_proj", "v_proj"))           # every layer
    inits = lora_inits(model, dict.fromkeys(paths, 8), key, scale=2.0)  # LoRA r = 8, λ = 2
    insert_adapters(model, inits)                                       # in place (flax style)
    step = make_train_step(graphdef, tx, trainable=AdapterParam)        # only adapters train
    removed = merge_adapters(model)       # W0' = W0 + λ·A B + Mat(E): a plain dense model
    unmerge_adapters(model, removed)      # W0 = W0' − λ·A B − Mat(E), up to float rounding

:func:`adapt_params` is the same insertion on ``(graphdef, params)`` pure-dict models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from admm_jax.adapters.modules import AdapterInit, SparseLoRA, lora_init
from admm_jax.models.layouts import linear_specs
from admm_jax.models.linears import materialize
from admm_jax.models.llama import LinearName, Llama

__all__ = [
    "ADAPTABLE",
    "adapt_params",
    "adapter_param_count",
    "adapter_paths",
    "adapters_of",
    "insert_adapters",
    "lora_inits",
    "merge_adapters",
    "unmerge_adapters",
]

Array = jax.Array

#: The projections of a decoder block that may carry adapters.
ADAPTABLE: tuple[LinearName, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj")


def adapter_paths(config: Any, names: Sequence[LinearName] = ADAPTABLE,
                  layers: Sequence[int] | None = None) -> list[str]:
    """Paths of the linears ``names`` in decoder blocks ``layers`` (default all) of a model with
    ``config`` (a :class:`~admm_jax.models.config.LlamaConfig`), in model order.

    Raises ``ValueError`` naming an unknown projection or a layer outside ``[0, n_layers)``."""
    unknown = [n for n in names if n not in ADAPTABLE]
    if unknown or not names:
        raise ValueError(f"names must be a non-empty subset of {ADAPTABLE}, got {list(names)}")
    all_layers = range(config.n_layers)
    layers = list(all_layers) if layers is None else list(layers)
    missing = [i for i in layers if i not in all_layers]
    if missing:
        raise ValueError(f"adapters asked for layers {missing}, but the model has layers "
                         f"0 … {config.n_layers - 1}")
    return [s.path for s in linear_specs(config).values() if s.layer in layers and s.name in names]


def _shapes(model: Llama, paths: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{path: (in, out)}`` for ``paths``; ``ValueError`` naming a path the model lacks."""
    specs = linear_specs(model.config)
    missing = [p for p in paths if p not in specs]
    if missing:
        raise ValueError(f"adapters asked for linears {missing} that the model does not have "
                         f"(it has {model.config.n_layers} layers; paths look like "
                         f"'layers/0/attn/q_proj', 'layers/0/mlp/down_proj', 'lm_head')")
    return {p: (specs[p].in_features, specs[p].out_features) for p in paths}


def _keys(path: str) -> list[str | int]:
    return [int(k) if k.isdigit() else k for k in path.split("/")]


def _get(model: nnx.Module, path: str) -> nnx.Module:
    node = model
    for key in _keys(path):
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _set(model: nnx.Module, path: str, module: nnx.Module) -> None:
    *parents, last = _keys(path)
    node = model
    for key in parents:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    setattr(node, last, module)


def lora_inits(model: Llama, ranks: Mapping[str, int], key: Array, *,
               indices: Mapping[str, tuple[Any, Any]] | None = None,
               scale: float | Mapping[str, float] = 1.0) -> dict[str, AdapterInit]:
    """Standard LoRA initialisations (:func:`~admm_jax.adapters.modules.lora_init`: ``B = 0``,
    ``E = 0``, so the model is unchanged) with per-path ranks, optional per-path sparse
    supports ``indices[path] = (rows, cols)`` and a scale λ (one, or one per path).

    Raises ``ValueError`` naming a path the model lacks or an invalid rank / scale."""
    indices = dict(indices or {})
    shapes = _shapes(model, sorted(set(ranks) | set(indices)))
    out = {}
    for k, path in zip(jax.random.split(key, len(shapes)), shapes, strict=True):
        rows, cols = indices.get(path, (None, None))
        lam = scale[path] if isinstance(scale, Mapping) else scale
        try:
            out[path] = lora_init(*shapes[path], ranks.get(path, 0), k, rows=rows, cols=cols,
                                  scale=lam)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    return out


def insert_adapters(model: Llama, inits: Mapping[str, AdapterInit], *,
                    compute_dtype: str | None = None) -> dict[str, SparseLoRA]:
    """Wrap each linear ``inits`` names in a :class:`SparseLoRA` with that initialisation, in
    place (like flax's ``model.layer = nnx.LoRA(..., base_module=model.layer)``).

    Args:
        model: a :class:`~admm_jax.models.llama.Llama` (any linear layers).
        inits: ``{path: AdapterInit}``, e.g. from :func:`lora_inits` or a gradient-based
            initialisation.
        compute_dtype: dtype of the adapters' matmuls (default: the model's).

    Returns:
        ``{path: SparseLoRA}``, the inserted modules.

    Raises:
        ValueError: naming the path, for a linear the model lacks, one that already carries an
            adapter, or an initialisation that does not fit it (shapes, indices, scale).
    """
    shapes = _shapes(model, list(inits))
    dtype = compute_dtype or model.config.compute_dtype
    inserted = {}
    for path in shapes:
        base = _get(model, path)
        if isinstance(base, SparseLoRA):
            raise ValueError(f"{path} already carries an adapter; merge_adapters first")
        try:
            inserted[path] = SparseLoRA(base, inits[path], compute_dtype=dtype)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{path}: {e}") from e
        _set(model, path, inserted[path])
    return inserted


def adapt_params(graphdef: nnx.GraphDef, params: dict, inits: Mapping[str, AdapterInit], *,
                 compute_dtype: str | None = None) -> tuple[nnx.GraphDef, dict]:
    """:func:`insert_adapters` on a pure-dict model: ``(graphdef, params)`` of the adapted
    model (inputs unchanged; the base weights are shared, not copied)."""
    model = nnx.merge(graphdef, params)
    insert_adapters(model, inits, compute_dtype=compute_dtype)
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def adapters_of(model: nnx.Module) -> dict[str, SparseLoRA]:
    """``{path: SparseLoRA}`` of every adapter in ``model``."""
    return {"/".join(map(str, path)): node for path, node in nnx.iter_graph(model)
            if isinstance(node, SparseLoRA)}


def adapter_param_count(model: nnx.Module) -> int:
    """Trainable adapter scalars, ``Σ_layers r·(in + out) + nnz``."""
    return sum(a.param_count for a in adapters_of(model).values())


def _dense_linear(kernel: Array, like: nnx.Module, compute_dtype: str) -> nnx.Linear:
    """A bias-free ``nnx.Linear`` holding ``kernel [in, out]``, with the compute dtype of
    ``like`` if it is an ``nnx.Linear`` (else ``compute_dtype``)."""
    dtype = like.dtype if isinstance(like, nnx.Linear) else jnp.dtype(compute_dtype)
    return nnx.Linear(*kernel.shape, use_bias=False, dtype=dtype, param_dtype=kernel.dtype,
                      kernel_init=lambda *_: kernel, rngs=nnx.Rngs(0))


def merge_adapters(model: nnx.Module) -> dict[str, SparseLoRA]:
    """Fold every adapter into a dense linear, in place: ``W0' = W0 + λ·A B + Mat(E)``.

    The model becomes a plain one (its pure-dict params have the structure of a dense model's).

    Returns:
        ``{path: adapter}``: the adapters removed, detached from their base (``base_module =
        None``), to :func:`unmerge_adapters` later.
    """
    removed = {}
    for path, adapter in adapters_of(model).items():
        merged = _dense_linear(adapter.dense(), adapter.base_module, adapter.compute_dtype)
        removed[path] = SparseLoRA(None, adapter.weights(), compute_dtype=adapter.compute_dtype)
        _set(model, path, merged)
    return removed


def unmerge_adapters(model: Llama, adapters: Mapping[str, SparseLoRA]) -> None:
    """Undo :func:`merge_adapters` in place: each dense linear at ``path`` becomes
    ``SparseLoRA(W0 = W0' − λ·A B − Mat(E), adapters[path])``.

    In floating point ``(W0 + Δ) − Δ`` equals ``W0`` only up to rounding (about
    ``ulp(|W0| + |Δ|)`` per entry), so the recovered base is not bit-identical.

    Raises ``ValueError`` naming a path the model lacks or that holds no dense linear of the
    adapter's shape."""
    _shapes(model, list(adapters))
    for path, adapter in adapters.items():
        linear = _get(model, path)
        if not isinstance(linear, nnx.Linear) or linear.bias is not None or \
                (linear.in_features, linear.out_features) != \
                (adapter.in_features, adapter.out_features):
            raise ValueError(f"{path}: unmerge needs a bias-free nnx.Linear "
                             f"[{adapter.in_features}, {adapter.out_features}] there, got "
                             f"{type(linear).__name__}")
        base = _dense_linear(materialize(linear) - adapter.delta(), linear,
                             adapter.compute_dtype)
        _set(model, path, SparseLoRA(base, adapter.weights(), compute_dtype=adapter.compute_dtype))
