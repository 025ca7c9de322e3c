"""Compact models from compressed dense ones: pruning masks or SALAAD surrogates → layouts + params.

A compressed model is usually stored and run dense (pruned entries as zeros, ``L + S`` rebuilt as
one matrix). The converters here return a :class:`CompactModel`, the ``{path: Layout}`` of the
compact linears and the params of ``abstract_params(config, linear=structured_factory(layouts,
config))`` — what :func:`admm_jax.training.checkpoint.save_model` writes as a compact checkpoint:

* :func:`compact_from_masks` (one-shot pruners' ``prune() -> (params, masks)``, ELSA's
  ``finalize``): the kept entries ``W ⊙ M`` of every masked linear kernel as a
  :class:`~admm_jax.models.linears.SparseLinear` (COO, ``nnz = |M|``, ``(4 + 2 + 2)·nnz`` bytes
  with int16 indices: below the dense ``4·in·out`` for density < 1/2), for ``structure="N:M"``
  an :class:`~admm_jax.models.linears.NMLinear` (``5·in·out·N/M`` bytes), or, for
  ``structure="blockB"`` (e.g. ``"block16"``), a
  :class:`~admm_jax.models.linears.BlockSparseLinear` of the ``b × b`` tiles that hold a kept
  entry (BSR, ``(4·b² + 2 + 2)`` bytes per tile with int16 indices: a 16 × 16 tile costs
  ``4.02·b²``, so the bytes are the kept tiles' fraction of the dense ``4·in·out``, plus 0.4 %);
* :func:`admm_jax.salaad.compact.compact_from_surrogate` (SALAAD + HPA) builds on
  :func:`assemble_compact` here.

Every other leaf (embedding, norms, ``lm_head``, unconverted kernels) is the source's own array.
A surrogate block that is not a linear kernel (the token embedding) is rebuilt densely, as
``deploy`` does. A linear that keeps nothing is stored as one explicit zero entry (a zero tile
for block structures: orbax cannot store zero-size arrays). :func:`dense_params` materialises a
compact model back (its dense twin: same logits to float rounding), and :func:`resident_bytes`
counts what the params hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from admm_jax.core.tree import flat_paths, path_str
from admm_jax.models.layouts import (
    Layout,
    insert_linears,
    layout_of,
    linear_specs,
    structured_factory,
)
from admm_jax.models.linears import (
    BlockSparseLinear,
    SparseLinear,
    block_sparse_from_dense,
    materialize,
    nm_from_dense,
    sparse_from_dense,
)
from admm_jax.models.llama import LlamaConfig, abstract_params
from admm_jax.ops.structures import NM, Block, StructureSpec, Unstructured, parse_structure

__all__ = [
    "CompactModel",
    "assemble_compact",
    "compact_from_masks",
    "dense_params",
    "linear_path",
    "masks_from_nonzeros",
    "nothing_kept",
    "resident_bytes",
]

KERNEL = "kernel"


class CompactModel(NamedTuple):
    """``layouts``: ``{linear path: Layout}`` of the compact linears; ``params``: the pure-dict
    params of the model those layouts build (index arrays included)."""

    layouts: dict[str, Layout]
    params: dict


def linear_path(leaf: str, linears: Mapping[str, Any]) -> str | None:
    """``"layers/0/attn/q_proj"`` for the kernel leaf ``".../q_proj/kernel"`` of a linear."""
    head, _, tail = leaf.rpartition("/")
    return head if tail == KERNEL and head in linears else None


def _fill(template: dict, source: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """``template`` with each ``ShapeDtypeStruct`` leaf replaced by ``overrides[path]`` (cast to
    the leaf's dtype) or else the source's leaf itself; ``ValueError`` if absent or mis-shaped."""
    def leaf(path, x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        p = path_str(path)
        if p in overrides:
            return jnp.asarray(overrides[p], x.dtype)
        y = source.get(p)
        if y is None or tuple(y.shape) != tuple(x.shape):
            got = "no such leaf" if y is None else f"shape {tuple(y.shape)}"
            raise ValueError(f"source params at {p!r}: expected shape {tuple(x.shape)}, got {got}")
        return y

    return jax.tree_util.tree_map_with_path(leaf, template)


def assemble_compact(config: LlamaConfig, params: Any, modules: Mapping[str, nnx.Module],
              overrides: Mapping[str, Any]) -> CompactModel:
    """The compact model with ``modules`` at their paths, ``overrides`` at leaf paths, and the
    rest of ``params``."""
    layouts = {p: layout_of(m) for p, m in modules.items()}
    template = abstract_params(config, linear=structured_factory(layouts, config))[1]
    return CompactModel(layouts, _fill(insert_linears(template, modules), flat_paths(params),
                                       overrides))


def nothing_kept(shape: tuple[int, int], config: LlamaConfig,
                 block_size: int | None = None) -> SparseLinear | BlockSparseLinear:
    """``W = 0`` as one explicit zero entry at ``(0, 0)``, or with ``block_size`` one zero
    ``b × b`` tile at block ``(0, 0)``."""
    zero = jnp.zeros(1, jnp.int32)
    if block_size is not None:
        tile = jnp.zeros((1, block_size, block_size))
        return BlockSparseLinear(kernels.block_sparse_matrix(tile, zero, zero, shape),
                                 compute_dtype=config.compute_dtype)
    return SparseLinear(kernels.sparse_matrix(jnp.zeros(1), zero, zero, shape),
                        compute_dtype=config.compute_dtype)


def _masked_module(w: Any, mask: Any, structure: Unstructured | NM | Block,
                   config: LlamaConfig) -> nnx.Module:
    keep = np.asarray(mask, bool)
    if keep.shape != tuple(w.shape):
        raise ValueError(f"mask shape {keep.shape} does not match the kernel {tuple(w.shape)}")
    kept = np.where(keep, np.asarray(w, np.float32), 0.0)
    if isinstance(structure, NM):
        return nm_from_dense(kept, structure.n, structure.m, compute_dtype=config.compute_dtype)
    block_size = structure.size if isinstance(structure, Block) else None
    if not keep.any():
        return nothing_kept(kept.shape, config, block_size)
    if block_size is not None:
        return block_sparse_from_dense(kept, keep, block_size=block_size,
                                       compute_dtype=config.compute_dtype)
    return sparse_from_dense(kept, keep, compute_dtype=config.compute_dtype)


def compact_from_masks(config: LlamaConfig, params: Any, masks: Mapping[str, Any], *,
                       structure: StructureSpec = "unstructured") -> CompactModel:
    """The compact twin of a pruned model: kernel ``W`` of each masked linear ``→ W ⊙ M``.

    Args:
        config: the model's config.
        params: its dense params (zeros off the masks, as ``prune`` / ``finalize`` leave them;
            entries off a mask are dropped either way).
        masks: ``{"layers/{i}/{attn|mlp}/{name}/kernel": bool keep mask [in, out]}`` (the masks
            ``prune()`` and ``finalize()`` return). Masked leaves that are not linear kernels
            (e.g. an ELSA-constrained embedding) stay dense, already zeroed in ``params``.
        structure: ``"unstructured"`` → :class:`SparseLinear` of the mask's entries (mask
            entries with weight 0 are kept as explicit zeros); ``"N:M"`` (e.g. ``"2:4"``) →
            :class:`NMLinear`, which needs ``W ⊙ M`` to have at most N nonzeros in every group of
            M inputs of each output; ``"blockB"`` / ``Block(b)`` (e.g. ``"block16"``) →
            :class:`BlockSparseLinear` of every ``b × b`` tile (of the kernel zero-padded to
            multiples of ``b``) that holds a mask entry, storing ``W ⊙ M`` exactly: a mask of
            whole tiles (block pruning) stores just its tiles, any other mask also the zeros
            of its partly kept tiles.

    Raises:
        ValueError: a mask path that is not a leaf of ``params``, a mask of the wrong shape, a
            kernel that does not follow the N:M pattern (the path is named), ``"channel"``.
    """
    structure = parse_structure(structure)
    if not isinstance(structure, (Unstructured, NM, Block)):
        raise ValueError(f"compact layers store unstructured, N:M or block sparsity, not "
                         f"{structure}")
    flat, linears = flat_paths(params), linear_specs(config)
    modules = {}
    for leaf, mask in masks.items():
        if leaf not in flat:
            raise ValueError(f"mask {leaf!r} is not a leaf of params (expected paths like "
                             f"'layers/0/attn/q_proj/kernel')")
        path = linear_path(leaf, linears)
        if path is not None:
            try:
                modules[path] = _masked_module(flat[leaf], mask, structure, config)
            except ValueError as e:
                raise ValueError(f"{leaf}: {e}") from e
    return assemble_compact(config, params, modules, {})


def masks_from_nonzeros(config: LlamaConfig, params: Any) -> dict[str, np.ndarray]:
    """``{kernel path: W ≠ 0}`` of the decoder blocks' projection kernels (the seven linears
    per block that pruning touches; ``lm_head`` is left out): the masks of a pruned model saved
    with zeros."""
    flat = flat_paths(params)
    return {f"{path}/{KERNEL}": np.asarray(flat[f"{path}/{KERNEL}"]) != 0
            for path, spec in linear_specs(config).items() if spec.layer is not None}


def _module_at(model: nnx.Module, path: str) -> nnx.Module:
    node = model
    for key in path.split("/"):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node


def dense_params(config: LlamaConfig, layouts: Mapping[str, Layout], params: Any) -> dict:
    """The dense twin of a compact model: params of ``abstract_params(config)`` with each
    compact linear's kernel ``materialize(module)`` and every other leaf the same array."""
    if not layouts:
        return params
    graphdef = abstract_params(config, linear=structured_factory(layouts, config))[0]
    model = nnx.merge(graphdef, params)
    dense_kernels = {f"{p}/{KERNEL}": materialize(_module_at(model, p)) for p in layouts}
    return _fill(abstract_params(config)[1], flat_paths(params), dense_kernels)


def resident_bytes(params: Any) -> int:
    """``Σ size · itemsize`` over the array leaves of ``params`` (each at its own dtype: fp32
    values, tiles and factors, int16/int32 COO and block indices, uint8 N:M indices)."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(params)))
