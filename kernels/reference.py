"""Pure-jnp references for the sparse products: simple, obviously right, and dense.

With ``W`` the dense form of a :class:`~kernels.sparse.SparseMatrix` (COO) or a
:class:`~kernels.block.BlockSparseMatrix` (BSR), ``x [T, n_in]``, ``dy [T, n_out]``:

    spmm(x, W)     = x @ W                         [T, n_out]
    spmm_t(dy, W)  = dy @ Wᵀ                       [T, n_in]
    sddmm(x, dy, W)[i] = (xᵀ dy)[rows[i], cols[i]] = Σ_t x[t, rows[i]] · dy[t, cols[i]]   (COO)
    sddmm(x, dy, W)[k] = (xᵀ dy)[r_k-tile, c_k-tile]                      [n_blocks, b, b]  (BSR)

where a BSR tile of the dense gradient is read from ``xᵀ dy`` zero-padded to the block grid (its
entries in the padding are 0). These build the ``n_in × n_out`` matrix (the SDDMM even the dense
gradient ``xᵀ dy``) and serve as the ground truth of the tests; the XLA and Pallas paths never do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.block import BlockSparseMatrix
from kernels.sparse import SparseMatrix
from kernels.sparse import accumulation_dtype as _acc


def spmm(x: jax.Array, w: SparseMatrix | BlockSparseMatrix) -> jax.Array:
    """``x @ W`` through the dense ``W`` (float32 or wider accumulation)."""
    dt = _acc(x, w.values)
    return x.astype(dt) @ w.to_dense().astype(dt)


def spmm_t(dy: jax.Array, w: SparseMatrix | BlockSparseMatrix) -> jax.Array:
    """``dy @ Wᵀ`` through the dense ``W``."""
    dt = _acc(dy, w.values)
    return dy.astype(dt) @ w.to_dense().astype(dt).T


def sddmm(x: jax.Array, dy: jax.Array, w: SparseMatrix | BlockSparseMatrix) -> jax.Array:
    """The dense gradient ``xᵀ dy``, then gathered on the support: ``[nnz]`` at ``(rows, cols)``
    (COO) or the ``[n_blocks, b, b]`` tiles at ``(block_rows, block_cols)`` (BSR)."""
    dt = _acc(x, dy)
    dense = x.astype(dt).T @ dy.astype(dt)
    if isinstance(w, BlockSparseMatrix):
        b, (g0, g1) = w.block_size, w.grid
        dense = jnp.pad(dense, ((0, g0 * b - w.shape[0]), (0, g1 * b - w.shape[1])))
        tiles = dense.reshape(g0, b, g1, b).transpose(0, 2, 1, 3)
        return tiles[w.block_rows.astype(jnp.int32), w.block_cols.astype(jnp.int32)]
    return dense[w.rows.astype(jnp.int32), w.cols.astype(jnp.int32)]
