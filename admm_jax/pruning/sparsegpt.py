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
    structure_mask,
)
from admm_jax.pruning.capture import gram_stats
from admm_jax.pruning.registry import check_kernel_args, per_kernel, register_pruner

Array = jax.Array

BLOCKSIZE = 128  # inputs per lazy-update block (the paper's value)
PERCDAMP = 0.01  # dampening relative to mean(diag H) (the paper's value)


def _group_size(structure: Structure) -> int | None:
    """Inputs whose mask is chosen together in the sweep: ``M`` for N:M, ``b`` (one row of
    tiles) for block, ``None`` for unstructured (chosen per lazy-update block)."""
    if isinstance(structure, NM):
        return structure.m
    if isinstance(structure, Block):
        return structure.size
    return None


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
    per-tensor count ``P(in·out)``."""
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


def _select_group(group: tuple[Structure, float], i: Array, prune1: Array, w1: Array,
                  d1: Array) -> Array:
    """At the first input ``i`` of every group, the mask of the group's inputs from their OBS
    saliency ``w²/[U]_ii²`` (:func:`~admm_jax.ops.structures.structure_mask`): N:M prunes the
    ``M − N`` lowest of the next ``M`` inputs of each output; block keeps the
    ``keep_count(⌈out/b⌉, sparsity)`` tiles of the row of ``b × b`` tiles starting at ``i``
    with the largest summed saliency."""
    structure, sparsity = group
    size = _group_size(structure)
    wg = lax.dynamic_slice_in_dim(w1, i, size, 0)
    dg = lax.dynamic_slice_in_dim(d1, i, size, 0)
    keep = structure_mask(jnp.square(wg / dg[:, None]), structure, sparsity)
    return lax.dynamic_update_slice_in_dim(prune1, ~keep, i, 0)


@functools.partial(jax.jit, static_argnames=("group", "blocksize"))
def _sparsegpt(w: Array, h: Array, counts: Array, percdamp: Array, *,
               group: tuple[Structure, float] | None, blocksize: int) -> tuple[Array, Array]:
    d_in = w.shape[0]
    w, u, valid = _prepare(w, h, percdamp, blocksize)
    select_group = functools.partial(_select_group, group)
    size = None if group is None else _group_size(group[0])

    def block(b, carry):
        w, keep = carry
        i1 = b * blocksize
        w1 = lax.dynamic_slice_in_dim(w, i1, blocksize, 0)                    # [B, out]
        u_rows = lax.dynamic_slice_in_dim(u, i1, blocksize, 0)                # [B, d]
        u1 = lax.dynamic_slice_in_dim(u_rows, i1, blocksize, 1)               # [B, B]
        d1 = jnp.diagonal(u1)
        if group is None:  # adaptive mask selection over the whole block (Alg. 1, line 6)
            score = jnp.square(w1 / d1[:, None])
            score = jnp.where(lax.dynamic_slice_in_dim(valid, i1, blocksize)[:, None], score,
                              jnp.inf)
            prune1 = _lowest_mask(score, counts[b])
        else:
            prune1 = jnp.zeros(w1.shape, bool)

        def column(i, carry):  # Alg. 1, lines 7-11, one input (a row here) at a time
            w1, prune1, err1 = carry
            if group is not None:
                prune1 = lax.cond(i % size == 0, select_group, lambda i, p, *_: p,
                                  i, prune1, w1, d1)
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
      block ``b`` — at every ``b``-th input, choose the mask of the next ``b`` inputs (one row of
      ``b × b`` tiles of the ``[in, out]`` kernel, the last tile of the row ``out mod b`` wide
      when ``b ∤ out``): sum the saliency ``W_ij² / U_ii²`` over each tile and keep the
      ``keep_count(⌈out/b⌉, sparsity)`` tiles with the largest sums, pruning the rest whole;
    * lines 7–11: for input ``i`` of the block, ``E_i = (W_i − Q_i) / U_ii`` with ``Q_i`` its pruned
      row, and ``W_{i:} ← W_{i:} − U_{i,i:}ᵀ E_i`` inside the block;
    * line 12: lazy batch update of the later inputs ``W_{i₂:} ← W_{i₂:} − U_{i₁:i₂, i₂:}ᵀ E``.

    Block structures are our extension; the paper's algorithm prunes entries. Like N:M there, a
    row of tiles is chosen when the sweep reaches it, from weights the OBS updates of the
    earlier inputs have already changed, and every row of tiles keeps the same fraction
    ``1 − sparsity`` of its tiles (so the tiles of a row are compared only with each other, as
    the ``M`` inputs of an N:M group are): a tensor keeps ``⌈in/b⌉ · keep_count(⌈out/b⌉,
    sparsity)`` tiles, which can differ from the per-tensor ``keep_count(⌈in/b⌉·⌈out/b⌉,
    sparsity)`` of magnitude and Wanda by the rounding of each row. The pruned entries are
    then compensated by the same per-input updates (lines 7–12) as for the other structures.
    The equal count per row of tiles also means no row of tiles (group of ``b`` inputs) is
    ever pruned whole: where the inputs differ widely in importance, a per-tensor choice of
    tiles (Wanda's) can reconstruct better than these updates do under that constraint.

    Args:
        w: kernel ``[in, out]``.
        gram: ``H = Σ_t x_t x_tᵀ`` ``[in, in]`` (any positive scale; see
            :func:`~admm_jax.pruning.capture.gram_stats`).
        sparsity: fraction of zeros of the tensor, in ``[0, 1)`` (ignored for ``N:M``; for
            block, the fraction of tiles pruned in every row of tiles).
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
    group = None if _group_size(structure) is None else \
        (structure, effective_sparsity(structure, sparsity))
    gram = jnp.asarray(gram)
    d_in, d_out = w.shape
    if gram.shape != (d_in, d_in):
        raise ValueError(f"gram must have shape ({d_in}, {d_in}) = [in, in], got {gram.shape}")
    n_blocks = -(-d_in // blocksize)
    counts = _block_counts(d_in, d_out, sparsity, blocksize, n_blocks)
    pruned, keep = _sparsegpt(w, gram, jnp.asarray(counts), jnp.float32(percdamp),
                              group=group, blocksize=blocksize)
    if not bool(jnp.all(jnp.isfinite(pruned))):
        raise ValueError("SparseGPT produced non-finite weights: the dampened Hessian is not "
                         f"positive definite; increase percdamp (got {percdamp})")
    return pruned.astype(w.dtype), keep


#: The registration of SparseGPT (Gram matrices, unstructured, N:M and block).
SPARSEGPT = register_pruner("sparsegpt", per_kernel(sparsegpt_prune), stats=gram_stats,
                            structures=(Unstructured, NM, Block),
                            defaults={"blocksize": BLOCKSIZE, "percdamp": PERCDAMP},
                            check=_check_model_options)
