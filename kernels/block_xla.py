"""XLA formulations of the block-sparse (BSR) products for CPU: tile gathers, fused tile products,
in-place tile scatters.

For a :class:`~kernels.block.BlockSparseMatrix` with tiles ``V_k`` at block ``(r_k, c_k)`` and
``x [T, n_in]``, ``dy [T, n_out]`` zero-padded to the block grid and viewed as ``[T, G, b]``
(column tile ``g`` of row ``t`` is ``x[t, g·b : (g+1)·b]``; the view is a free reshape):

    y [:, c-tile] = Σ_{k: c_k = c} x [:, r_k-tile] · V_k       (forward, tiles sorted by c_k)
    dx[:, r-tile] = Σ_{k: r_k = r} dy[:, c_k-tile] · V_kᵀ      (dy @ Wᵀ, unsorted in r_k)
    dV_k          = x[:, r_k-tile]ᵀ · dy[:, c_k-tile]           (SDDMM, [n_blocks, b, b])

Each product loops (``lax.fori_loop``) over steps of ``chunk`` stored tiles and ``tt`` tokens.
A SpMM step

1. gathers the chunk's source tiles ``[chunk, tt, b]`` with one XLA gather whose windows are the
   strided ``[tt, 1, b]`` tiles of the ``[T, G, b]`` view (no transposed copy of ``x``);
2. multiplies each by its ``V_k`` (``V_kᵀ``, copied row-major, for ``dy @ Wᵀ``) as ``b``
   broadcast multiply-adds ``Σ_i tile[:, :, i] · V_k[i, :]``, which XLA fuses into one loop,
   vectorised over the tile's columns and split over the cores;
3. adds the products into their output tiles in place with one XLA scatter whose windows are the
   ``[tt, b]`` tiles of the ``[T, G·b]`` output: the segment sum over block columns (forward,
   sorted) or block rows (transpose, unsorted). The last chunk is clamped to end at
   ``n_blocks``; the tiles it shares with its predecessor are sent to an out-of-range tile and
   dropped.

An SDDMM step gathers both tiles of each block, forms fused multiply-adds over groups of
``GRAM_GROUP`` = 16 tokens into partial sums ``[chunk, tt/16, b, b]``, stores them group-major
and reduces over the groups (a vectorised reduction over the leading axis), then adds the
``[chunk, b, b]`` result into the output in place. Tiles larger than ``FUSED_MAX_BLOCK`` = 32
use batched einsums instead (``[tt, b] @ [b, b]``, ``[b, tt] @ [tt, b]`` per tile). Every product
accumulates in :func:`~kernels.sparse.accumulation_dtype` (fp32 for bf16 inputs), einsums at
``Precision.HIGHEST``.

Memory: a step's temporaries stay within a byte ``budget`` (default ``TEMP_BUDGET`` = 2 MiB)
independent of ``T`` and ``n_blocks``. With ``m`` bytes per token and tile (``2·s·b`` for the
SpMMs' gathered tiles and products; ``s·(2b + 2b²/16)`` for the fused SDDMM's two gathered tiles
and two copies of the partial sums; ``s`` bytes per accumulated number)

    tt    = min(T, ⌊budget / m⌋)                  tokens per step (SDDMM: a multiple of 16)
    chunk = min(n_blocks, ⌊budget / (m · tt)⌋)    tiles per step, both at least 1

so a whole 512-token batch is one token tile (``chunk = 32`` at ``b = 16``, fp32) and inputs
longer than ``budget / m`` tokens loop over token tiles, the last clamped to end at ``T`` with
the tokens it shares with its predecessor zeroed. On top of the budget come one chunk of
``V_kᵀ`` and the index vectors. No ``[T, n_blocks·b]`` gather, transposed input or
``n_in × n_out`` array is ever formed.

Measured on CPU (2 cores, shared; medians of 30 interleaved jitted calls; layer 576 × 1536, 512
tokens, fp32, 10 % of the tiles kept: 346 at ``b = 16``, 86 at ``b = 32``), ms, with the ratio to
the dense product of the same shape in the same run (``dense``: ``x @ W`` 5.6, ``dy @ Wᵀ`` 5.1,
``xᵀ dy`` 4.8):

    =====================================  ===========  ===========  ===========
    form                                   spmm         spmm_t       sddmm
    =====================================  ===========  ===========  ===========
    this module, b = 16                    2.62 (0.47)  2.00 (0.39)  2.70 (0.56)
    this module, b = 32                    1.90 (0.34)  1.90 (0.37)  2.08 (0.43)
    batched einsums (b = 16)               4.00 (0.80)  3.78 (0.73)  4.45 (0.89)
    batched einsums (b = 32)               2.70 (0.54)  2.46 (0.48)  2.93 (0.59)
    =====================================  ===========  ===========  ===========

(``python -c "import kernels.block_xla as k; k.benchmark()"``; the einsum rows with
``k.FUSED_MAX_BLOCK = 0`` set first). Six runs gave 2.5–3.1 / 1.9–2.8 / 2.5–3.4 ms at ``b = 16``
and 1.8–2.6 / 1.8–2.6 / 1.9–3.0 ms at ``b = 32``; in the four whose dense matmul ran undisturbed
(4.9–5.9 ms) the forward took 0.47–0.49× its time with 16 × 16 tiles and 0.34–0.46× with 32 × 32 at
90 % sparsity, the SDDMM 0.46–0.59× and 0.35–0.58× the dense gradient's. The batched einsums run
each small matmul on one core at 20–60 GFLOP/s whatever the chunk; the fused loops use both. Two
further forms were slower or larger: one loop step per output block column with its tiles side by
side (``[T, m·b] @ [m·b, b]``, no scatter) spent its time in ~100 short steps (4.7 ms,
16 × 16); transposing whole inputs to ``[G, T, b]`` for contiguous gathers and accumulating a
transposed output ran the forward in 2.7–3.0 ms but held 5.4–6.9 MB of temporaries. Compiled
temporaries of the three products together (``memory_analysis().temp_size_in_bytes``): 2,133,360 B
at ``b = 16`` and 2,163,952 B at ``b = 32``, 0.60–0.61× the dense gradient ``xᵀ dy`` alone
(3,538,944 B); at 1 token 426,320 / 386,672 B, with the forward at 0.05 ms against 0.18 ms dense.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax._checks import check_int
from kernels.block import BlockSparseMatrix, block_from_dense
from kernels.sparse import accumulation_dtype as _acc
from kernels.sparse import overlap_block

TEMP_BUDGET = 2 * 1024 * 1024  # bytes of gathered tiles + products per step
FUSED_MAX_BLOCK = 32  # tile sides up to this use the fused multiply-adds, larger the einsums
GRAM_GROUP = 16  # tokens per group of the fused SDDMM's multiply-adds
HIGHEST = jax.lax.Precision.HIGHEST

_GATHER = jax.lax.GatherDimensionNumbers(offset_dims=(1, 2), collapsed_slice_dims=(1,),
                                         start_index_map=(0, 1))
_SCATTER = jax.lax.ScatterDimensionNumbers(update_window_dims=(1, 2), inserted_window_dims=(),
                                           scatter_dims_to_operand_dims=(0, 1))


def _grid_view(a: jax.Array, n_tiles: int, b: int, dtype: jnp.dtype) -> jax.Array:
    """``a [T, n]`` cast to ``dtype``, zero-padded to ``n_tiles · b`` columns, viewed as
    ``[T, n_tiles, b]``."""
    a = jnp.pad(a.astype(dtype), ((0, 0), (0, n_tiles * b - a.shape[1])))
    return a.reshape(a.shape[0], n_tiles, b)


def _tile_sizes(budget: int, per_token_tile: int, t: int, n: int,
                multiple: int = 1) -> tuple[int, int]:
    """``(tt, chunk)``: tokens per token tile (rounded down to a multiple of ``multiple`` when
    at least that) and tiles per step, so that a step's temporaries, ``per_token_tile`` bytes
    per token and tile, fit ``budget`` bytes (see the module doc); both at least 1."""
    tt = max(1, min(t, budget // per_token_tile))
    if tt >= multiple:
        tt -= tt % multiple
    return tt, max(1, min(n, budget // (per_token_tile * tt)))


def _spmm_sizes(budget: int, itemsize: int, t: int, b: int, n: int) -> tuple[int, int]:
    """SpMM steps: the gathered tiles and their products, ``2 × [chunk, tt, b]``."""
    return _tile_sizes(budget, 2 * itemsize * b, t, n)


def _sddmm_sizes(budget: int, itemsize: int, t: int, b: int, n: int) -> tuple[int, int, int]:
    """``(tt, chunk, group)`` of SDDMM steps: the gathered ``2 × [chunk, tt, b]`` tiles, and for
    the fused form the ``2 × [chunk, tt / group, b, b]`` partial sums, with ``group`` tokens per
    group (:data:`GRAM_GROUP`, or ``tt`` if fewer) and ``tt`` a multiple of it."""
    if b > FUSED_MAX_BLOCK:
        return (*_tile_sizes(budget, 2 * itemsize * b, t, n), 1)
    group = min(GRAM_GROUP, t)
    tt, chunk = _tile_sizes(budget, itemsize * (2 * b + -(-2 * b * b // group)), t, n,
                            multiple=group)
    return tt, chunk, min(group, tt)


def _gather_tiles(a3: jax.Array, t0: jax.Array, tiles: jax.Array, tt: int) -> jax.Array:
    """``[a3[t0 : t0+tt, g, :] for g in tiles]`` → ``[len(tiles), tt, b]`` from ``a3 [T, G, b]``
    (one gather of strided windows)."""
    starts = jnp.stack([jnp.broadcast_to(t0, tiles.shape), tiles], axis=1)
    return jax.lax.gather(a3, starts, _GATHER, (tt, 1, a3.shape[2]), mode="clip")


def _scatter_tiles(out: jax.Array, t0: jax.Array, tiles: jax.Array, parts: jax.Array,
                   tiles_sorted: bool) -> jax.Array:
    """``out [T, G·b]`` with ``parts[k] [tt, b]`` added to rows ``t0 …`` of column tile
    ``tiles[k]``; tiles ``≥ G`` are dropped."""
    starts = jnp.stack([jnp.broadcast_to(t0, tiles.shape), tiles * parts.shape[2]], axis=1)
    return jax.lax.scatter_add(out, starts, parts, _SCATTER, indices_are_sorted=tiles_sorted,
                               mode="drop")


def _transposed_tiles(v: jax.Array) -> jax.Array:
    """``v[k]ᵀ`` for ``v [C, b, b]``, as a permuting gather: XLA then stores the result row-major
    (a transpose it would only relabel, and the fused products would read it strided)."""
    c, b, _ = v.shape
    perm = np.arange(b * b).reshape(b, b).T.reshape(-1)
    return v.reshape(c, b * b)[:, perm].reshape(c, b, b)


def _tile_products(tiles: jax.Array, v: jax.Array) -> jax.Array:
    """``tiles[k] @ v[k]`` for ``tiles [C, tt, b]``, ``v [C, b, b]`` → ``[C, tt, b]``: the ``b``
    broadcast multiply-adds ``Σ_i tiles[:, :, i] · v[:, i, :]`` (one fused loop) up to
    ``b = FUSED_MAX_BLOCK``, a batched einsum above."""
    b = v.shape[1]
    if b > FUSED_MAX_BLOCK:
        return jnp.einsum("cti,cij->ctj", tiles, v, precision=HIGHEST)
    out = tiles[:, :, :1] * v[:, None, 0, :]
    for i in range(1, b):
        out = out + tiles[:, :, i:i + 1] * v[:, None, i, :]
    return out


def _tile_grams(xs: jax.Array, ds: jax.Array, group: int) -> jax.Array:
    """``xs[k]ᵀ ds[k]`` for ``xs, ds [C, tt, b]`` → ``[C, b, b]``. Up to ``b =
    FUSED_MAX_BLOCK``: fused multiply-adds over each group of ``group`` tokens into partial sums
    ``[C, tt / group, b, b]``, stored group-major and summed over the groups (a reduction over
    the leading axis, vectorised over the tile); above, a batched einsum."""
    c, tt, b = xs.shape
    if b > FUSED_MAX_BLOCK:
        return jnp.einsum("cti,ctj->cij", xs, ds, precision=HIGHEST)
    x4, d4 = (a.reshape(c, tt // group, group, b) for a in (xs, ds))
    parts = x4[:, :, 0, :, None] * d4[:, :, 0, None, :]
    for s in range(1, group):
        parts = parts + x4[:, :, s, :, None] * d4[:, :, s, None, :]
    # the barrier keeps the products out of the reduction, which XLA would emit as scalar loops
    return jax.lax.optimization_barrier(parts.transpose(1, 0, 2, 3)).sum(axis=0)


def _segment_matmul(x: jax.Array, values: jax.Array, src: jax.Array, dst: jax.Array,
                    n_src: int, n_dst: int, *, transpose: bool, dst_sorted: bool,
                    budget: int) -> jax.Array:
    """``out[:, d-tile] = Σ_{k: dst[k]=d} x[:, src[k]-tile] · V_k`` (``V_kᵀ`` if ``transpose``)
    for ``x [T, ≤ n_src·b]`` (zero-padded here) → ``[T, n_dst·b]``, in token tiles × tile
    chunks."""
    dt = _acc(x, values)
    n, b, _ = values.shape
    t = x.shape[0]
    out = jnp.zeros((t, n_dst * b), dt)
    if n == 0 or t == 0:
        return out
    x3 = _grid_view(x, n_src, b, dt)
    tt, chunk = _spmm_sizes(budget, jnp.dtype(dt).itemsize, t, b, n)
    src, dst = src.astype(jnp.int32), dst.astype(jnp.int32)

    def token_tile(j, out):
        t0, t_fresh = overlap_block(j, tt, t)

        def step(k, out):
            start, fresh = overlap_block(k, chunk, n)
            s = jax.lax.dynamic_slice_in_dim(src, start, chunk)
            d = jnp.where(fresh, jax.lax.dynamic_slice_in_dim(dst, start, chunk), n_dst)
            v = jax.lax.dynamic_slice_in_dim(values, start, chunk).astype(dt)
            tiles = _gather_tiles(x3, t0, s, tt)
            if tt < t:  # tokens an earlier token tile covered count 0
                tiles = jnp.where(t_fresh[None, :, None], tiles, 0)
            parts = _tile_products(tiles, _transposed_tiles(v) if transpose else v)
            return _scatter_tiles(out, t0, d, parts, dst_sorted)

        return jax.lax.fori_loop(0, -(-n // chunk), step, out)

    return jax.lax.fori_loop(0, -(-t // tt), token_tile, out)


def spmm(x: jax.Array, w: BlockSparseMatrix, *, budget: int = TEMP_BUDGET) -> jax.Array:
    """``x @ W`` for ``x [T, n_in]`` → ``[T, n_out]`` (the accumulation dtype): tile gathers,
    tile products and a sorted tile scatter over block columns (see the module doc)."""
    check_int("budget", budget, minimum=1)
    g0, g1 = w.grid
    y = _segment_matmul(x, w.values, w.block_rows, w.block_cols, g0, g1, transpose=False,
                        dst_sorted=True, budget=budget)
    return y[:, :w.shape[1]]


def spmm_t(dy: jax.Array, w: BlockSparseMatrix, *, budget: int = TEMP_BUDGET) -> jax.Array:
    """``dy @ Wᵀ`` for ``dy [T, n_out]`` → ``[T, n_in]``: the same steps with the tiles
    transposed and the roles of block rows and columns swapped (the tiles are not sorted by
    block row, so the scatter is unsorted)."""
    check_int("budget", budget, minimum=1)
    g0, g1 = w.grid
    dx = _segment_matmul(dy, w.values, w.block_cols, w.block_rows, g1, g0, transpose=True,
                         dst_sorted=False, budget=budget)
    return dx[:, :w.shape[0]]


def sddmm(x: jax.Array, dy: jax.Array, w: BlockSparseMatrix, *,
          budget: int = TEMP_BUDGET) -> jax.Array:
    """``dV[k] = x[:, r_k-tile]ᵀ dy[:, c_k-tile]`` for ``x [T, n_in]``, ``dy [T, n_out]`` →
    ``[n_blocks, b, b]`` (the accumulation dtype), in token tiles × tile chunks sized by
    ``budget`` bytes (see the module doc)."""
    check_int("budget", budget, minimum=1)
    dt = _acc(x, dy)
    b, (g0, g1), n, t = w.block_size, w.grid, w.n_blocks, x.shape[0]
    out = jnp.zeros((n, b, b), dt)
    if n == 0 or t == 0:
        return out
    x3, dy3 = _grid_view(x, g0, b, dt), _grid_view(dy, g1, b, dt)
    tt, chunk, group = _sddmm_sizes(budget, jnp.dtype(dt).itemsize, t, b, n)
    rows, cols = w.block_rows.astype(jnp.int32), w.block_cols.astype(jnp.int32)

    def token_tile(j, out):
        t0, t_fresh = overlap_block(j, tt, t)

        def step(k, out):
            start, fresh = overlap_block(k, chunk, n)
            xs = _gather_tiles(x3, t0, jax.lax.dynamic_slice_in_dim(rows, start, chunk), tt)
            ds = _gather_tiles(dy3, t0, jax.lax.dynamic_slice_in_dim(cols, start, chunk), tt)
            if tt < t:
                xs = jnp.where(t_fresh[None, :, None], xs, 0)
            part = _tile_grams(xs, ds, group)
            prev = jax.lax.dynamic_slice_in_dim(out, start, chunk)
            return jax.lax.dynamic_update_slice_in_dim(
                out, prev + jnp.where(fresh[:, None, None], part, 0), start, 0)

        return jax.lax.fori_loop(0, -(-n // chunk), step, out)

    return jax.lax.fori_loop(0, -(-t // tt), token_tile, out)


def benchmark(block_sizes: tuple[int, ...] = (16, 32), density: float = 0.1, tokens: int = 512,
              shape: tuple[int, int] = (576, 1536), rounds: int = 30, seed: int = 0) -> None:
    """Print the medians of ``rounds`` interleaved jitted calls of the three dense products and
    of :func:`spmm` / :func:`spmm_t` / :func:`sddmm` with ``round(density · G₀ · G₁)`` random
    tiles kept, and the compiled temporaries of the three sparse products together (the module
    doc's table)."""

    def temp_bytes(fn, *args):
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((tokens, shape[0])), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((tokens, shape[1])), jnp.float32)
    dense = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    fns = {"dense x @ W": (jax.jit(lambda x, w: jnp.dot(x, w, precision=HIGHEST)), (x, dense)),
           "dense dy @ Wᵀ": (jax.jit(lambda d, w: jnp.dot(d, w.T, precision=HIGHEST)),
                             (dy, dense)),
           "dense xᵀ dy": (jax.jit(lambda x, d: jnp.dot(x.T, d, precision=HIGHEST)), (x, dy))}
    for b in block_sizes:
        grid = (-(-shape[0] // b), -(-shape[1] // b))
        kept = np.zeros(grid[0] * grid[1], bool)
        kept[rng.permutation(kept.size)[:round(density * kept.size)]] = True
        tiles = np.kron(kept.reshape(grid), np.ones((b, b), bool))
        m = block_from_dense(np.asarray(dense), tiles[:shape[0], :shape[1]], block_size=b)
        both = temp_bytes(lambda x, dy, m: (spmm(x, m), spmm_t(dy, m), sddmm(x, dy, m)),
                          x, dy, m)
        print(f"b = {b}: {m.n_blocks} tiles ({m.density:.1%}); forward + backward temporaries "
              f"{both:,} B (dense gradient {4 * shape[0] * shape[1]:,} B)")
        fns |= {f"b{b} spmm": (jax.jit(spmm), (x, m)), f"b{b} spmm_t": (jax.jit(spmm_t), (dy, m)),
                f"b{b} sddmm": (jax.jit(sddmm), (x, dy, m))}
    times = {k: [] for k in fns}
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    base = {"spmm": "dense x @ W", "spmm_t": "dense dy @ Wᵀ", "sddmm": "dense xᵀ dy"}
    for name, ts in times.items():
        ms = 1e3 * float(np.median(ts))
        ref = 1e3 * float(np.median(times[base.get(name.split()[-1], name)]))
        print(f"{name:16s} {ms:7.2f} ms  {ms / ref:5.2f}× dense")
