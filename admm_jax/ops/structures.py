"""Sparsity structures as small typed values, with the one place that turns a score into a mask.

A structure says *which* entries of a ``[in, out]`` kernel may be zeroed together:

* :class:`Unstructured` — any entries; the fraction of zeros is the caller's ``sparsity``;
* :class:`NM` — in every group of ``m`` consecutive inputs of each output, keep ``n``
  (``2:4``, ``4:8``; fixes the sparsity at ``1 − n/m``);
* :class:`Channel` — whole output units (columns of the kernel, rows of the PyTorch ``[out, in]``
  weight): the structured sparsity of GLU pruning.

ELSA's projection, its ``finalize`` and the one-shot pruners all take a structure (or its string
form, :func:`parse_structure`) and call :func:`structure_mask`, so a new structure is one class
and one branch here (the dispatch of jaxpruner's ``sparsity_types``, with immutable values).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from admm_jax._checks import check_real
from admm_jax.ops.projection import keep_count, nm_mask, topk_mask

Array = jax.Array


# Equality and hashing by type as well as fields: the field-less ``Unstructured()`` and
# ``Channel()`` are both ``()`` as tuples, and ``NM(2, 4) == (2, 4)``; structures are jit static
# arguments and dict keys, so they must not compare equal across kinds.
def _typed_eq(self, other) -> bool:
    return type(self) is type(other) and tuple.__eq__(self, other)


def _typed_ne(self, other) -> bool:
    return not _typed_eq(self, other)


def _typed_hash(self) -> int:
    return hash((type(self).__name__, *self))


class Unstructured(NamedTuple):
    """Any entries may be pruned."""

    __eq__, __ne__, __hash__ = _typed_eq, _typed_ne, _typed_hash

    def __str__(self) -> str:
        return "unstructured"


class NM(NamedTuple):
    """Keep ``n`` of every ``m`` consecutive inputs of each output (``0 < n < m``)."""

    n: int
    m: int

    __eq__, __ne__, __hash__ = _typed_eq, _typed_ne, _typed_hash

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


class Channel(NamedTuple):
    """Prune whole output units: columns of a ``[in, out]`` kernel, scored by their summed
    entry scores."""

    __eq__, __ne__, __hash__ = _typed_eq, _typed_ne, _typed_hash

    def __str__(self) -> str:
        return "channel"


Structure = Unstructured | NM | Channel
StructureSpec = str | Structure


def parse_structure(spec: StructureSpec) -> Structure:
    """``"unstructured"`` → :class:`Unstructured`, ``"N:M"`` (e.g. ``"2:4"``) → :class:`NM`,
    ``"channel"`` → :class:`Channel`; structure values pass through (an :class:`NM` is
    re-checked)."""
    if isinstance(spec, (Unstructured, Channel)):
        return spec
    if isinstance(spec, NM):
        n, m = spec
    elif spec == "unstructured":
        return Unstructured()
    elif spec == "channel":
        return Channel()
    else:
        try:
            n, m = (int(p) for p in str(spec).split(":"))
        except ValueError:
            raise ValueError(f"structure must be 'unstructured', 'channel' or 'N:M' (e.g. "
                             f"'2:4'), got {spec!r}") from None
    if not 0 < n < m:
        raise ValueError(f"structure {n}:{m} needs 0 < N < M")
    return NM(n, m)


def effective_sparsity(structure: StructureSpec, sparsity: float) -> float:
    """The fraction of zeros a structure produces: ``1 − n/m`` for N:M, else ``sparsity``."""
    structure = parse_structure(structure)
    if isinstance(structure, NM):
        return 1.0 - structure.n / structure.m
    return check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)


def check_kernel_structure(structure: StructureSpec, shape: tuple[int, ...],
                           what: str = "the kernel") -> Structure:
    """The parsed structure, after checking it fits a ``[in, out]`` kernel of ``shape``."""
    structure = parse_structure(structure)
    if len(shape) != 2:
        raise ValueError(f"{what} must be a 2-D [in, out] kernel, got shape {tuple(shape)}")
    if isinstance(structure, NM) and shape[0] % structure.m:
        raise ValueError(f"structure {structure}: M = {structure.m} must divide the input "
                         f"dimension of every pruned kernel, but {what} has {shape[0]} inputs")
    return structure


def structure_mask(score: Array, structure: StructureSpec, sparsity: float) -> Array:
    """Bool keep-mask of a ``[in, out]`` score matrix under ``structure``.

    * unstructured: the ``keep_count(size, sparsity)`` largest scores (ties: lowest flat index);
    * N:M: the ``n`` largest of every ``m`` consecutive inputs of each output;
    * channel: the ``keep_count(out, sparsity)`` columns with the largest summed score, whole.
    """
    structure = check_kernel_structure(structure, score.shape)
    if isinstance(structure, NM):
        return nm_mask(score, structure.n, structure.m)
    if isinstance(structure, Channel):
        columns = jnp.sum(score.astype(jnp.float32), axis=0)
        keep = topk_mask(columns, keep_count(columns.size, sparsity))
        return jnp.broadcast_to(keep[None, :], score.shape)
    return topk_mask(score, keep_count(score.size, sparsity))
