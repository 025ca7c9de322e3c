"""Compact linear layers: store and run only what a compressed weight keeps.

Each layer maps ``[..., in] -> [..., out]`` like the bias-free :func:`dense_linear` (kernels
``[in, out]``) and stands for a dense ``W`` that :func:`materialize` rebuilds:

* :class:`LowRankLinear` ``y = (x U) V``, ``W = U V`` with ``U [in, r]``, ``V [r, out]``;
* :class:`SparseLinear` ``y = x W`` with ``W`` a :class:`kernels.SparseMatrix` (COO values +
  int16/int32 rows and cols), run by :func:`kernels.sparse_matmul` (SpMM forward, SDDMM value
  gradient);
* :class:`BlockSparseLinear` ``y = x W`` with ``W`` a :class:`kernels.BlockSparseMatrix`
  (``b × b`` tiles + int16/int32 block rows and columns: BSR), run by the same dispatcher with
  dense tile products;
* :class:`NMLinear` N:M along the input axis: ``values [in·N/M, out]`` and uint8 in-group
  indices (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks");
* :class:`SumLinear` ``y = Σ_p part_p(x)``, e.g. SALAAD's ``W = L + S``.

State: trained numbers are ``nnx.Param``; index arrays are :class:`SparseIndices`, a non-Param
``nnx.Variable``, so ``nnx.Param`` filters (``trainable=nnx.Param`` of the training step,
optimizers) never see them, while ``nnx.split`` / ``nnx.to_pure_dict`` / ``nnx.merge`` carry
them with their integer dtype: they are ordinary leaves of the pure-dict params and of a
checkpoint, e.g. ``{"values": f32[nnz], "rows": i16[nnz], "cols": i16[nnz]}`` or
``{"values": f32[n_blocks, b, b], "block_rows": i16[n_blocks], "block_cols": i16[n_blocks]}``.
The sparse layers also hold a static :class:`kernels.DensifyRule` (``rule``, part of the graph
definition, not of the params): the density above which ``impl="auto"`` runs the product dense.

Layouts, templates and building a compact model from a dense, SALAAD or pruned source:
:mod:`admm_jax.models.layouts`. :func:`materialize` is the dense ``[in, out]`` kernel of any of
these layers, and :func:`param_bytes` the bytes the module keeps resident.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from admm_jax._checks import check_int, is_traced

__all__ = [
    "BlockSparseLinear",
    "LowRankLinear",
    "NMLinear",
    "SparseIndices",
    "SparseLinear",
    "SumLinear",
    "block_sparse_from_dense",
    "check_nm_pattern",
    "low_rank_from_factors",
    "materialize",
    "nm_from_dense",
    "param_bytes",
    "sparse_from_dense",
]

Array = jax.Array


class SparseIndices(nnx.Variable):
    """Integer index state of a compact layer: saved and restored with the params, never
    selected by ``nnx.Param`` filters, so never trained."""


class LowRankLinear(nnx.Module):
    """``y = (x U) V``: ``W = U V`` of rank ≤ r in ``r·(in + out)`` numbers.

    Args:
        u: ``[in, r]`` and ``v``: ``[r, out]`` (both ``nnx.Param``).
        compute_dtype: dtype of activations and factors in the two matmuls.
    """

    def __init__(self, u: Array, v: Array, *, compute_dtype: str = "float32"):
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(f"low-rank factors must be U [in, r] and V [r, out], got shapes "
                             f"{u.shape} and {v.shape}")
        self.in_features, self.rank = u.shape
        self.out_features = v.shape[1]
        self.compute_dtype = compute_dtype
        self.u, self.v = nnx.Param(jnp.asarray(u)), nnx.Param(jnp.asarray(v))

    def __call__(self, x: Array) -> Array:
        dt = jnp.dtype(self.compute_dtype)
        return (x.astype(dt) @ self.u[...].astype(dt)) @ self.v[...].astype(dt)

    def dense(self) -> Array:
        """``U V`` as ``[in, out]``."""
        return self.u[...] @ self.v[...]


class SparseLinear(nnx.Module):
    """``y = x W`` with ``W`` sparse: ``values`` an ``nnx.Param [nnz]``, ``rows`` and ``cols``
    :class:`SparseIndices` (the support is fixed, the values train through the SDDMM backward
    of :func:`kernels.sparse_matmul`, ``impl="auto"``).

    Args:
        matrix: a validated :class:`kernels.SparseMatrix` ``[in, out]``.
        compute_dtype: activations and values are cast to it; the kernel accumulates in fp32.
        rule: the :class:`kernels.DensifyRule` the dispatcher densifies by (static; default
            :data:`kernels.DEFAULT_RULE`).
    """

    def __init__(self, matrix: kernels.SparseMatrix, *, compute_dtype: str = "float32",
                 rule: kernels.DensifyRule | None = None):
        if not isinstance(matrix, kernels.SparseMatrix):
            raise TypeError(f"matrix must be a kernels.SparseMatrix, got {type(matrix).__name__}")
        self.in_features, self.out_features = matrix.shape
        self.compute_dtype = compute_dtype
        self.rule = _check_rule(rule)
        self.values = nnx.Param(matrix.values)
        self.rows, self.cols = SparseIndices(matrix.rows), SparseIndices(matrix.cols)

    @property
    def matrix(self) -> kernels.SparseMatrix:
        """The stored ``W`` as a :class:`kernels.SparseMatrix`."""
        return kernels.SparseMatrix(values=self.values[...], rows=self.rows[...],
                                    cols=self.cols[...],
                                    shape=(self.in_features, self.out_features))

    def __call__(self, x: Array) -> Array:
        return _sparse_call(x, self.matrix, self.compute_dtype, self.rule)

    def dense(self) -> Array:
        """The scatter of ``values`` into a zero ``[in, out]``."""
        return kernels.to_dense(self.matrix)


class BlockSparseLinear(nnx.Module):
    """``y = x W`` with ``W`` block-sparse (BSR): ``values`` an ``nnx.Param [n_blocks, b, b]``
    of dense ``b × b`` tiles, ``block_rows`` and ``block_cols`` :class:`SparseIndices` of their
    positions on the block grid (fixed; the values train through the SDDMM backward of
    :func:`kernels.sparse_matmul`, ``impl="auto"``). Entries of tiles that overhang ``[in,
    out]`` (shapes that are not multiples of ``b``) are stored but never used.

    Args:
        matrix: a validated :class:`kernels.BlockSparseMatrix` ``[in, out]``.
        compute_dtype: activations and values are cast to it; the kernel accumulates in fp32.
        rule: the :class:`kernels.DensifyRule` the dispatcher densifies by (static; default
            :data:`kernels.DEFAULT_RULE`).
    """

    def __init__(self, matrix: kernels.BlockSparseMatrix, *, compute_dtype: str = "float32",
                 rule: kernels.DensifyRule | None = None):
        if not isinstance(matrix, kernels.BlockSparseMatrix):
            raise TypeError(f"matrix must be a kernels.BlockSparseMatrix, got "
                            f"{type(matrix).__name__}")
        self.in_features, self.out_features = matrix.shape
        self.compute_dtype = compute_dtype
        self.rule = _check_rule(rule)
        self.values = nnx.Param(matrix.values)
        self.block_rows = SparseIndices(matrix.block_rows)
        self.block_cols = SparseIndices(matrix.block_cols)

    @property
    def shape(self) -> tuple[int, int]:
        """``(in, out)`` of ``W``."""
        return self.in_features, self.out_features

    @property
    def block_size(self) -> int:
        """The tile side ``b``."""
        return int(self.values.shape[1])

    @property
    def n_blocks(self) -> int:
        """Number of stored tiles."""
        return int(self.values.shape[0])

    @property
    def matrix(self) -> kernels.BlockSparseMatrix:
        """The stored ``W`` as a :class:`kernels.BlockSparseMatrix`."""
        return kernels.BlockSparseMatrix(
            values=self.values[...], block_rows=self.block_rows[...],
            block_cols=self.block_cols[...], shape=self.shape)

    def __call__(self, x: Array) -> Array:
        return _sparse_call(x, self.matrix, self.compute_dtype, self.rule)

    def dense(self) -> Array:
        """The tiles scattered into a zero ``[in, out]`` (overhang dropped)."""
        return self.matrix.to_dense()


def _check_rule(rule: kernels.DensifyRule | None) -> kernels.DensifyRule:
    """``rule``, or :data:`kernels.DEFAULT_RULE` for ``None``."""
    rule = kernels.DEFAULT_RULE if rule is None else rule
    if not isinstance(rule, kernels.DensifyRule):
        raise TypeError(f"rule must be a kernels.DensifyRule, got {type(rule).__name__}")
    return rule


def _sparse_call(x: Array, w: kernels.SparseMatrix | kernels.BlockSparseMatrix, compute_dtype: str,
                 rule: kernels.DensifyRule) -> Array:
    """``x W`` in ``compute_dtype`` (values and activations cast; fp32 accumulation)."""
    dt = jnp.dtype(compute_dtype)
    w = w.with_values(w.values.astype(dt))
    return kernels.sparse_matmul(x.astype(dt), w, impl="auto", rule=rule).astype(dt)


class NMLinear(nnx.Module):
    """N:M along the input axis: in every group ``g`` of ``M`` consecutive input rows, each
    output column ``o`` keeps ``N`` entries, ``W[g·M + idx[g·N+k, o], o] = values[g·N+k, o]``
    with ``0 ≤ idx[g·N, o] < … < idx[g·N+N−1, o] < M`` (``values [in·N/M, out]`` Param,
    ``indices`` uint8 :class:`SparseIndices` of the same shape).

    The forward is the XLA formulation that wins on CPU: the values are placed into their group
    slots (an ``M``-way select, ``[in, out]`` transient in ``compute_dtype``) and one dense
    matmul follows; gathering ``x`` per group instead holds ``T·N/M`` times as many numbers at
    ``T`` tokens. Resident storage is the values and the uint8 indices only. A Pallas N:M kernel
    that gathers ``x`` tiles in on-chip memory is future work.
    """

    def __init__(self, values: Array, indices: Array, n: int, m: int, *,
                 compute_dtype: str = "float32"):
        n, m = check_nm_pattern(n, m)
        if values.ndim != 2 or indices.shape != values.shape or values.shape[0] % n:
            raise ValueError(f"N:M values and indices must share a shape [in·N/M, out] with "
                             f"in·N/M divisible by N = {n}, got {values.shape} and "
                             f"{indices.shape}")
        if not jnp.issubdtype(indices.dtype, jnp.integer):
            raise TypeError(f"N:M indices must be integers, got dtype {indices.dtype}")
        if not is_traced(indices):
            _check_nm_indices(np.asarray(indices, np.int64).reshape(-1, n, values.shape[1]), m)
        self.n, self.m, self.compute_dtype = n, m, compute_dtype
        self.in_features, self.out_features = values.shape[0] // n * m, values.shape[1]
        self.values = nnx.Param(jnp.asarray(values))
        self.indices = SparseIndices(jnp.asarray(indices).astype(jnp.uint8))

    def __call__(self, x: Array) -> Array:
        dt = jnp.dtype(self.compute_dtype)
        return x.astype(dt) @ self.dense().astype(dt)

    def dense(self) -> Array:
        """``W [in, out]``: ``W[g, j, o] = Σ_k values[g, k, o] · [idx[g, k, o] = j]``."""
        groups, out = self.in_features // self.m, self.out_features
        idx = self.indices[...].astype(jnp.int32).reshape(groups, self.n, 1, out)
        v = self.values[...].reshape(groups, self.n, 1, out)
        slots = jnp.arange(self.m, dtype=jnp.int32)[None, None, :, None]
        return jnp.sum(jnp.where(idx == slots, v, 0), axis=1).reshape(self.in_features, out)


def check_nm_pattern(n: int, m: int) -> tuple[int, int]:
    """``(N, M)`` validated: ``1 ≤ N < M ≤ 256`` (in-group indices are uint8)."""
    n, m = check_int("N", n, minimum=1), check_int("M", m, minimum=2, maximum=256)
    if n >= m:
        raise ValueError(f"N:M sparsity needs N < M, got {n}:{m}")
    return n, m


def _check_nm_indices(idx: np.ndarray, m: int) -> None:
    """``idx [G, N, out]`` in ``[0, m)`` and strictly increasing along ``N``."""
    if idx.size and (idx.min() < 0 or idx.max() >= m):
        raise ValueError(f"N:M in-group indices must lie in [0, {m}), got values in "
                         f"[{idx.min()}, {idx.max()}]")
    if (np.diff(idx, axis=1) <= 0).any():
        raise ValueError("N:M in-group indices must be strictly increasing within each group "
                         "(sorted, no duplicates)")


class SumLinear(nnx.Module):
    """``y = Σ_p part_p(x)``, ``W = Σ_p W_p`` (e.g. SALAAD's low-rank + sparse ``L + S``).

    Args:
        parts: one or more linears of equal ``in_features`` / ``out_features``.
    """

    def __init__(self, parts: Sequence[nnx.Module]):
        parts = list(parts)
        if not parts:
            raise ValueError("SumLinear needs at least one part")
        shapes = {(p.in_features, p.out_features) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"SumLinear parts must share one [in, out] shape, got "
                             f"{sorted(shapes)}")
        (self.in_features, self.out_features), = shapes
        self.parts = nnx.List(parts)

    def __call__(self, x: Array) -> Array:
        return sum(part(x) for part in self.parts)

    def dense(self) -> Array:
        """``Σ_p materialize(part_p)``."""
        return sum(materialize(part) for part in self.parts)


def materialize(module: nnx.Module) -> Array:
    """The dense kernel ``W [in, out]`` of a bias-free ``nnx.Linear`` or of a compact layer, so
    that ``module(x) = x @ materialize(module)`` (up to rounding in the compute dtype)."""
    if isinstance(module, nnx.Linear):
        if module.bias is not None:
            raise ValueError("materialize expects a bias-free nnx.Linear")
        return module.kernel[...]
    if isinstance(module, (LowRankLinear, SparseLinear, BlockSparseLinear, NMLinear, SumLinear)):
        return module.dense()
    raise TypeError(f"cannot materialize a {type(module).__name__}")


def param_bytes(module: nnx.Module) -> int:
    """Bytes of every array ``module`` stores (Params and index state, each at its own dtype):
    ``Σ size · itemsize`` over its state, for concrete or abstract (``eval_shape``) modules."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(nnx.state(module))))


def low_rank_from_factors(u: Array, s: Array, v: Array, *,
                          compute_dtype: str = "float32") -> LowRankLinear:
    """``W = u diag(s) vᵀ`` (``u [in, r]``, ``s [r] ≥ 0``, ``v [out, r]``: the SVD convention
    of the SALAAD surrogates) as ``U = u·√s``, ``V = (v·√s)ᵀ`` — the singular values split
    evenly, so both factors have the same scale."""
    u, s, v = jnp.asarray(u), jnp.asarray(s), jnp.asarray(v)
    if s.ndim != 1 or u.ndim != 2 or v.ndim != 2 or u.shape[1] != s.shape[0] or \
            v.shape[1] != s.shape[0]:
        raise ValueError(f"expected u [in, r], s [r], v [out, r], got shapes {u.shape}, "
                         f"{s.shape}, {v.shape}")
    if not is_traced(s) and bool((s < 0).any()):
        raise ValueError("singular values s must be non-negative")
    root = jnp.sqrt(s)
    return LowRankLinear(u * root, (v * root).T, compute_dtype=compute_dtype)


def sparse_from_dense(w: Array, mask: Array | None = None, *,
                      index_dtype: kernels.sparse.IndexDtype = "auto",
                      compute_dtype: str = "float32") -> SparseLinear:
    """The entries of ``w [in, out]`` where ``mask`` holds (default ``w ≠ 0``), exactly, as a
    :class:`SparseLinear` (:func:`kernels.from_dense`; concrete inputs only)."""
    return SparseLinear(kernels.from_dense(jnp.asarray(w), mask, index_dtype=index_dtype),
                        compute_dtype=compute_dtype)


def block_sparse_from_dense(w: Array, mask: Array | None = None, *, block_size: int = 16,
                            index_dtype: kernels.sparse.IndexDtype = "auto",
                            compute_dtype: str = "float32") -> BlockSparseLinear:
    """The ``block_size × block_size`` tiles of ``w [in, out]`` that hold a kept entry (``mask``,
    default ``w ≠ 0``) as a :class:`BlockSparseLinear` storing ``w ⊙ mask`` exactly (entries off
    the mask inside a kept tile as zeros; :func:`kernels.block_from_dense`, concrete inputs
    only)."""
    matrix = kernels.block_from_dense(jnp.asarray(w), mask, block_size=block_size,
                                      index_dtype=index_dtype)
    return BlockSparseLinear(matrix, compute_dtype=compute_dtype)


def nm_from_dense(w: Array, n: int, m: int, *, compute_dtype: str = "float32") -> NMLinear:
    """An N:M-sparse ``w [in, out]`` (≤ ``n`` nonzeros in every group of ``m`` input rows of
    each column) stored exactly as :class:`NMLinear`: the nonzeros of each group, topped up to
    ``n`` slots with its first zero positions. Raises ``ValueError`` if a group holds more."""
    n, m = check_nm_pattern(n, m)
    w = np.asarray(w, np.float32)
    if w.ndim != 2 or w.shape[0] % m:
        raise ValueError(f"N:M needs a 2-D [in, out] matrix with in divisible by M = {m}, got "
                         f"shape {w.shape}")
    groups = w.reshape(w.shape[0] // m, m, w.shape[1])
    counts = (groups != 0).sum(axis=1)
    if (counts > n).any():
        g, o = np.argwhere(counts > n)[0]
        raise ValueError(f"w is not {n}:{m} sparse: rows {g * m}…{g * m + m - 1} of column {o} "
                         f"hold {counts[g, o]} nonzeros")
    keep = np.sort(np.argsort(groups == 0, axis=1, kind="stable")[:, :n], axis=1)
    values = np.take_along_axis(groups, keep, axis=1).reshape(-1, w.shape[1])
    return NMLinear(jnp.asarray(values), jnp.asarray(keep.reshape(values.shape), np.uint8), n, m,
                    compute_dtype=compute_dtype)
