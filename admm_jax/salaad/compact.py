"""SALAAD deployments as compact models: the layers of an HPA (or sensitivity) allocation stored
and run as factors plus sparse entries instead of a rebuilt dense matrix.

Block ``b`` kept at rank ``r'`` and ``k'`` entries becomes
``SumLinear(LowRankLinear(u_r √s_r, (v_r √s_r)ᵀ), SparseLinear(top-k'))`` — or one part when the
other is empty — which stands for exactly the matrix :func:`admm_jax.salaad.hpa.deploy` rebuilds
densely (``r'·(m + n) + k'`` numbers + indices). A block-structured sparse part
(``sparse_block = b > 1``) becomes a :class:`BlockSparseLinear` of its top-``k'`` ``b × b`` tiles
instead. A surrogate block that is not a linear kernel (the token embedding) is rebuilt densely,
as ``deploy`` does.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from admm_jax.core.tree import flat_paths
from admm_jax.models.compact import (
    CompactModel,
    assemble_compact,
    linear_path,
    nothing_kept,
)
from admm_jax.models.layouts import linear_specs
from admm_jax.models.linears import (
    BlockSparseLinear,
    SparseLinear,
    SumLinear,
    low_rank_from_factors,
)
from admm_jax.models.llama import LlamaConfig
from admm_jax.ops.structures import tile_grid
from admm_jax.salaad.hpa import Allocation
from admm_jax.salaad.surrogate import BlockSurrogate, Surrogate, reconstruct


def _block_sparse_module(block: BlockSurrogate, n_sparse: int,
                         config: LlamaConfig) -> BlockSparseLinear:
    """The top-``n_sparse`` tiles of a block-structured surrogate as a :class:`BlockSparseLinear`
    (tile index ``t`` of the ``[R, C]`` grid is block row ``t // C``, block column ``t % C``)."""
    cols = tile_grid(block.shape, block.sparse_block)[1]
    flat = np.asarray(block.indices[:n_sparse], np.int64)
    matrix = kernels.block_sparse_matrix(jnp.asarray(block.values[:n_sparse], jnp.float32),
                                         flat // cols, flat % cols, block.shape)
    return BlockSparseLinear(matrix, compute_dtype=config.compute_dtype)


def _surrogate_module(block: BlockSurrogate, rank: int, n_sparse: int,
                      config: LlamaConfig) -> nnx.Module:
    """Top-``rank`` triplets + top-``n_sparse`` entries of ``block`` as compact layers."""
    parts, (m, n) = [], block.shape
    if rank:
        parts.append(low_rank_from_factors(block.u[:, :rank], block.s[:rank], block.v[:, :rank],
                                           compute_dtype=config.compute_dtype))
    if n_sparse and block.sparse_block > 1:
        parts.append(_block_sparse_module(block, n_sparse, config))
    elif n_sparse:
        flat = np.asarray(block.indices[:n_sparse], np.int64)
        matrix = kernels.sparse_matrix(jnp.asarray(block.values[:n_sparse], jnp.float32), flat // n,
                               flat % n, (m, n))
        parts.append(SparseLinear(matrix, compute_dtype=config.compute_dtype))
    if not parts:
        return nothing_kept((m, n), config)
    return parts[0] if len(parts) == 1 else SumLinear(parts)


def compact_from_surrogate(config: LlamaConfig, params: Any, surrogate: Surrogate,
                           allocation: Allocation) -> CompactModel:
    """The compact form of :func:`admm_jax.salaad.hpa.deploy` ``(params, surrogate,
    allocation)``: each linear block ``b`` as ``L_b + S_b`` with ``L_b`` the top
    ``allocation.ranks[b]`` singular triplets (a :class:`LowRankLinear`) and ``S_b`` the top
    ``allocation.n_sparse[b]`` entries (a :class:`SparseLinear`; tiles of a block-structured
    surrogate: a :class:`BlockSparseLinear`); surrogate blocks that are not
    linear kernels are reconstructed densely; all other leaves are ``params``' own.

    Raises:
        ValueError: if ``allocation`` does not cover exactly the surrogate's blocks, or a block
            is not a leaf of ``params`` with its shape.
    """
    if set(allocation.ranks) != set(surrogate) or set(allocation.n_sparse) != set(surrogate):
        raise ValueError("allocation and surrogate cover different blocks; allocate this "
                         "surrogate first")
    flat = flat_paths(params)
    for key, block in surrogate.items():
        if key not in flat or tuple(flat[key].shape) != tuple(block.shape):
            raise ValueError(f"surrogate block {key!r} of shape {tuple(block.shape)} is not a "
                             "leaf of params with that shape")
    modules, overrides, linears = {}, {}, linear_specs(config)
    for key, block in surrogate.items():
        rank, n_sparse = allocation.ranks[key], allocation.n_sparse[key]
        path = linear_path(key, linears)
        if path is None:
            overrides[key] = reconstruct(block, rank, n_sparse)
        else:
            modules[path] = _surrogate_module(block, rank, n_sparse, config)
    return assemble_compact(config, params, modules, overrides)
