"""Wanda (Sun et al., 2023): prune by ``|W_ij| · ‖X_i‖₂`` per output, without weight updates.

References:
    Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
    ICLR 2024.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from admm_jax.ops.projection import keep_count, topk_mask
from admm_jax.ops.structures import (
    NM,
    Block,
    Structure,
    StructureSpec,
    Unstructured,
    structure_mask,
)
from admm_jax.pruning.capture import sqnorm_stats
from admm_jax.pruning.registry import check_kernel_args, per_kernel, register_pruner

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("sparsity", "structure"))
def _wanda(w: Array, sqnorm: Array, *, sparsity: float,
           structure: Structure) -> tuple[Array, Array]:
    score = jnp.abs(w).astype(jnp.float32) * jnp.sqrt(sqnorm.astype(jnp.float32))[:, None]
    if isinstance(structure, (NM, Block)):
        keep = structure_mask(score, structure, sparsity)
    else:  # top-k within every output column (ties: lowest row first)
        k = keep_count(w.shape[0], sparsity)
        keep = jax.vmap(topk_mask, in_axes=(1, None), out_axes=1)(score, k)
    return jnp.where(keep, w, 0), keep


def wanda_prune(w: Array, sqnorm: Array, *, sparsity: float = 0.5,
                structure: StructureSpec = "unstructured") -> tuple[Array, Array]:
    """Wanda (Sun et al., 2023, Eq. 1 and Alg. 1): score ``S_ij = |W_ij| · ‖X_i‖₂`` and keep, for
    every output ``j`` (a column of the ``[in, out]`` kernel), its ``keep_count(in, sparsity)``
    highest-scoring inputs — or the ``N`` highest of every ``M`` consecutive inputs. Weights are
    not updated.

    Block ``b`` (our extension): a ``b × b`` tile spans ``b`` outputs, so the per-output
    comparison group has no tile form; the tiles are ranked over the whole tensor instead, by
    ``Σ S_ij`` over the tile, and the ``keep_count(⌈in/b⌉·⌈out/b⌉, sparsity)`` largest are kept
    (as for magnitude pruning, with Wanda's score).

    Args:
        w: kernel ``[in, out]``.
        sqnorm: ``‖X_i‖²₂ = Σ_t x_ti²`` per input ``[in]`` (e.g. from
            :func:`~admm_jax.pruning.capture.sqnorm_stats`, or the diagonal of a Gram matrix).
        sparsity: fraction of zeros per output, in ``[0, 1)`` (ignored for ``N:M``; of the
            tensor's tiles for block).
        structure: ``"unstructured"``, ``"N:M"``, ``"blockB"`` (e.g. ``"block16"``) or a
            structure value (no channel pruning).

    Returns:
        ``(pruned kernel, keep mask)``.
    """
    w, sparsity, structure = check_kernel_args(WANDA, w, sparsity, structure)
    sqnorm = jnp.asarray(sqnorm)
    if sqnorm.shape != (w.shape[0],):
        raise ValueError(f"sqnorm must have shape ({w.shape[0]},) = [in], got {sqnorm.shape}")
    return _wanda(w, sqnorm, sparsity=sparsity, structure=structure)


#: The registration of Wanda (squared input norms, unstructured, N:M and block).
WANDA = register_pruner("wanda", per_kernel(wanda_prune), stats=sqnorm_stats,
                        structures=(Unstructured, NM, Block))
