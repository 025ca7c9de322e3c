"""Pallas kernels for GPU (Triton): SpMM, SpMMᵀ and SDDMM over COO entries and over BSR tiles.

Every kernel is lowered through Triton (``compiler_params=TritonCompilerParams``); Mosaic GPU, the
other Pallas GPU backend, accepts only warpgroup-sized copies and no integer-array indexers, which
is what these kernels are made of. ``interpret=True`` runs the same kernels on any backend.

**COO SpMM over output tiles** (``y = x @ W``; on the entries re-sorted by row, ``dx = dy @ Wᵀ``).
Entries are sorted by output column, so output tile ``j`` (columns ``[j·BC, (j+1)·BC)``) owns the
contiguous run ``[off[j], off[j+1])`` of the tile offsets. The grid is ``(output tiles, token
tiles)``; program ``(j, t)`` walks its run in chunks of ``BNZ`` entries:

    G      = x[t-tile, src[chunk]] · values[chunk]      [BT, BNZ]   (a 2-D gather load)
    H      = onehot(dst[chunk] − j·BC)                    [BNZ, BC]
    y_tile += G @ H                                       [BT, BC]

The gather indexes both axes with broadcast ``[BT, BNZ]`` integer arrays (token rows, source
columns): Triton turns it into one pointer tensor, so ``x`` is read in place, never transposed.
The one-hot product scatters each gathered column into its output column with one ``dot``
instead of atomics — every output tile is written once, by one program, deterministically (the
"one output tile per thread block, walk its nonzeros" decomposition of Gale et al. 2020, "Sparse
GPU Kernels for Deep Learning"). It costs ``BC`` multiply-adds per useful one, which is why the
dispatcher densifies layers above a density crossover (:mod:`kernels.ops`). The last chunk
may run past ``off[j+1]``: those entries belong to later tiles (outside this tile's one-hot
range) or are padding (value 0), so they add nothing and need no mask.

**COO SDDMM over entry chunks** (``dvalues[i] = Σ_t x[t, rows[i]] · dy[t, cols[i]]``). The grid is
``(⌈nnz / BNZ⌉,)``; each program gathers ``x[t-tile, rows[chunk]]`` and ``dy[t-tile, cols[chunk]]``
one token tile at a time and accumulates their product over tokens: ``[BT, BNZ]`` registers,
never an ``n_in × n_out`` array.

**BSR SpMM over output block columns** (``y[:, c] = Σ_{k: col_k = c} x[:, row_k] · V_k``). Blocks
are sorted by block column; program ``(c, t)`` loops over its blocks, slices the ``[BT, b]`` tile
of ``x`` at block row ``row_k`` and adds ``x_tile @ V_k`` (``V_kᵀ`` for ``dx = dy @ Wᵀ``, on the
row-sorted order) into a ``[BT, b]`` accumulator: dense ``b × b`` tensor-core products, no
redundant FLOPs. **BSR SDDMM** gives each block a program: ``dV_k = Σ_t x_tileᵀ dy_tile``.

Precision: every ``dot`` accumulates in float32 (``preferred_element_type``); float32 operands use
``Precision.HIGHEST`` (IEEE fp32, not TF32), bf16 operands run bf16 × bf16 → fp32, the tensor-core
mode whose products are exact. The COO gathers compute ``G`` in float32, so COO results are the
fp32-accumulated sums the reference computes.

Padding: tokens to a multiple of ``BT`` (zero rows), COO entries to a multiple of ``BNZ`` plus one
chunk (value 0, index 0), outputs to a multiple of ``BC`` (COO) or ``b`` (BSR), BSR inputs to the
block grid; results are sliced back. Tile sizes are powers of two ≥ 16, as Triton's ``dot``
requires (so BSR needs ``b ∈ {16, 32, 64, …}``).

Toolchain: ``jax.export(..., platforms=["cuda"])`` runs this module's whole Python lowering to
Triton IR on any machine (``tests/test_lowering.py``); compiling the IR to PTX and running it
needs a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels.block import BlockSparseMatrix, block_row_order
from kernels.sparse import SparseMatrix, pad_to, row_order, segment_offsets
from kernels.sparse import accumulation_dtype as _acc

BNZ = 128  # COO entries per chunk
BC = 32  # COO output columns per tile
BT_MAX = 64  # tokens per tile
NUM_WARPS = 4

_TRITON = pl_triton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def token_tile(t: int) -> int:
    """Power-of-two token tile: ``≥ 16`` (the smallest Triton ``dot``), ``≤ BT_MAX``."""
    return min(BT_MAX, max(16, 1 << max(t - 1, 0).bit_length()))


def supports_block(b: int) -> bool:
    """Whether these kernels take ``b × b`` tiles: Triton's ``dot`` needs powers of two ≥ 16."""
    return b >= 16 and b & (b - 1) == 0


def _check_block(b: int) -> None:
    if not supports_block(b):
        raise ValueError(f"the Triton BSR kernels need a block size that is a power of two ≥ 16, "
                         f"got {b}; use impl='xla' (any block size) or re-block the matrix")


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` accumulated in fp32: IEEE fp32 for float32 operands, bf16 tensor cores else."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _whole(a: jax.Array):
    return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def _gather_2d(ref, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """``ref[rows[:, None], cols[None, :]]`` as one 2-D gather load ``[len(rows), len(cols)]``."""
    shape = (rows.shape[0], cols.shape[0])
    return ref[jnp.broadcast_to(rows[:, None], shape), jnp.broadcast_to(cols[None, :], shape)]


# --------------------------------------------------------------------------------------- COO


def _coo_spmm_kernel(off_ref, src_ref, dst_ref, val_ref, x_ref, y_ref):
    j = pl.program_id(0)
    start, end = off_ref[j], off_ref[j + 1]
    tokens = jnp.arange(y_ref.shape[0], dtype=jnp.int32)
    out_cols = jnp.arange(BC, dtype=jnp.int32)

    def body(k, acc):
        chunk = pl.ds(start + k * BNZ, BNZ)
        src, dst = src_ref[chunk], dst_ref[chunk]
        g = _gather_2d(x_ref, tokens, src).astype(jnp.float32)
        g = g * val_ref[chunk].astype(jnp.float32)[None, :]
        onehot = (dst[:, None] - j * BC == out_cols[None, :]).astype(jnp.float32)
        return acc + _dot(g, onehot)

    n_chunks = (end - start + BNZ - 1) // BNZ
    acc = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros(y_ref.shape, jnp.float32))
    y_ref[...] = acc.astype(y_ref.dtype)


def _coo_segment_matmul(x: jax.Array, values: jax.Array, src: jax.Array, dst: jax.Array,
                        n_dst: int, out_dtype: jnp.dtype, interpret: bool) -> jax.Array:
    """``out[t, d] = Σ_{i: dst[i]=d} values[i] · x[t, src[i]]`` with ``dst`` sorted."""
    t, n_src = x.shape
    bt = token_tile(t)
    xp = pad_to(x, 0, bt)
    n_tiles = -(-n_dst // BC)
    off = segment_offsets(dst, n_dst, BC)
    src_p, dst_p, val_p = (pad_to(a, 0, BNZ, BNZ) for a in (src, dst, values))
    out = pl.pallas_call(
        _coo_spmm_kernel,
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], n_tiles * BC), out_dtype),
        grid=(n_tiles, xp.shape[0] // bt),
        in_specs=[_whole(off), _whole(src_p), _whole(dst_p), _whole(val_p),
                  pl.BlockSpec((bt, n_src), lambda i, k: (k, 0))],
        out_specs=pl.BlockSpec((bt, BC), lambda i, k: (k, i)),
        compiler_params=_TRITON,
        interpret=interpret,
    )(off, src_p, dst_p, val_p, xp)
    return out[:t, :n_dst]


def spmm(x: jax.Array, w: SparseMatrix, *, interpret: bool = False) -> jax.Array:
    """``x @ W`` for ``x [T, n_in]`` with the output-tile kernel."""
    return _coo_segment_matmul(x, w.values, w.rows.astype(jnp.int32), w.cols.astype(jnp.int32),
                               w.shape[1], _acc(x, w.values), interpret)


def spmm_t(dy: jax.Array, w: SparseMatrix, *, interpret: bool = False) -> jax.Array:
    """``dy @ Wᵀ`` for ``dy [T, n_out]``: the output-tile kernel on the entries re-sorted by
    row (:func:`~kernels.sparse.row_order`), i.e. on ``Wᵀ`` in its own column-major order."""
    perm = row_order(w)
    return _coo_segment_matmul(dy, w.values[perm], w.cols[perm].astype(jnp.int32),
                               w.rows[perm].astype(jnp.int32), w.shape[0], _acc(dy, w.values),
                               interpret)


def _coo_sddmm_kernel(rows_ref, cols_ref, x_ref, dy_ref, out_ref, *, bt: int):
    rows, cols = rows_ref[...], cols_ref[...]
    tokens = jnp.arange(bt, dtype=jnp.int32)

    def body(k, acc):
        xs = _gather_2d(x_ref, k * bt + tokens, rows).astype(jnp.float32)
        ds = _gather_2d(dy_ref, k * bt + tokens, cols).astype(jnp.float32)
        return acc + jnp.sum(xs * ds, axis=0)

    n_tiles = x_ref.shape[0] // bt
    out_ref[...] = jax.lax.fori_loop(0, n_tiles, body, jnp.zeros((BNZ,), jnp.float32))


def sddmm(x: jax.Array, dy: jax.Array, w: SparseMatrix, *,
          interpret: bool = False) -> jax.Array:
    """``dvalues[i] = Σ_t x[t, rows[i]] · dy[t, cols[i]]`` with the entry-chunk kernel."""
    if w.nnz == 0:
        return jnp.zeros((0,), _acc(x, dy))
    bt = token_tile(x.shape[0])
    xp, dyp = pad_to(x, 0, bt), pad_to(dy, 0, bt)
    rows, cols = (pad_to(a.astype(jnp.int32), 0, BNZ) for a in (w.rows, w.cols))
    chunk = pl.BlockSpec((BNZ,), lambda i: (i,))
    out = pl.pallas_call(
        lambda *refs: _coo_sddmm_kernel(*refs, bt=bt),
        out_shape=jax.ShapeDtypeStruct(rows.shape, jnp.float32),
        grid=(rows.shape[0] // BNZ,),
        in_specs=[chunk, chunk, _whole(xp), _whole(dyp)],
        out_specs=chunk,
        compiler_params=_TRITON,
        interpret=interpret,
    )(rows, cols, xp, dyp)
    return out[:w.nnz].astype(_acc(x, dy))


# --------------------------------------------------------------------------------------- BSR


def _block_spmm_kernel(off_ref, src_ref, tiles_ref, x_ref, y_ref, *, b: int, transpose: bool):
    c = pl.program_id(0)

    def body(k, acc):
        x_tile = x_ref[:, pl.ds(src_ref[k] * b, b)]
        tile = tiles_ref[k]
        return acc + _dot(x_tile, tile.T if transpose else tile)

    acc = jax.lax.fori_loop(off_ref[c], off_ref[c + 1], body,
                            jnp.zeros(y_ref.shape, jnp.float32))
    y_ref[...] = acc.astype(y_ref.dtype)


def _block_segment_matmul(x: jax.Array, tiles: jax.Array, src: jax.Array, dst: jax.Array,
                          n_dst_blocks: int, n_out: int, transpose: bool, out_dtype: jnp.dtype,
                          interpret: bool) -> jax.Array:
    """``out[:, d-block] = Σ_{k: dst[k]=d} x[:, src[k]-block] · T_k`` (``T_kᵀ`` if
    ``transpose``) for ``x [T, n_src]`` and ``dst`` sorted; ``[T, n_out]``."""
    t = x.shape[0]
    b = tiles.shape[1]
    _check_block(b)
    bt = token_tile(t)
    cdt = jnp.result_type(x, tiles)
    xp = pad_to(pad_to(x.astype(cdt), 0, bt), 1, b)
    off = segment_offsets(dst, n_dst_blocks)
    src = pad_to(src.astype(jnp.int32), 0, 1, 1)  # length ≥ 1: Triton refs are never empty
    tiles = pad_to(tiles.astype(cdt), 0, 1, 1)
    out = pl.pallas_call(
        lambda *refs: _block_spmm_kernel(*refs, b=b, transpose=transpose),
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], n_dst_blocks * b), out_dtype),
        grid=(n_dst_blocks, xp.shape[0] // bt),
        in_specs=[_whole(off), _whole(src), _whole(tiles),
                  pl.BlockSpec((bt, xp.shape[1]), lambda i, k: (k, 0))],
        out_specs=pl.BlockSpec((bt, b), lambda i, k: (k, i)),
        compiler_params=_TRITON,
        interpret=interpret,
    )(off, src, tiles, xp)
    return out[:t, :n_out]


def block_spmm(x: jax.Array, w: BlockSparseMatrix, *, interpret: bool = False) -> jax.Array:
    """``x @ W`` for ``x [T, n_in]`` and a :class:`~kernels.block.BlockSparseMatrix` ``W``:
    one program per (output block column, token tile)."""
    return _block_segment_matmul(x, w.values, w.block_rows, w.block_cols, w.grid[1], w.shape[1],
                                 False, _acc(x, w.values), interpret)


def block_spmm_t(dy: jax.Array, w: BlockSparseMatrix, *, interpret: bool = False) -> jax.Array:
    """``dy @ Wᵀ`` for ``dy [T, n_out]``: the same kernel over the blocks in row order, each
    tile transposed."""
    perm = block_row_order(w)
    return _block_segment_matmul(dy, w.values[perm], w.block_cols[perm], w.block_rows[perm],
                                 w.grid[0], w.shape[0], True, _acc(dy, w.values), interpret)


def _block_sddmm_kernel(rows_ref, cols_ref, x_ref, dy_ref, out_ref, *, b: int, bt: int):
    k = pl.program_id(0)
    r, c = rows_ref[k] * b, cols_ref[k] * b

    def body(t, acc):
        tokens = pl.ds(t * bt, bt)
        return acc + _dot(x_ref[tokens, pl.ds(r, b)].T, dy_ref[tokens, pl.ds(c, b)])

    out_ref[0] = jax.lax.fori_loop(0, x_ref.shape[0] // bt, body,
                                   jnp.zeros((b, b), jnp.float32))


def block_sddmm(x: jax.Array, dy: jax.Array, w: BlockSparseMatrix, *,
                interpret: bool = False) -> jax.Array:
    """``dV_k = x[:, row_k-block]ᵀ dy[:, col_k-block]`` → ``[n_blocks, b, b]``: one program
    per block, looping over token tiles."""
    b = w.block_size
    _check_block(b)
    if w.n_blocks == 0:
        return jnp.zeros((0, b, b), _acc(x, dy))
    bt = token_tile(x.shape[0])
    cdt = jnp.result_type(x, dy)
    xp = pad_to(pad_to(x.astype(cdt), 0, bt), 1, b)
    dyp = pad_to(pad_to(dy.astype(cdt), 0, bt), 1, b)
    rows, cols = w.block_rows.astype(jnp.int32), w.block_cols.astype(jnp.int32)
    out = pl.pallas_call(
        lambda *refs: _block_sddmm_kernel(*refs, b=b, bt=bt),
        out_shape=jax.ShapeDtypeStruct((w.n_blocks, b, b), jnp.float32),
        grid=(w.n_blocks,),
        in_specs=[_whole(rows), _whole(cols), _whole(xp), _whole(dyp)],
        out_specs=pl.BlockSpec((1, b, b), lambda k: (k, 0, 0)),
        compiler_params=_TRITON,
        interpret=interpret,
    )(rows, cols, xp, dyp)
    return out.astype(_acc(x, dy))
