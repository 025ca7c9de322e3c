"""Pallas kernels for TPU (Mosaic): SpMM, SpMMᵀ and SDDMM over COO entries and over BSR tiles.

Mosaic has no vector gather, so the kernels address memory only through what it does have —
scalars read from SMEM and block index maps — and work in the token-transposed layout
``xᵀ [n_in, T]``, in which a row of the weight's input axis is a sublane row of tokens:

**COO** (``y = x @ W``; ``dx = dy @ Wᵀ`` on the entries re-sorted by row). The grid is ``(token
tiles, entry chunks)``; the entry indices and values of a chunk arrive in SMEM and the kernel walks
them one at a time, adding a scaled row into the resident output tile,

    yᵀ[dst[i], t-tile] += values[i] · xᵀ[src[i], t-tile]       (a [1, BT] row axpy)

The output block stays in VMEM across the chunk axis (``"arbitrary"`` semantics) and is zeroed at
the first chunk. **COO SDDMM**: grid ``(entry chunks, token tiles)``; entry ``i`` of the chunk
adds ``Σ_t xᵀ[rows[i], t]·dyᵀ[cols[i], t]`` (a lane reduction) into its output row, accumulated
across token tiles.

**BSR** (Gale et al. 2020 block decomposition with the block indices as scalar prefetch). The
grid runs over the blocks themselves in output order, ``(token tiles, blocks)``; the index maps
read the prefetched block row and column, so step ``k`` sees the ``[b, BT]`` tile of ``xᵀ`` at
``row_k`` and the output tile at ``col_k``, and adds ``V_kᵀ xᵀ_tile`` into it on the MXU.
Consecutive blocks of one output tile keep it resident; one zero block is inserted in front of
every output tile (so tiles with no stored block are written too, and each tile is zeroed at its
first step). **BSR SDDMM**: grid ``(blocks, token tiles)``, ``dV_k += xᵀ_tile dyᵀ_tileᵀ``.

Everything accumulates in float32 (``preferred_element_type``; ``Precision.HIGHEST`` for
float32 operands). The COO row kernels read their operands in float32 (single dynamic sublane
rows of packed bf16 are not addressable), so bf16 inputs are widened once on the way in.
Costs: the transposed layout is one copy of ``x`` (and ``dy``); the COO kernels do ``nnz`` scalar
steps per token tile, so the dispatcher densifies any COO layer above a few percent density on
TPU (:mod:`kernels.ops`); BSR keeps the MXU busy with ``b × b × BT`` products.

Layout rules obeyed: block shapes are multiples of ``(8, 128)`` or whole dimensions (the token
tile is the whole padded token axis up to ``BT_MAX`` and ``BT_MAX`` beyond; BSR tiles are
``b ∈ {16, 32, 48, …}`` sublanes); SMEM holds one chunk of COO indices at a time.

Toolchain: ``jax.export(..., platforms=["tpu"])`` runs this module's Python lowering to a Mosaic
module on any machine (``tests/test_lowering.py``); Mosaic's own compilation of that module
(layout assignment, VMEM allocation) happens in the TPU runtime and needs a TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.block import BlockSparseMatrix, block_row_order
from kernels.sparse import SparseMatrix, pad_to, row_order
from kernels.sparse import accumulation_dtype as _acc

LANES = 128
BNZ = 8 * LANES  # COO entries per SMEM chunk: one (8, 128) block of each index array
BT_MAX = 512  # tokens per tile (lanes: a multiple of 128)

_ACC_OUT = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _token_tile(t: int) -> int:
    """The whole token axis up to ``BT_MAX`` (a block may span a full dimension), else
    ``BT_MAX`` (a multiple of 128 lanes)."""
    return t if t <= BT_MAX else BT_MAX


def supports_block(b: int) -> bool:
    """Whether these kernels take ``b × b`` tiles: ``b`` sublanes, a multiple of 16 (the row
    tile of packed 16-bit data; 8 would do for float32 alone)."""
    return b >= 16 and b % 16 == 0


def _check_block(b: int) -> None:
    if not supports_block(b):
        raise ValueError(f"the Mosaic BSR kernels need a block size that is a multiple of 16, "
                         f"got {b}; use impl='xla' (any block size) or re-block the matrix")


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)


def _smem_chunk(axis: int):
    """Chunk ``g[axis]`` of an entry array laid out as ``[n / 128, 128]`` (:func:`_chunked`), in
    SMEM: a rank-2 ``(8, 128)`` block, the shape Mosaic's block rules accept."""
    return pl.BlockSpec((BNZ // LANES, LANES), lambda *g: (g[axis], 0), memory_space=pltpu.SMEM)


def _chunked(a: jax.Array, dtype) -> jax.Array:
    """A 1-D entry array (at least one chunk) as ``[n_chunks · 8, 128]`` of ``dtype``."""
    a = pad_to(a.astype(dtype), 0, BNZ, BNZ * (a.shape[0] == 0))
    return a.reshape(-1, LANES)


def _entry(ref, i: jax.Array) -> jax.Array:
    """Entry ``i ≥ 0`` of an SMEM chunk from :func:`_smem_chunk` (``lax.div``/``rem``: the
    floor semantics of ``//`` would lower a sign computation, which is TPU-generation specific)."""
    return ref[jax.lax.div(i, LANES), jax.lax.rem(i, LANES)]


# --------------------------------------------------------------------------------------- COO


def _coo_spmm_kernel(src_ref, dst_ref, val_ref, xt_ref, yt_ref):
    @pl.when(pl.program_id(1) == 0)
    def _():
        yt_ref[...] = jnp.zeros(yt_ref.shape, yt_ref.dtype)

    def body(i, carry):
        row = pl.ds(_entry(dst_ref, i), 1)
        yt_ref[row, :] += _entry(val_ref, i) * xt_ref[pl.ds(_entry(src_ref, i), 1), :]
        return carry

    jax.lax.fori_loop(0, BNZ, body, 0)


def _coo_segment_matmul(x: jax.Array, values: jax.Array, src: jax.Array, dst: jax.Array,
                        n_dst: int, interpret: bool) -> jax.Array:
    """``out[t, d] = Σ_{i: dst[i]=d} values[i] · x[t, src[i]]`` → ``[T, n_dst]`` (fp32)."""
    t, n_src = x.shape
    bt = _token_tile(t)
    xt = pad_to(x.astype(jnp.float32).T, 1, bt)
    src, dst = _chunked(src, jnp.int32), _chunked(dst, jnp.int32)
    values = _chunked(values, jnp.float32)
    out = pl.pallas_call(
        _coo_spmm_kernel,
        out_shape=jax.ShapeDtypeStruct((n_dst, xt.shape[1]), jnp.float32),
        grid=(xt.shape[1] // bt, src.size // BNZ),
        in_specs=[_smem_chunk(1), _smem_chunk(1), _smem_chunk(1),
                  pl.BlockSpec((n_src, bt), lambda j, c: (0, j))],
        out_specs=pl.BlockSpec((n_dst, bt), lambda j, c: (0, j)),
        compiler_params=_ACC_OUT,
        interpret=interpret,
    )(src, dst, values, xt)
    return out[:, :t].T


def spmm(x: jax.Array, w: SparseMatrix, *, interpret: bool = False) -> jax.Array:
    """``x @ W`` for ``x [T, n_in]`` by row axpys in the transposed layout."""
    return _coo_segment_matmul(x, w.values, w.rows, w.cols, w.shape[1],
                               interpret).astype(_acc(x, w.values))


def spmm_t(dy: jax.Array, w: SparseMatrix, *, interpret: bool = False) -> jax.Array:
    """``dy @ Wᵀ`` for ``dy [T, n_out]``: the same kernel with rows and columns swapped (on the
    row order, so each output row's updates run back to back)."""
    perm = row_order(w)
    return _coo_segment_matmul(dy, w.values[perm], w.cols[perm], w.rows[perm], w.shape[0],
                               interpret).astype(_acc(dy, w.values))


def _coo_sddmm_kernel(rows_ref, cols_ref, xt_ref, dyt_ref, out_ref):
    @pl.when(pl.program_id(1) == 0)
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    def body(i, carry):
        row, col = pl.ds(_entry(rows_ref, i), 1), pl.ds(_entry(cols_ref, i), 1)
        prod = xt_ref[row, :] * dyt_ref[col, :]
        out_ref[pl.ds(i, 1), :] += jnp.sum(prod, axis=1, keepdims=True)
        return carry

    jax.lax.fori_loop(0, BNZ, body, 0)


def sddmm(x: jax.Array, dy: jax.Array, w: SparseMatrix, *,
          interpret: bool = False) -> jax.Array:
    """``dvalues[i] = Σ_t x[t, rows[i]] · dy[t, cols[i]]``, a chunk of entries per program."""
    if w.nnz == 0:
        return jnp.zeros((0,), _acc(x, dy))
    bt = _token_tile(x.shape[0])
    xt, dyt = (pad_to(a.astype(jnp.float32).T, 1, bt) for a in (x, dy))
    rows, cols = _chunked(w.rows, jnp.int32), _chunked(w.cols, jnp.int32)
    out = pl.pallas_call(
        _coo_sddmm_kernel,
        out_shape=jax.ShapeDtypeStruct((rows.size, 1), jnp.float32),
        grid=(rows.size // BNZ, xt.shape[1] // bt),
        in_specs=[_smem_chunk(0), _smem_chunk(0),
                  pl.BlockSpec((xt.shape[0], bt), lambda c, j: (0, j)),
                  pl.BlockSpec((dyt.shape[0], bt), lambda c, j: (0, j))],
        out_specs=pl.BlockSpec((BNZ, 1), lambda c, j: (c, 0)),
        compiler_params=_ACC_OUT,
        interpret=interpret,
    )(rows, cols, xt, dyt)
    return out[:w.nnz, 0].astype(_acc(x, dy))


# --------------------------------------------------------------------------------------- BSR


def _with_leading_zero_blocks(tiles: jax.Array, src: jax.Array, dst: jax.Array,
                              n_dst: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The blocks (sorted by ``dst``) with one zero block at the front of every output tile
    ``d = 0 … n_dst − 1``: ``(tiles, src, dst, first)`` where ``first[k] = 1`` marks those."""
    b = tiles.shape[1]
    order = jnp.argsort(jnp.concatenate([jnp.arange(n_dst, dtype=jnp.int32),
                                         dst.astype(jnp.int32)]), stable=True)
    tiles = jnp.concatenate([jnp.zeros((n_dst, b, b), tiles.dtype), tiles])[order]
    src = jnp.concatenate([jnp.zeros((n_dst,), jnp.int32), src.astype(jnp.int32)])[order]
    dst = jnp.concatenate([jnp.arange(n_dst, dtype=jnp.int32), dst.astype(jnp.int32)])[order]
    first = (order < n_dst).astype(jnp.int32)
    return tiles, src, dst, first


def _block_spmm_kernel(src_ref, dst_ref, first_ref, tile_ref, xt_ref, yt_ref):
    k = pl.program_id(1)

    @pl.when(first_ref[k] == 1)
    def _():
        yt_ref[...] = jnp.zeros(yt_ref.shape, yt_ref.dtype)

    yt_ref[...] += _dot(tile_ref[0], xt_ref[...])


def _block_segment_matmul(x: jax.Array, tiles: jax.Array, src: jax.Array, dst: jax.Array,
                          n_dst_blocks: int, n_out: int, interpret: bool) -> jax.Array:
    """``outᵀ[d-block] = Σ_{k: dst[k]=d} T_k xᵀ[src[k]-block]`` for tiles ``T_k [b, b]``
    (``dst`` sorted): ``[T, n_out]`` in fp32."""
    t = x.shape[0]
    b = tiles.shape[1]
    _check_block(b)
    bt = _token_tile(t)
    cdt = jnp.result_type(x, tiles)
    xt = pad_to(pad_to(x.astype(cdt).T, 0, b), 1, bt)
    tiles, src, dst, first = _with_leading_zero_blocks(tiles.astype(cdt), src, dst,
                                                       n_dst_blocks)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(xt.shape[1] // bt, tiles.shape[0]),
        in_specs=[pl.BlockSpec((1, b, b), lambda j, k, s, d, f: (k, 0, 0)),
                  pl.BlockSpec((b, bt), lambda j, k, s, d, f: (s[k], j))],
        out_specs=pl.BlockSpec((b, bt), lambda j, k, s, d, f: (d[k], j)),
    )
    out = pl.pallas_call(
        _block_spmm_kernel,
        out_shape=jax.ShapeDtypeStruct((n_dst_blocks * b, xt.shape[1]), jnp.float32),
        grid_spec=grid_spec,
        compiler_params=_ACC_OUT,
        interpret=interpret,
    )(src, dst, first, tiles, xt)
    return out[:n_out, :t].T


def block_spmm(x: jax.Array, w: BlockSparseMatrix, *, interpret: bool = False) -> jax.Array:
    """``x @ W`` for a :class:`~kernels.block.BlockSparseMatrix`: ``yᵀ = Σ_k V_kᵀ xᵀ``, the
    tiles transposed once outside the kernel."""
    return _block_segment_matmul(x, jnp.swapaxes(w.values, 1, 2), w.block_rows, w.block_cols,
                                 w.grid[1], w.shape[1], interpret).astype(_acc(x, w.values))


def block_spmm_t(dy: jax.Array, w: BlockSparseMatrix, *, interpret: bool = False) -> jax.Array:
    """``dy @ Wᵀ``: ``dxᵀ = Σ_k V_k dyᵀ`` over the blocks in row order."""
    perm = block_row_order(w)
    return _block_segment_matmul(dy, w.values[perm], w.block_cols[perm], w.block_rows[perm],
                                 w.grid[0], w.shape[0], interpret).astype(_acc(dy, w.values))


def _block_sddmm_kernel(rows_ref, cols_ref, xt_ref, dyt_ref, out_ref):
    @pl.when(pl.program_id(1) == 0)
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    out_ref[0] += _dot(xt_ref[...], dyt_ref[...], contract=(1, 1))


def block_sddmm(x: jax.Array, dy: jax.Array, w: BlockSparseMatrix, *,
                interpret: bool = False) -> jax.Array:
    """``dV_k = Σ_t xᵀ[row_k-block, t] dyᵀ[col_k-block, t]ᵀ`` → ``[n_blocks, b, b]``."""
    b = w.block_size
    _check_block(b)
    if w.n_blocks == 0:
        return jnp.zeros((0, b, b), _acc(x, dy))
    bt = _token_tile(x.shape[0])
    cdt = jnp.result_type(x, dy)
    xt, dyt = (pad_to(pad_to(a.astype(cdt).T, 0, b), 1, bt) for a in (x, dy))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(w.n_blocks, xt.shape[1] // bt),
        in_specs=[pl.BlockSpec((b, bt), lambda k, j, r, c: (r[k], j)),
                  pl.BlockSpec((b, bt), lambda k, j, r, c: (c[k], j))],
        out_specs=pl.BlockSpec((1, b, b), lambda k, j, r, c: (k, 0, 0)),
    )
    out = pl.pallas_call(
        _block_sddmm_kernel,
        out_shape=jax.ShapeDtypeStruct((w.n_blocks, b, b), jnp.float32),
        grid_spec=grid_spec,
        compiler_params=_ACC_OUT,
        interpret=interpret,
    )(w.block_rows.astype(jnp.int32), w.block_cols.astype(jnp.int32), xt, dyt)
    return out.astype(_acc(x, dy))
