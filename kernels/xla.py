"""XLA formulations of the sparse products for CPU: chunked gather + segment-sum and tiled SDDMM.

The SpMMs work one token tile at a time in the token-transposed layout ``xᵀ [n_in, tt]``, so
that every gather fetches a contiguous row of ``tt`` numbers, and scan over the nonzeros in
chunks of ``CHUNK`` entries so that the gathered intermediate is ``[CHUNK, tt]`` whatever
``nnz`` is:

    y ᵀ[c, tile]  = Σ_{i: cols[i]=c} values[i] · xᵀ[rows[i], tile]    (sorted segment-sum)
    dxᵀ[r, tile]  = Σ_{i: rows[i]=r} values[i] · dyᵀ[cols[i], tile]   (unsorted, dy @ Wᵀ)

The tile ``tt = ⌊budget / (b · (n_src + 2·n_dst + CHUNK))⌋`` (``SPMM_BUDGET`` = 1 MiB) bounds
their temporaries — the transposed input tile, the transposed output tile and its transpose, the
gathered chunk — independently of ``T``; each finished tile is written into the ``[T, n_dst]``
output in place. Transposing whole inputs instead held ``[n_in + 2·n_out, T]`` numbers, which
grows with ``T`` past the dense gradient's ``n_in × n_out`` bytes. Tiled, the layer's forward +
backward holds 0.32× the dense gradient at 512 and 2,048 tokens and 1 %, at most 0.59× up to 10 %
(``memory`` rows of ``results/bench_sparse_formats.json``, ``python -m experiments.bench_sparse
--parts formats,memory``).

The SDDMM (Gale et al. 2020) ``dvalues[i] = Σ_t x[t, rows[i]] · dy[t, cols[i]]`` keeps its
temporaries within a byte ``budget`` (default ``TEMP_BUDGET`` = 256 KiB) independent of ``T``
and ``nnz``: a loop over token tiles of ``tt`` tokens transposes ``x`` and ``dy`` one tile at a
time, and an inner loop over chunks of ``chunk`` entries gathers contiguous rows of ``tt``
numbers from the tile and adds their inner products into the output in place,

    tt    = ⌊budget / (2 · b · (n_in + n_out))⌋     the tiles [n_in + n_out, tt]: half the budget
    chunk = ⌊budget / (4 · b · tt)⌋                  two gathered [chunk, tt] blocks: the other half

(``b`` bytes per accumulated number, both at least 1 and at most ``T`` resp. ``nnz``). The last
tile and chunk are clamped to end at ``T`` / ``nnz`` (no padded copies) and masked where they
overlap their predecessors. Compiled temporaries are then ``≤ budget`` plus the length-``chunk``
index vectors, as long as ``2 · b · (n_in + n_out) ≤ budget`` (layers up to ``n_in + n_out =
32,768`` at the default). A budget that fits whole transposed inputs (``tt = T``, e.g. 9 MiB
at the shape below) is the untiled, faster-at-5 %, memory-hungry formulation; a budget so large
that ``chunk = nnz`` gathers everything at once and spills out of cache (5–10× slower).

Measured on CPU (2 cores, shared; medians of 20 interleaved jitted calls; layer 576 × 1536,
fp32), ms — SpMM rows from an earlier run:

    ===========================  ==========  ==========  ==========  ==========
    op (density, tokens)          1 %, 1      1 %, 512    5 %, 1      5 %, 512
    ===========================  ==========  ==========  ==========  ==========
    dense x @ W (densify W)       0.22        4.8         0.47        5.2
    gather + segment-sum          0.043       5.3         0.145       77.5
    gather + scatter-add          0.041       37.1        0.147       230.0
    BCOO dot_general              0.051       6.6         0.210       69.9
    this module: spmm             0.049       1.6         0.171       5.0
    this module: spmm_t           0.045       2.7         0.093       5.3
    SDDMM dense-then-gather       0.078       5.2–7.5     0.120       5.8–9.0
    SDDMM gather along axis 1     —           17.6        —           —
    SDDMM, budget 9 MiB (tt = T)  0.045       3.4–3.6     0.089       11.3–15.9
    this module: sddmm (256 KiB)  0.065       3.9–4.1     0.078       23.5–37.2
    ===========================  ==========  ==========  ==========  ==========

Compiled temporaries at 512 tokens (``memory_analysis().temp_size_in_bytes``, arguments and
outputs excluded): dense-then-gather 3,538,944 B (the ``xᵀ dy`` gradient) at every density;
``sddmm`` 262,576 B at 0.5–5 % (0.074×), 119,672 B at 0.1 %; the 9 MiB budget 9.05 MB. The
default gives the same values (max difference 4e-5 against ``xᵀ dy``) at a fourteenth of the
dense path's memory, faster than it at 0.1–1 % and 2–4× slower at 5 %, where the many short
``tt``-number gathers (``tt = 15`` here) cost more than the dense matmul saves; gathering
columns of the untransposed ``x`` directly bounds memory too but is 4× slower still. On a loaded
2-core CPU single numbers move by up to 2× between runs (the ranges are two runs). The SpMMs'
chunk sizes 256–4096 were within noise; 1024 is kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from admm_jax._checks import check_int
from kernels.sparse import SparseMatrix, overlap_block
from kernels.sparse import accumulation_dtype as _acc

CHUNK = 1024
TEMP_BUDGET = 256 * 1024  # bytes of SDDMM temporaries (token tiles + gathered blocks)
SPMM_BUDGET = 1024 * 1024  # bytes of SpMM temporaries (transposed token tiles + gathered chunk)


def _chunks(n: int, *arrays: jax.Array, fill: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Each 1-D array padded with its ``fill`` to a multiple of ``CHUNK`` and reshaped to
    ``[n_chunks, CHUNK]``."""
    pad = (-n) % CHUNK
    return tuple(jnp.pad(a, (0, pad), constant_values=f).reshape(-1, CHUNK)
                 for a, f in zip(arrays, fill))


def _segment_matmul_tile(xt: jax.Array, values: jax.Array, src: jax.Array, dst: jax.Array,
                         n_dst: int, dst_sorted: bool) -> jax.Array:
    """``outᵀ[d, :] = Σ_{i: dst[i]=d} values[i] · xt[src[i], :]`` for one transposed token
    tile ``xt [n_src, tt]``: returns ``[n_dst, tt]``. Padding entries point to segment ``n_dst``
    and are dropped."""
    v, s, d = _chunks(values.shape[0], values.astype(xt.dtype), src.astype(jnp.int32),
                      dst.astype(jnp.int32), fill=(0, 0, n_dst))

    def body(acc, chunk):
        vc, sc, dc = chunk
        return acc + jax.ops.segment_sum(xt[sc] * vc[:, None], dc, n_dst,
                                         indices_are_sorted=dst_sorted), None

    out, _ = jax.lax.scan(body, jnp.zeros((n_dst, xt.shape[1]), xt.dtype), (v, s, d))
    return out


def _spmm_token_tile(budget: int, itemsize: int, t: int, n_src: int, n_dst: int) -> int:
    """Tokens per tile of :func:`_segment_matmul`: the transposed input tile ``[n_src, tt]``,
    the transposed output tile and its transpose ``2 × [n_dst, tt]``, and the gathered chunk
    ``[CHUNK, tt]`` together within ``budget`` bytes (at least 1, at most ``t``)."""
    return max(1, min(t, budget // (itemsize * (n_src + 2 * n_dst + CHUNK))))


def _segment_matmul(x: jax.Array, values: jax.Array, src: jax.Array, dst: jax.Array,
                    n_dst: int, dst_sorted: bool, budget: int) -> jax.Array:
    """``out[t, d] = Σ_{i: dst[i]=d} values[i] · x[t, src[i]]`` for ``x [T, n_src]`` → ``[T,
    n_dst]``, one token tile at a time (:func:`_spmm_token_tile`): each tile is transposed, run
    through :func:`_segment_matmul_tile` and written back in place. The last tile is clamped to
    end at ``T``; the tokens it shares with its predecessor are recomputed to the same values."""
    t = x.shape[0]
    tt = _spmm_token_tile(budget, jnp.dtype(x.dtype).itemsize, t, x.shape[1], n_dst)

    def token_tile(j, out):
        start, _ = overlap_block(j, tt, t)
        xt = jax.lax.dynamic_slice_in_dim(x, start, tt).T
        part = _segment_matmul_tile(xt, values, src, dst, n_dst, dst_sorted).T
        return jax.lax.dynamic_update_slice_in_dim(out, part, start, 0)

    return jax.lax.fori_loop(0, -(-t // tt), token_tile, jnp.zeros((t, n_dst), x.dtype))


def spmm(x: jax.Array, w: SparseMatrix, *, budget: int = SPMM_BUDGET) -> jax.Array:
    """``x @ W`` for ``x [T, n_in]`` by chunked gather + sorted segment-sum over token tiles of
    at most ``budget`` bytes of temporaries (see module doc)."""
    check_int("budget", budget, minimum=1)
    if x.shape[0] == 0:
        return jnp.zeros((0, w.shape[1]), _acc(x, w.values))
    return _segment_matmul(x.astype(_acc(x, w.values)), w.values, w.rows, w.cols, w.shape[1],
                           dst_sorted=True, budget=budget)


def spmm_t(dy: jax.Array, w: SparseMatrix, *, budget: int = SPMM_BUDGET) -> jax.Array:
    """``dy @ Wᵀ`` for ``dy [T, n_out]``: the same product with rows and columns swapped (the
    entries are not sorted by row, so the segment-sum is unsorted)."""
    check_int("budget", budget, minimum=1)
    if dy.shape[0] == 0:
        return jnp.zeros((0, w.shape[0]), _acc(dy, w.values))
    return _segment_matmul(dy.astype(_acc(dy, w.values)), w.values, w.cols, w.rows, w.shape[0],
                           dst_sorted=False, budget=budget)


def _budget_tiles(budget: int, itemsize: int, t: int, n_in: int, n_out: int,
                  nnz: int) -> tuple[int, int]:
    """``(tt, chunk)`` for :func:`sddmm`: half of ``budget`` bytes for the transposed token
    tiles ``[n_in + n_out, tt]``, the other half for the two gathered ``[chunk, tt]`` blocks."""
    tt = max(1, min(t, budget // (2 * itemsize * (n_in + n_out))))
    return tt, max(1, min(nnz, budget // (4 * itemsize * tt)))


def _sddmm_tile(xt: jax.Array, dyt: jax.Array, w: SparseMatrix, chunk: int,
                out: jax.Array) -> jax.Array:
    """``out + [⟨xt[rows[i], :], dyt[cols[i], :]⟩]_i`` for one token tile, ``chunk`` entries at
    a time (row gathers of the transposed tile, updated in place in ``out``)."""

    def body(k, out):
        start, fresh = overlap_block(k, chunk, w.nnz)
        r, c = (jax.lax.dynamic_slice_in_dim(a, start, chunk).astype(jnp.int32)
                for a in (w.rows, w.cols))
        part = jnp.sum(xt[r] * dyt[c], axis=1)
        prev = jax.lax.dynamic_slice_in_dim(out, start, chunk)
        return jax.lax.dynamic_update_slice_in_dim(out, prev + jnp.where(fresh, part, 0),
                                                   start, 0)

    return jax.lax.fori_loop(0, -(-w.nnz // chunk), body, out)


def sddmm(x: jax.Array, dy: jax.Array, w: SparseMatrix, *,
          budget: int = TEMP_BUDGET) -> jax.Array:
    """``dvalues[i] = Σ_t x[t, rows[i]] · dy[t, cols[i]]`` in token tiles × entry chunks sized
    by ``budget`` bytes of temporaries (:func:`_budget_tiles`; see the module doc)."""
    check_int("budget", budget, minimum=1)
    dt = _acc(x, dy)
    if w.nnz == 0 or x.shape[0] == 0:
        return jnp.zeros((w.nnz,), dt)
    tt, chunk = _budget_tiles(budget, jnp.dtype(dt).itemsize, x.shape[0], *w.shape, w.nnz)

    def token_tile(j, out):
        start, fresh = overlap_block(j, tt, x.shape[0])
        xs, ds = (jax.lax.dynamic_slice_in_dim(a, start, tt).astype(dt).T for a in (x, dy))
        xt = jnp.where(fresh[None, :], xs, 0)  # tokens an earlier tile covered count 0
        return _sddmm_tile(xt, ds, w, chunk, out)

    return jax.lax.fori_loop(0, -(-x.shape[0] // tt), token_tile, jnp.zeros((w.nnz,), dt))
