"""Pure-jnp references for the sparse products: simple, obviously right, and dense.

With ``W`` the dense form of a :class:`~kernels.sparse.SparseMatrix`, ``x [T, n_in]``,
``dy [T, n_out]``:

    spmm(x, W)     = x @ W                         [T, n_out]
    spmm_t(dy, W)  = dy @ Wᵀ                       [T, n_in]
    sddmm(x, dy, W)[i] = (xᵀ dy)[rows[i], cols[i]] = Σ_t x[t, rows[i]] · dy[t, cols[i]]

These build the ``n_in × n_out`` matrix (the SDDMM even the dense gradient ``xᵀ dy``) and serve as
the ground truth of the tests; the XLA and Pallas paths never do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.sparse import SparseMatrix, to_dense
from kernels.sparse import accumulation_dtype as _acc


def spmm(x: jax.Array, w: SparseMatrix) -> jax.Array:
    """``x @ W`` through the dense ``W`` (float32 or wider accumulation)."""
    dt = _acc(x, w.values)
    return x.astype(dt) @ to_dense(w).astype(dt)


def spmm_t(dy: jax.Array, w: SparseMatrix) -> jax.Array:
    """``dy @ Wᵀ`` through the dense ``W``."""
    dt = _acc(dy, w.values)
    return dy.astype(dt) @ to_dense(w).astype(dt).T


def sddmm(x: jax.Array, dy: jax.Array, w: SparseMatrix) -> jax.Array:
    """``(xᵀ dy)[rows, cols]``: the dense gradient of ``W``, then gathered on the support."""
    dt = _acc(x, dy)
    dense = x.astype(dt).T @ dy.astype(dt)
    return dense[w.rows.astype(jnp.int32), w.cols.astype(jnp.int32)]
