"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with optimal-brain-surgeon weight
reconstruction from the Gram matrix ``H = XᵀX`` of a layer's inputs.

References:
    Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
    ICML 2023.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from admm_jax._checks import check_int, check_real
from admm_jax.models.llama import LlamaConfig
from admm_jax.ops.projection import prune_count
from admm_jax.ops.structures import (
    NM,
    Block,
    Structure,
    StructureSpec,
    Unstructured,
    effective_sparsity,
    expand_tiles,
    structure_mask,
    tile_grid,
    tile_scores,
)
from admm_jax.pruning.capture import gram_stats
from admm_jax.pruning.registry import check_kernel_args, per_kernel, register_pruner

Array = jax.Array

BLOCKSIZE = 128  # inputs per lazy-update block (the paper's value)
PERCDAMP = 0.01  # dampening relative to mean(diag H) (the paper's value)


def _check_options(blocksize: Any, percdamp: Any, structure: Structure) -> None:
    check_int("blocksize", blocksize, 1)
    if isinstance(structure, NM) and blocksize % structure.m:
        raise ValueError(f"blocksize ({blocksize}) must be a multiple of M = {structure.m} for "
                         f"{structure} sparsity")
    if isinstance(structure, Block) and blocksize % structure.size:
        raise ValueError(f"blocksize ({blocksize}) must be a multiple of the block size "
                         f"{structure.size} for {structure} sparsity")
    check_real("percdamp", percdamp, low=0.0)


def _check_model_options(config: LlamaConfig, structure: Structure, *, blocksize: Any,
                         percdamp: Any) -> None:
    del config  # the options do not depend on the model
    _check_options(blocksize, percdamp, structure)


def _lowest_mask(score: Array, count: Array) -> Array:
    """Bool mask of the ``count`` (traced) smallest entries of ``score`` (ties: lowest flat index
    first)."""
    flat = score.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (rank < count).reshape(score.shape)


def _block_counts(d_in: int, d_out: int, sparsity: float, blocksize: int,
                  n_blocks: int) -> np.ndarray:
    """Entries to prune in each block of ``blocksize`` inputs: ``P(out·r_b) − P(out·r_{b−1})``
    with ``r_b = min((b + 1)·blocksize, in)`` and ``P`` the library's one count
    (:func:`~admm_jax.ops.projection.prune_count`), so the blocks together prune exactly the
    per-tensor count ``P(in·out)``. Called on the ``R × C`` tile grid with ``blocksize / b``
    rows of tiles per block, the same rule counts the tiles to prune in each block."""
    ends = np.minimum(np.arange(n_blocks + 1) * blocksize, d_in)
    pruned = np.array([prune_count(d_out * int(r), sparsity) for r in ends])
    return np.diff(pruned).astype(np.int32)


def _prepare(w: Array, h: Array, percdamp: Array, blocksize: int) -> tuple[Array, Array, Array]:
    """The padded fp32 kernel ``[d, out]``, the upper Cholesky factor ``U`` of ``H⁻¹ = UᵀU``
    ``[d, d]`` and the mask of real (unpadded) inputs ``[d]``, ``d`` a multiple of ``blocksize``.
    """
    d_in = w.shape[0]
    pad = (-d_in) % blocksize
    d = d_in + pad
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)

    # Dead inputs (diag H = 0) never fire: set H_ii = 1 and zero their weights; then dampen.
    dead = jnp.diagonal(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[:, None], 0.0, w)
    h = h + percdamp * jnp.mean(jnp.diagonal(h)) * jnp.eye(d_in, dtype=jnp.float32)

    # Pad to whole blocks with decoupled unit-curvature inputs (zero weight, never selected).
    h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag((jnp.arange(d) >= d_in).astype(jnp.float32))
    w = jnp.pad(w, ((0, pad), (0, 0)))

    # H⁻¹ = UᵀU with U upper triangular: the rows of U are the OBS update directions.
    lower = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(d, dtype=jnp.float32))
    u = jnp.triu(jnp.linalg.cholesky(hinv).T)
    return w, u, jnp.arange(d) < d_in


def _select_nm(nm: NM, i: Array, prune1: Array, w1: Array, d1: Array) -> Array:
    """At the first input ``i`` of every group of ``M``, prune the ``M − N`` inputs of lowest OBS
    saliency ``w²/[U]_ii²`` among the next ``M`` of each output."""
    wg = lax.dynamic_slice_in_dim(w1, i, nm.m, 0)
    dg = lax.dynamic_slice_in_dim(d1, i, nm.m, 0)
    keep = structure_mask(jnp.square(wg / dg[:, None]), nm, 0.0)
    return lax.dynamic_update_slice_in_dim(prune1, ~keep, i, 0)


def _select_tiles(size: int, w1: Array, d1: Array, valid1: Array, count: Array) -> Array:
    """The prune mask of a whole block ``[B, out]`` of ``b × b`` tiles (``b = size`` divides
    ``B``): the ``count`` (traced) tiles of lowest summed OBS saliency ``w²/[U]_ii²`` (ties:
    earliest tile, row-major), rows of tiles made only of padding never pruned."""
    tiles = tile_scores(jnp.square(w1 / d1[:, None]), size)                   # [B/b, C]
    tiles = jnp.where(valid1[::size, None], tiles, jnp.inf)
    return expand_tiles(_lowest_mask(tiles, count), size, w1.shape)


@functools.partial(jax.jit, static_argnames=("structure", "blocksize"))
def _sparsegpt(w: Array, h: Array, counts: Array, percdamp: Array, *, structure: Structure,
               blocksize: int) -> tuple[Array, Array]:
    d_in = w.shape[0]
    w, u, valid = _prepare(w, h, percdamp, blocksize)
    nm = structure if isinstance(structure, NM) else None

    def block(b, carry):
        w, keep = carry
        i1 = b * blocksize
        w1 = lax.dynamic_slice_in_dim(w, i1, blocksize, 0)                    # [B, out]
        u_rows = lax.dynamic_slice_in_dim(u, i1, blocksize, 0)                # [B, d]
        u1 = lax.dynamic_slice_in_dim(u_rows, i1, blocksize, 1)               # [B, B]
        d1 = jnp.diagonal(u1)
        valid1 = lax.dynamic_slice_in_dim(valid, i1, blocksize)
        # Adaptive mask selection over the whole block (Alg. 1, line 6), of entries or tiles.
        if isinstance(structure, Block):
            prune1 = _select_tiles(structure.size, w1, d1, valid1, counts[b])
        elif nm is None:
            score = jnp.where(valid1[:, None], jnp.square(w1 / d1[:, None]), jnp.inf)
            prune1 = _lowest_mask(score, counts[b])
        else:
            prune1 = jnp.zeros(w1.shape, bool)

        def column(i, carry):  # Alg. 1, lines 7-11, one input (a row here) at a time
            w1, prune1, err1 = carry
            if nm is not None:
                prune1 = lax.cond(i % nm.m == 0, functools.partial(_select_nm, nm),
                                  lambda i, p, *_: p, i, prune1, w1, d1)
            err = jnp.where(prune1[i], w1[i], 0.0) / u1[i, i]                 # (w − q) / [U]_ii
            w1 = w1 - u1[i][:, None] * err[None, :]                           # U_i,i: = 0 left of i
            return w1, prune1, err1.at[i].set(err)

        err1 = jnp.zeros(w1.shape, jnp.float32)
        w1, prune1, err1 = lax.fori_loop(0, blocksize, column, (w1, prune1, err1))
        # Lazy batch update of all later inputs (Alg. 1, line 12); earlier rows of U vanish
        # left of i1, and the block itself is overwritten with its pruned weights.
        w = w - jnp.matmul(u_rows.T, err1, precision=lax.Precision.HIGHEST)
        w = lax.dynamic_update_slice_in_dim(w, jnp.where(prune1, 0.0, w1), i1, 0)
        keep = lax.dynamic_update_slice_in_dim(keep, ~prune1, i1, 0)
        return w, keep

    keep = jnp.ones(w.shape, bool)
    w, keep = lax.fori_loop(0, w.shape[0] // blocksize, block, (w, keep))
    return w[:d_in], keep[:d_in]


def sparsegpt_prune(w: Array, gram: Array, *, sparsity: float = 0.5,
                    structure: StructureSpec = "unstructured", blocksize: int = BLOCKSIZE,
                    percdamp: float = PERCDAMP) -> tuple[Array, Array]:
    """SparseGPT (Frantar & Alistarh, 2023, Alg. 1): prune and reconstruct a kernel by optimal
    brain surgeon updates that minimise ``‖XW − XŴ‖²_F`` with ``H = XᵀX``.

    With ``H ← H + λI``, ``λ = percdamp · mean(diag H)`` (dead inputs with ``H_ii = 0`` get
    ``H_ii = 1`` and zero weight first) and ``H⁻¹ = UᵀU`` (``U`` upper Cholesky), the inputs are
    swept in blocks of ``blocksize``:

    * line 6: unstructured — in each block, prune the entries with the smallest
      ``W_ij² / U_ii²``; the per-block counts add up to exactly ``⌊sparsity·in·out⌋``;
      N:M — at every ``M``-th input, prune the ``M − N`` smallest of the next ``M`` per output;
      block ``b`` (``b`` divides ``blocksize``) — in each block, the ``blocksize/b`` rows of
      ``b × b`` tiles of the ``[in, out]`` kernel (partial tiles at the edges, as in
      :mod:`~admm_jax.ops.structures`) are chosen at once: sum ``W_ij² / U_ii²`` over each tile
      and prune the tiles with the smallest sums (ties: earliest tile, row-major), whole; the
      per-block tile counts follow the unstructured rule on the ``⌈in/b⌉ × ⌈out/b⌉`` tile grid,
      so the tensor keeps exactly the ``keep_count(⌈in/b⌉·⌈out/b⌉, sparsity)`` tiles of
      magnitude and Wanda;
    * lines 7–11: for input ``i`` of the block, ``E_i = (W_i − Q_i) / U_ii`` with ``Q_i`` its pruned
      row, and ``W_{i:} ← W_{i:} − U_{i,i:}ᵀ E_i`` inside the block;
    * line 12: lazy batch update of the later inputs ``W_{i₂:} ← W_{i₂:} − U_{i₁:i₂, i₂:}ᵀ E``.

    Block structures are our extension; the paper's algorithm prunes entries. Their tiles are
    chosen like its unstructured mask, per block of ``blocksize`` inputs from the weights the
    OBS updates of the earlier blocks have already changed: the rows of tiles of one block may
    keep different numbers of tiles, down to none, and only each block keeps the fraction
    ``1 − sparsity`` of its tiles (up to rounding); the pruned entries are then compensated by
    the same per-input updates (lines 7–12) as for the other structures. Choosing per row of
    tiles instead, when the sweep reaches it (as for an N:M group; what ``blocksize = b`` still
    does), keeps the same count in every row up to rounding, so no group of ``b`` inputs can be
    dropped whole, and where the inputs differ widely in scale that loses to Wanda's per-tensor
    choice and even to magnitude's. On the tests' correlated inputs with scales spread over two
    orders of magnitude (96 × 64, block16, 50 %, ``blocksize`` 128 so one block, seeds 0–4) the
    relative reconstruction error ``‖X(W − Ŵ)‖_F / ‖XW‖_F`` is 0.30–0.48 per block against
    0.60–0.63 per row of tiles, 0.38–0.69 for Wanda and 0.61–0.73 for magnitude (seed 0: 0.30,
    0.62, 0.38, 0.61); on inputs at one scale driven by a few shared factors it is 0.08 against
    0.33–0.41 per row and 0.64–0.71 for the other two. The equal fraction per block costs less
    the larger ``blocksize``: at 32 (two rows of tiles per block) the scale-spread error is
    0.48–0.60; at 128 on 384 inputs (three blocks; seeds 0–2) 0.37–0.42, against Wanda's
    0.42–0.45. Nor is it always below Wanda: at 75 % on the 96 × 64 problems it is below on four
    seeds of five and level on one (0.736 against 0.735). On SmolLM2-135M's block 3 (50 %) it is
    0.216 for ``q_proj`` (per row 0.270, Wanda 0.264) and 0.502 for ``down_proj`` (0.522,
    0.629).

    Args:
        w: kernel ``[in, out]``.
        gram: ``H = Σ_t x_t x_tᵀ`` ``[in, in]`` (any positive scale; see
            :func:`~admm_jax.pruning.capture.gram_stats`).
        sparsity: fraction of zeros of the tensor, in ``[0, 1)`` (ignored for ``N:M``; for
            block, the fraction of its tiles pruned, in each block of ``blocksize`` inputs as in
            the tensor).
        structure: ``"unstructured"``, ``"N:M"``, ``"blockB"`` (e.g. ``"block16"``) or a
            structure value (no channel pruning; ``blocksize`` must be a multiple of ``M`` for
            ``N:M`` and of ``B`` for block).
        blocksize: inputs per lazy-update block (128 in the paper).
        percdamp: dampening relative to the mean diagonal of ``H`` (0.01 in the paper).

    Returns:
        ``(pruned kernel, keep mask)``; the pruned kernel is zero wherever the mask is False.

    Raises:
        ValueError: bad arguments, or a dampened ``H`` that is not numerically positive definite
            (increase ``percdamp``).
    """
    w, sparsity, structure = check_kernel_args(SPARSEGPT, w, sparsity, structure)
    _check_options(blocksize, percdamp, structure)
    sparsity = effective_sparsity(structure, sparsity)
    gram = jnp.asarray(gram)
    d_in, d_out = w.shape
    if gram.shape != (d_in, d_in):
        raise ValueError(f"gram must have shape ({d_in}, {d_in}) = [in, in], got {gram.shape}")
    n_blocks = -(-d_in // blocksize)
    if isinstance(structure, Block):  # tiles per block; rows of tiles nest in the blocks
        counts = _block_counts(*tile_grid(w.shape, structure.size), sparsity,
                               blocksize // structure.size, n_blocks)
    else:
        counts = _block_counts(d_in, d_out, sparsity, blocksize, n_blocks)
    pruned, keep = _sparsegpt(w, gram, jnp.asarray(counts), jnp.float32(percdamp),
                              structure=structure, blocksize=blocksize)
    if not bool(jnp.all(jnp.isfinite(pruned))):
        raise ValueError("SparseGPT produced non-finite weights: the dampened Hessian is not "
                         f"positive definite; increase percdamp (got {percdamp})")
    return pruned.astype(w.dtype), keep


#: The registration of SparseGPT (Gram matrices, unstructured, N:M and block).
SPARSEGPT = register_pruner("sparsegpt", per_kernel(sparsegpt_prune), stats=gram_stats,
                            structures=(Unstructured, NM, Block),
                            defaults={"blocksize": BLOCKSIZE, "percdamp": PERCDAMP},
                            check=_check_model_options)
