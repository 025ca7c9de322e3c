"""Sparse storage of a linear kernel ``W ∈ R^{n_in × n_out}`` (flax layout, ``y = x @ W``).

Format: coordinate list (COO) sorted column-major,

    W[rows[i], cols[i]] = values[i],   i = 0 … nnz−1,   (cols[i], rows[i]) strictly increasing,

so the entries feeding output column ``c`` are one contiguous run ``[off[c], off[c+1])`` with the
CSC-like offsets ``off = searchsorted(cols, 0 … n_out)`` (:func:`column_offsets`). That run is
what the forward SpMM reduces over (a sorted segment-sum on CPU, one column tile per program in
Pallas); the transpose product ``dy @ Wᵀ`` uses the row-major order given by
:func:`row_order`.

Indices are stored as ``int16`` when their dimension allows (``≤ 32,767``) and ``int32``
otherwise, per axis — the choice RoSA's kernels make to halve index memory (Nikdan et al. 2024,
"RoSA: Accurate Parameter-Efficient Fine-Tuning via Robust Adaptation"). Kernels widen them to
``int32`` before any arithmetic.

:class:`SparseMatrix` is a pytree whose leaves are ``values``, ``rows`` and ``cols``; ``shape``
is static metadata, so a matrix passes through ``jit`` / ``grad`` and only its values need be
trained (the indices are integer leaves with no gradient).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax._checks import check_choice, check_int, is_traced

INT16_MAX = 32_767
IndexDtype = Literal["auto", "int16", "int32"]
_INDEX_DTYPES = ("auto", "int16", "int32")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseMatrix:
    """``W ∈ R^{n_in × n_out}`` with ``W[rows[i], cols[i]] = values[i]``, sorted by
    ``(cols, rows)``; build it with :func:`sparse_matrix` or :func:`from_dense`, which validate.

    Fields: ``values`` f[nnz]; ``rows`` int16/int32[nnz] in ``[0, n_in)``; ``cols``
    int16/int32[nnz] in ``[0, n_out)``; ``shape = (n_in, n_out)`` (static)."""

    values: jax.Array
    rows: jax.Array
    cols: jax.Array
    shape: tuple[int, int] = dataclasses.field(metadata={"static": True})

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        """``nnz / (n_in · n_out)``."""
        return self.nnz / max(self.shape[0] * self.shape[1], 1)

    def to_dense(self) -> jax.Array:
        """The dense ``[n_in, n_out]`` matrix (zeros off the support)."""
        return to_dense(self)

    def with_values(self, values: jax.Array) -> SparseMatrix:
        """The same support with new ``values`` (e.g. trained ones); shape checked."""
        if tuple(values.shape) != tuple(self.values.shape):
            raise ValueError(f"values must have shape {self.values.shape}, got {values.shape}")
        return dataclasses.replace(self, values=values)


def index_dtype_for(dim: int, index_dtype: IndexDtype = "auto") -> np.dtype:
    """Index dtype for an axis of size ``dim``: ``int16`` if ``dim ≤ 32,767`` (``"auto"``), else
    ``int32``; requesting ``"int16"`` for a larger axis raises ``ValueError``."""
    check_choice("index_dtype", index_dtype, _INDEX_DTYPES)
    if index_dtype == "int16" and dim > INT16_MAX:
        raise ValueError(f"int16 indices cannot address a dimension of size {dim} "
                         f"(> {INT16_MAX}); use index_dtype='int32' or 'auto'")
    if index_dtype == "int32" or dim > INT16_MAX:
        return np.dtype(np.int32)
    return np.dtype(np.int16)


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"shape must be (n_in, n_out), got {shape!r}")
    return check_int("n_in", shape[0], minimum=1), check_int("n_out", shape[1], minimum=1)


def _check_indices(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> None:
    """Range and uniqueness of concrete, already column-major-sorted indices."""
    for name, idx, dim in (("rows", rows, shape[0]), ("cols", cols, shape[1])):
        bad = (idx < 0) | (idx >= dim)
        if bad.any():
            k = int(np.argmax(bad))
            raise ValueError(f"{name}[{k}] = {int(idx[k])} is out of range for a dimension of "
                             f"size {dim} (shape {shape})")
    dup = (rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1])
    if dup.any():
        k = int(np.argmax(dup))
        raise ValueError(f"duplicated entry (row, col) = ({int(rows[k])}, {int(cols[k])}); "
                         f"each position may be stored once")


def sparse_matrix(values: jax.Array, rows: jax.Array, cols: jax.Array, shape: tuple[int, int],
                  *, index_dtype: IndexDtype = "auto") -> SparseMatrix:
    """A validated :class:`SparseMatrix` from COO triples in any order.

    Entries are sorted by ``(cols, rows)`` (values permuted alike); indices are cast per axis
    with :func:`index_dtype_for`. Raises ``ValueError`` for mismatched lengths, non-1-D
    inputs, indices out of range, duplicated ``(row, col)`` pairs, or ``int16`` requested for an
    axis above 32,767. Range/duplicate checks need concrete indices: under ``jit`` they are
    skipped (the order is still imposed)."""
    shape = _check_shape(tuple(shape))
    values, rows, cols = jnp.asarray(values), jnp.asarray(rows), jnp.asarray(cols)
    if values.ndim != 1 or rows.shape != values.shape or cols.shape != values.shape:
        raise ValueError(f"values, rows and cols must be 1-D of equal length, got shapes "
                         f"{values.shape}, {rows.shape}, {cols.shape}")
    for name, idx in (("rows", rows), ("cols", cols)):
        if not jnp.issubdtype(idx.dtype, jnp.integer):
            raise TypeError(f"{name} must be integers, got dtype {idx.dtype}")
    row_dtype, col_dtype = index_dtype_for(shape[0], index_dtype), index_dtype_for(shape[1],
                                                                                   index_dtype)
    if any(is_traced(a) for a in (rows, cols)):
        order = jnp.lexsort((rows, cols))
        return SparseMatrix(values=values[order], rows=rows[order].astype(row_dtype),
                            cols=cols[order].astype(col_dtype), shape=shape)
    # concrete indices: sort and check in NumPy (no per-nnz eager dispatch or compilation)
    r64, c64 = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    order = np.lexsort((r64, c64))
    r64, c64 = r64[order], c64[order]
    _check_indices(r64, c64, shape)
    values = values[jnp.asarray(order)] if is_traced(values) else jnp.asarray(
        np.asarray(values)[order])
    return SparseMatrix(values=values, rows=jnp.asarray(r64.astype(row_dtype)),
                        cols=jnp.asarray(c64.astype(col_dtype)), shape=shape)


def from_dense(w: jax.Array, mask: jax.Array | None = None, *,
               index_dtype: IndexDtype = "auto") -> SparseMatrix:
    """The entries of dense ``w [n_in, n_out]`` where ``mask`` is true (default ``w ≠ 0``).

    ``nnz`` depends on the data, so ``w`` and ``mask`` must be concrete (not traced)."""
    if is_traced(w) or is_traced(mask):
        raise ValueError("from_dense needs concrete arrays (nnz depends on the data); call it "
                         "outside jit")
    w = np.asarray(w) if w.dtype != jnp.bfloat16 else np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D [n_in, n_out] matrix, got shape {w.shape}")
    keep = w != 0 if mask is None else np.asarray(mask, bool)
    if keep.shape != w.shape:
        raise ValueError(f"mask shape {keep.shape} does not match w shape {w.shape}")
    cols, rows = np.nonzero(keep.T)  # column-major order directly
    return sparse_matrix(jnp.asarray(w[rows, cols]), rows, cols, w.shape,
                         index_dtype=index_dtype)


def to_dense(m: SparseMatrix) -> jax.Array:
    """``W`` as a dense ``[n_in, n_out]`` array: a scatter of ``values`` into zeros."""
    dense = jnp.zeros(m.shape, m.values.dtype)
    return dense.at[m.rows.astype(jnp.int32), m.cols.astype(jnp.int32)].set(
        m.values, unique_indices=True, indices_are_sorted=True)


def segment_offsets(ids: jax.Array, n: int, block: int = 1) -> jax.Array:
    """For sorted ``ids`` in ``[0, n)``: entry ``j`` is the first ``i`` with
    ``ids[i] ≥ j·block``, for ``j = 0 … ⌈n/block⌉`` (int32; the last entry is ``len(ids)``)."""
    starts = jnp.arange(0, -(-n // block) + 1, dtype=jnp.int32) * block
    return jnp.searchsorted(ids.astype(jnp.int32), starts, side="left").astype(jnp.int32)


def column_offsets(m: SparseMatrix, block: int = 1) -> jax.Array:
    """CSC-like offsets of column blocks of ``block`` columns (:func:`segment_offsets` of
    ``cols``); ``block = 1`` gives the CSC column pointers."""
    return segment_offsets(m.cols, m.shape[1], block)


def accumulation_dtype(*arrays: jax.Array) -> jnp.dtype:
    """The dtype the kernels accumulate and return in: the inputs' promoted, at least
    float32 (so bf16 activations accumulate in fp32)."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def row_order(m: SparseMatrix) -> jax.Array:
    """The permutation that sorts the entries by ``(rows, cols)``: the column-major order of
    ``Wᵀ`` (a stable sort, since entries are already ordered by column within a row)."""
    return jnp.argsort(m.rows.astype(jnp.int32), stable=True)


def pad_to(a: jax.Array, axis: int, multiple: int, extra: int = 0) -> jax.Array:
    """``a`` zero-padded along ``axis`` to a multiple of ``multiple``, plus ``extra``."""
    pad = (-a.shape[axis]) % multiple + extra
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    return jnp.pad(a, widths)


def overlap_block(k: jax.Array, size: int, n: int) -> tuple[jax.Array, jax.Array]:
    """Start of block ``k`` of ``size`` elements out of ``n``, clamped so the last block ends at
    ``n`` (no padding), and the mask ``fresh [size]`` of the elements no earlier block covered."""
    start = jnp.minimum(k * size, n - size)
    return start, start + jnp.arange(size) >= k * size
