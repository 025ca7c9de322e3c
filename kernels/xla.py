"""XLA formulations of the sparse products for CPU: chunked gather + segment-sum and chunked SDDMM.

Both work in the token-transposed layout ``xᵀ [n_in, T]`` so that every gather fetches a
contiguous row of ``T`` numbers, and both scan over the nonzeros in chunks of ``CHUNK``
entries so that the gathered intermediate is ``[CHUNK, T]`` whatever ``nnz`` is:

    y ᵀ[c, :]  = Σ_{i: cols[i]=c} values[i] · xᵀ[rows[i], :]      (sorted segment-sum, forward)
    dxᵀ[r, :]  = Σ_{i: rows[i]=r} values[i] · dyᵀ[cols[i], :]     (unsorted segment-sum, dy @ Wᵀ)
    dvalues[i] = ⟨xᵀ[rows[i], :], dyᵀ[cols[i], :]⟩                 (SDDMM, Gale et al. 2020)

Peak extra memory: ``[CHUNK, T]`` plus the ``[n_out, T]`` output; never ``[n_in, n_out]``.

Measured on CPU (2 cores, shared; median of 20 jitted calls; layer 576 × 1536, fp32), ms:

    ===========================  ==========  ==========  ==========  ==========
    op (density, tokens)          1 %, 1      1 %, 512    5 %, 1      5 %, 512
    ===========================  ==========  ==========  ==========  ==========
    dense x @ W (densify W)       0.22        4.8         0.47        5.2
    gather + segment-sum          0.043       5.3         0.145       77.5
    gather + scatter-add          0.041       37.1        0.147       230.0
    BCOO dot_general              0.051       6.6         0.210       69.9
    this module: spmm             0.049       1.6         0.171       5.0
    this module: spmm_t           0.045       2.7         0.093       5.3
    SDDMM dense-then-gather       0.069       5.5         0.079       5.6
    SDDMM gather, one shot        0.038       44.0        0.167       210.1
    SDDMM column tiles of xᵀdy    0.096       7.4         0.523       7.3
    this module: sddmm            0.045       3.3         0.086       10.3
    ===========================  ==========  ==========  ==========  ==========

On a loaded 2-core CPU single numbers move by up to 2× between runs (the chunked forward
measured 4.4 ms at 1 %, 512 tokens in an earlier run). Chunking turns the one-shot gathers,
which spill out of cache at 512 tokens, into cache-sized pieces: 10–20× faster at 5 %. At
decode (1 token) the sparse forms beat dense by 2.5–4×; at 512 tokens they beat or match dense
at 1 % and reach or lose to it at 5 % (the SDDMM 2×), since CPU matmul is compute-dense and
XLA's gathers cost about a nanosecond per element. Chunk sizes 256–4096 were within noise;
1024 is kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.sparse import SparseMatrix
from kernels.sparse import accumulation_dtype as _acc

CHUNK = 1024


def _chunks(n: int, *arrays: jax.Array, fill: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Each 1-D array padded with its ``fill`` to a multiple of ``CHUNK`` and reshaped to
    ``[n_chunks, CHUNK]``."""
    pad = (-n) % CHUNK
    return tuple(jnp.pad(a, (0, pad), constant_values=f).reshape(-1, CHUNK)
                 for a, f in zip(arrays, fill))


def _segment_matmul(xt: jax.Array, values: jax.Array, src: jax.Array, dst: jax.Array,
                    n_dst: int, dst_sorted: bool) -> jax.Array:
    """``outᵀ[d, :] = Σ_{i: dst[i]=d} values[i] · xt[src[i], :]`` for ``xt [n_src, T]``:
    returns ``[n_dst, T]``. Padding entries point to segment ``n_dst`` and are dropped."""
    v, s, d = _chunks(values.shape[0], values.astype(xt.dtype), src.astype(jnp.int32),
                      dst.astype(jnp.int32), fill=(0, 0, n_dst))

    def body(acc, chunk):
        vc, sc, dc = chunk
        return acc + jax.ops.segment_sum(xt[sc] * vc[:, None], dc, n_dst,
                                         indices_are_sorted=dst_sorted), None

    out, _ = jax.lax.scan(body, jnp.zeros((n_dst, xt.shape[1]), xt.dtype), (v, s, d))
    return out



def spmm(x: jax.Array, w: SparseMatrix) -> jax.Array:
    """``x @ W`` for ``x [T, n_in]`` by chunked gather + sorted segment-sum (see module doc)."""
    xt = x.astype(_acc(x, w.values)).T
    return _segment_matmul(xt, w.values, w.rows, w.cols, w.shape[1], dst_sorted=True).T


def spmm_t(dy: jax.Array, w: SparseMatrix) -> jax.Array:
    """``dy @ Wᵀ`` for ``dy [T, n_out]``: the same product with rows and columns swapped (the
    entries are not sorted by row, so the segment-sum is unsorted)."""
    dyt = dy.astype(_acc(dy, w.values)).T
    return _segment_matmul(dyt, w.values, w.cols, w.rows, w.shape[0], dst_sorted=False).T


def sddmm(x: jax.Array, dy: jax.Array, w: SparseMatrix) -> jax.Array:
    """``dvalues[i] = Σ_t x[t, rows[i]] · dy[t, cols[i]]`` in chunks of ``CHUNK`` entries."""
    dt = _acc(x, dy)
    xt, dyt = x.astype(dt).T, dy.astype(dt).T
    r, c = _chunks(w.nnz, w.rows.astype(jnp.int32), w.cols.astype(jnp.int32), fill=(0, 0))

    def body(_, chunk):
        rc, cc = chunk
        return None, jnp.sum(xt[rc] * dyt[cc], axis=1)

    _, out = jax.lax.scan(body, None, (r, c))
    return out.reshape(-1)[:w.nnz]

