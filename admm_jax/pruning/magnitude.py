"""Magnitude pruning (Han et al., 2015): keep the largest ``|W_ij|``; no calibration data.

References:
    Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient Neural
    Networks", NeurIPS 2015.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from admm_jax.ops.structures import (
    NM,
    Block,
    Channel,
    Structure,
    StructureSpec,
    Unstructured,
    structure_mask,
)
from admm_jax.pruning.registry import check_kernel_args, per_kernel, register_pruner

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("sparsity", "structure"))
def _magnitude(w: Array, *, sparsity: float, structure: Structure) -> tuple[Array, Array]:
    keep = structure_mask(jnp.abs(w), structure, sparsity)
    return jnp.where(keep, w, 0), keep


def magnitude_prune(w: Array, *, sparsity: float = 0.5,
                    structure: StructureSpec = "unstructured") -> tuple[Array, Array]:
    """Magnitude pruning of one ``[in, out]`` kernel by the score ``|W_ij|``
    (:func:`~admm_jax.ops.structures.structure_mask`):

    * unstructured: the ``keep_count(size, sparsity)`` largest entries of the tensor;
    * ``N:M``: the ``N`` largest of every ``M`` consecutive inputs of each output;
    * channel: the ``keep_count(out, sparsity)`` output columns with the largest ``Σ_i |W_ij|``;
    * block ``b``: the ``keep_count(⌈in/b⌉·⌈out/b⌉, sparsity)`` ``b × b`` tiles with the largest
      ``Σ |W_ij|`` over the tile (partial edge tiles count as tiles), whole.

    Args:
        w: kernel ``[in, out]``.
        sparsity: fraction of zeros in ``[0, 1)`` (of the tensor, of the output columns for
            channel, of the tiles for block; ignored for ``N:M``).
        structure: ``"unstructured"``, ``"N:M"``, ``"channel"``, ``"blockB"`` (e.g.
            ``"block16"``) or a structure value.

    Returns:
        ``(pruned kernel, keep mask)`` with ``pruned = where(mask, w, 0)``.
    """
    w, sparsity, structure = check_kernel_args(MAGNITUDE, w, sparsity, structure)
    return _magnitude(w, sparsity=sparsity, structure=structure)


#: The registration of magnitude pruning (data-free, every structure).
MAGNITUDE = register_pruner("magnitude", per_kernel(magnitude_prune), stats=None,
                            structures=(Unstructured, NM, Channel, Block))
