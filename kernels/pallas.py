"""Pallas kernels for the sparse products (GPU; ``interpret=True`` runs them anywhere).

**SpMM over column tiles** (``y = x @ W`` and, on the transposed entry order, ``dx = dy @ Wᵀ``).
The entries are sorted by output column, so column tile ``j`` (columns ``[j·BC, (j+1)·BC)``) owns
the contiguous run ``[off[j], off[j+1])`` of CSC-like tile offsets. The grid is
``(column tiles, token tiles)``; program ``(j, t)`` walks its run in chunks of ``BNZ`` entries:

    G      = x[t-tile, src[chunk]] · values[chunk]          [BT, BNZ]   (row gather from x)
    H      = onehot(dst[chunk] − j·BC)                        [BNZ, BC]
    y_tile += G @ H                                           [BT, BC]

The one-hot product scatters each gathered column into its output column with a dense
``dot`` (tensor cores on GPU) instead of atomics, so every output tile is written once, by one
program, deterministically — the "one tile of outputs per thread block, walk its nonzeros"
decomposition of Gale et al. 2020 ("Sparse GPU Kernels for Deep Learning"), with the one-hot
reduce in place of their per-row shuffles. The last chunk may run past ``off[j+1]``: those
entries belong to later tiles (outside this tile's one-hot range) or are padding (value 0), so
they add nothing and need no mask. Load balance follows the column-tile nnz; tiles with no
entry skip the loop.

**SDDMM over entry chunks** (``dvalues[i] = Σ_t x[t, rows[i]] · dy[t, cols[i]]``). The grid is
``(⌈nnz / BNZ⌉,)``; each program gathers ``x[:, rows[chunk]]`` and ``dy[:, cols[chunk]]`` one
token tile at a time and accumulates their elementwise product over tokens — ``[BT, BNZ]``
registers, never an ``n_in × n_out`` array.

Padding: tokens to a multiple of ``BT`` (zero rows), entries to a multiple of ``BNZ`` plus one
chunk (value 0, index 0), outputs to a multiple of ``BC``; results are sliced back. Tile sizes
are powers of two, as the Triton lowering requires. Accumulation is float32.

Status: tested in interpret mode only. Mosaic-TPU does not lower dynamic vector gathers from a
ref, so the dispatcher keeps TPU on the XLA path; ``impl="pallas"`` still forces this one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.sparse import SparseMatrix, row_order, segment_offsets
from kernels.sparse import accumulation_dtype as _acc

BNZ = 128  # entries per chunk
BC = 32  # output columns per tile
BT_MAX = 64  # tokens per tile


def _token_tile(t: int) -> int:
    """Power-of-two token tile: ``≥ 16`` (the smallest Triton ``dot``), ``≤ BT_MAX``."""
    return min(BT_MAX, max(16, 1 << max(t - 1, 0).bit_length()))


def _pad_to(a: jax.Array, axis: int, multiple: int, extra: int = 0) -> jax.Array:
    pad = (-a.shape[axis]) % multiple + extra
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    return jnp.pad(a, widths)


def _spmm_kernel(off_ref, src_ref, dst_ref, val_ref, x_ref, y_ref):
    j = pl.program_id(0)
    start, end = off_ref[j], off_ref[j + 1]
    out_cols = jnp.arange(BC, dtype=jnp.int32)

    def body(k, acc):
        base = start + k * BNZ
        chunk = pl.ds(base, BNZ)
        src, dst = src_ref[chunk], dst_ref[chunk]
        g = x_ref[:, src].astype(jnp.float32) * val_ref[chunk].astype(jnp.float32)[None, :]
        onehot = (dst[:, None] - j * BC == out_cols[None, :]).astype(jnp.float32)
        return acc + jnp.dot(g, onehot, preferred_element_type=jnp.float32)

    n_chunks = (end - start + BNZ - 1) // BNZ
    acc = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros(y_ref.shape, jnp.float32))
    y_ref[...] = acc.astype(y_ref.dtype)


def _segment_matmul(x: jax.Array, values: jax.Array, src: jax.Array, dst: jax.Array,
                    n_dst: int, out_dtype: jnp.dtype, interpret: bool) -> jax.Array:
    """``out[t, d] = Σ_{i: dst[i]=d} values[i] · x[t, src[i]]`` with ``dst`` sorted."""
    t, n_src = x.shape
    bt = _token_tile(t)
    xp = _pad_to(x, 0, bt)
    n_tiles = -(-n_dst // BC)
    off = segment_offsets(dst, n_dst, BC)
    src_p, dst_p, val_p = (_pad_to(a, 0, BNZ, BNZ) for a in (src, dst, values))
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, k: (0,) * a.ndim)
    out = pl.pallas_call(
        _spmm_kernel,
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], n_tiles * BC), out_dtype),
        grid=(n_tiles, xp.shape[0] // bt),
        in_specs=[whole(off), whole(src_p), whole(dst_p), whole(val_p),
                  pl.BlockSpec((bt, n_src), lambda i, k: (k, 0))],
        out_specs=pl.BlockSpec((bt, BC), lambda i, k: (k, i)),
        interpret=interpret,
    )(off, src_p, dst_p, val_p, xp)
    return out[:t, :n_dst]



def spmm(x: jax.Array, w: SparseMatrix, *, interpret: bool = False) -> jax.Array:
    """``x @ W`` for ``x [T, n_in]`` with the column-tile kernel."""
    return _segment_matmul(x, w.values, w.rows.astype(jnp.int32), w.cols.astype(jnp.int32),
                           w.shape[1], _acc(x, w.values), interpret)


def spmm_t(dy: jax.Array, w: SparseMatrix, *, interpret: bool = False) -> jax.Array:
    """``dy @ Wᵀ`` for ``dy [T, n_out]``: the column-tile kernel on the entries re-sorted by
    row (:func:`~kernels.sparse.row_order`), i.e. on ``Wᵀ`` in its own column-major order."""
    perm = row_order(w)
    return _segment_matmul(dy, w.values[perm], w.cols[perm].astype(jnp.int32),
                           w.rows[perm].astype(jnp.int32), w.shape[0], _acc(dy, w.values),
                           interpret)


def _sddmm_kernel(rows_ref, cols_ref, x_ref, dy_ref, out_ref, *, bt: int):
    rows, cols = rows_ref[...], cols_ref[...]

    def body(k, acc):
        tile = pl.ds(k * bt, bt)
        xs = x_ref[tile, rows].astype(jnp.float32)
        ds = dy_ref[tile, cols].astype(jnp.float32)
        return acc + jnp.sum(xs * ds, axis=0)

    n_tiles = x_ref.shape[0] // bt
    out_ref[...] = jax.lax.fori_loop(0, n_tiles, body, jnp.zeros((BNZ,), jnp.float32))


def sddmm(x: jax.Array, dy: jax.Array, w: SparseMatrix, *,
          interpret: bool = False) -> jax.Array:
    """``dvalues[i] = Σ_t x[t, rows[i]] · dy[t, cols[i]]`` with the entry-chunk kernel."""
    if w.nnz == 0:
        return jnp.zeros((0,), _acc(x, dy))
    bt = _token_tile(x.shape[0])
    xp, dyp = _pad_to(x, 0, bt), _pad_to(dy, 0, bt)
    rows, cols = (_pad_to(a.astype(jnp.int32), 0, BNZ) for a in (w.rows, w.cols))
    whole = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)
    chunk = pl.BlockSpec((BNZ,), lambda i: (i,))
    out = pl.pallas_call(
        lambda *refs: _sddmm_kernel(*refs, bt=bt),
        out_shape=jax.ShapeDtypeStruct(rows.shape, jnp.float32),
        grid=(rows.shape[0] // BNZ,),
        in_specs=[chunk, chunk, whole(xp), whole(dyp)],
        out_specs=chunk,
        interpret=interpret,
    )(rows, cols, xp, dyp)
    return out[:w.nnz].astype(_acc(x, dy))
