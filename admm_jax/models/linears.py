"""Compact linear layers: store and run only what a compressed weight keeps.

Each layer maps ``[..., in] -> [..., out]`` like the bias-free :func:`dense_linear` (kernels
``[in, out]``) and stands for a dense ``W`` that :func:`materialize` rebuilds:

* :class:`LowRankLinear` ``y = (x U) V``, ``W = U V`` with ``U [in, r]``, ``V [r, out]``;
* :class:`SparseLinear` ``y = x W`` with ``W`` a :class:`kernels.SparseMatrix` (COO values +
  int16/int32 rows and cols), run by :func:`kernels.sparse_matmul` (SpMM forward, SDDMM value
  gradient);
* :class:`NMLinear` N:M along the input axis: ``values [in·N/M, out]`` and uint8 in-group
  indices (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks");
* :class:`SumLinear` ``y = Σ_p part_p(x)``, e.g. SALAAD's ``W = L + S``.

State: trained numbers are ``nnx.Param``; index arrays are :class:`SparseIndices`, a non-Param
``nnx.Variable``, so ``nnx.Param`` filters (``trainable=nnx.Param`` of the training step,
optimizers) never see them, while ``nnx.split`` / ``nnx.to_pure_dict`` / ``nnx.merge`` carry
them with their integer dtype: they are ordinary leaves of the pure-dict params and of a
checkpoint, e.g. ``{"values": f32[nnz], "rows": i16[nnz], "cols": i16[nnz]}``.

Layouts and templates. A :data:`Layout` (``DenseLayout()``, ``LowRankLayout(rank)``,
``SparseLayout(nnz)``, ``NMLayout(n, m)``, ``SumLayout(parts)``) fixes every stored shape, so
``abstract_params(config, linear=structured_factory(layouts, config))`` is the exact restore
template (index leaves included, as int ``ShapeDtypeStruct``) without any data. A layout that
only gives ``nnz`` initialises a random support; ``SparseLayout(nnz, rows, cols)`` fixes it.

Building a compact model from a dense, SALAAD or pruned source::

    mods = {"layers/0/attn/q_proj": low_rank_from_factors(u, s, v),           # SVD factors
            "layers/0/mlp/up_proj": sparse_from_dense(w_pruned),              # w ≠ 0 kept
            "layers/1/mlp/down_proj": nm_from_dense(w_24, 2, 4),              # a 2:4 matrix
            "layers/1/attn/o_proj": SumLinear([low_rank_from_factors(u, s, v),
                                               sparse_from_dense(w_s)])}      # SALAAD L + S
    factory = structured_factory({p: layout_of(m) for p, m in mods.items()}, config)
    graphdef, params = init_params(config, key, linear=factory)
    params = insert_linears(params, mods)        # other leaves: copy them from the dense source

and back: ``materialize(module)`` is the dense ``[in, out]`` kernel of any of them, and
:func:`param_bytes` the bytes the module keeps resident.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from admm_jax._checks import check_int, is_traced
from admm_jax.models.llama import (
    LinearFactory,
    LinearSpec,
    LlamaConfig,
    abstract_params,
    dense_linear,
)
from kernels import SparseMatrix, from_dense, sparse_matmul, sparse_matrix, to_dense
from kernels.sparse import IndexDtype

__all__ = [
    "DenseLayout", "Layout", "LowRankLayout", "LowRankLinear", "NMLayout", "NMLinear",
    "SparseIndices", "SparseLayout", "SparseLinear", "SumLayout", "SumLinear", "build_linear",
    "insert_linears", "layout_of", "linear_specs", "low_rank_from_factors", "materialize",
    "nm_from_dense", "param_bytes", "sparse_from_dense", "structured_factory",
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
    """

    def __init__(self, matrix: SparseMatrix, *, compute_dtype: str = "float32"):
        if not isinstance(matrix, SparseMatrix):
            raise TypeError(f"matrix must be a kernels.SparseMatrix, got {type(matrix).__name__}")
        self.in_features, self.out_features = matrix.shape
        self.compute_dtype = compute_dtype
        self.values = nnx.Param(matrix.values)
        self.rows, self.cols = SparseIndices(matrix.rows), SparseIndices(matrix.cols)

    @property
    def matrix(self) -> SparseMatrix:
        """The stored ``W`` as a :class:`kernels.SparseMatrix`."""
        return SparseMatrix(values=self.values[...], rows=self.rows[...], cols=self.cols[...],
                            shape=(self.in_features, self.out_features))

    def __call__(self, x: Array) -> Array:
        dt = jnp.dtype(self.compute_dtype)
        w = self.matrix
        w = w.with_values(w.values.astype(dt))
        return sparse_matmul(x.astype(dt), w, impl="auto").astype(dt)

    def dense(self) -> Array:
        """The scatter of ``values`` into a zero ``[in, out]``."""
        return to_dense(self.matrix)


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
        n, m = _check_nm(n, m)
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


def _check_nm(n: int, m: int) -> tuple[int, int]:
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
    if isinstance(module, (LowRankLinear, SparseLinear, NMLinear, SumLinear)):
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


def sparse_from_dense(w: Array, mask: Array | None = None, *, index_dtype: IndexDtype = "auto",
                      compute_dtype: str = "float32") -> SparseLinear:
    """The entries of ``w [in, out]`` where ``mask`` holds (default ``w ≠ 0``), exactly, as a
    :class:`SparseLinear` (:func:`kernels.from_dense`; concrete inputs only)."""
    return SparseLinear(from_dense(jnp.asarray(w), mask, index_dtype=index_dtype),
                        compute_dtype=compute_dtype)


def nm_from_dense(w: Array, n: int, m: int, *, compute_dtype: str = "float32") -> NMLinear:
    """An N:M-sparse ``w [in, out]`` (≤ ``n`` nonzeros in every group of ``m`` input rows of
    each column) stored exactly as :class:`NMLinear`: the nonzeros of each group, topped up to
    ``n`` slots with its first zero positions. Raises ``ValueError`` if a group holds more."""
    n, m = _check_nm(n, m)
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



class DenseLayout(NamedTuple):
    """A plain ``nnx.Linear`` (:func:`dense_linear`)."""


class LowRankLayout(NamedTuple):
    """:class:`LowRankLinear` of ``rank`` (``1 ≤ rank ≤ min(in, out)``)."""

    rank: int


class SparseLayout(NamedTuple):
    """:class:`SparseLinear` with ``nnz`` entries: a random support, or the given ``rows`` and
    ``cols`` (length ``nnz``) fixed; the values are initialised at random either way."""

    nnz: int
    rows: Any = None
    cols: Any = None


class NMLayout(NamedTuple):
    """:class:`NMLinear` with ``n`` of every ``m`` input rows kept (random in-group support)."""

    n: int
    m: int


class SumLayout(NamedTuple):
    """:class:`SumLinear` of the given layouts, e.g. ``(LowRankLayout(8), SparseLayout(500))``."""

    parts: tuple


Layout = DenseLayout | LowRankLayout | SparseLayout | NMLayout | SumLayout
_LAYOUTS = (DenseLayout, LowRankLayout, SparseLayout, NMLayout, SumLayout)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def _build_low_rank(layout: LowRankLayout, spec: LinearSpec, config: LlamaConfig,
                    rngs: nnx.Rngs) -> LowRankLinear:
    """Factors with i.i.d. ``N(0, σ²)``, ``σ² = init_std / √r``, so ``Var W_ij = init_std²``."""
    d_in, d_out = spec.in_features, spec.out_features
    rank = check_int("rank", layout.rank, minimum=1)
    if rank > min(d_in, d_out):
        raise ValueError(f"rank {rank} exceeds min(in, out) = {min(d_in, d_out)}")
    std = float(np.sqrt(config.init_std / np.sqrt(rank)))
    return LowRankLinear(_normal(rngs, (d_in, rank), std), _normal(rngs, (rank, d_out), std),
                         compute_dtype=config.compute_dtype)


def _build_sparse(layout: SparseLayout, spec: LinearSpec, config: LlamaConfig,
                  rngs: nnx.Rngs) -> SparseLinear:
    d_in, d_out = spec.in_features, spec.out_features
    nnz = check_int("nnz", layout.nnz, minimum=0, maximum=d_in * d_out)
    if (layout.rows is None) != (layout.cols is None):
        raise ValueError("SparseLayout needs both rows and cols, or neither")
    if layout.rows is None:
        flat = jax.random.choice(rngs.params(), d_in * d_out, (nnz,), replace=False)
        rows, cols = flat // d_out, flat % d_out
    else:
        with jax.ensure_compile_time_eval():  # concrete even under eval_shape: validated
            rows, cols = jnp.asarray(layout.rows), jnp.asarray(layout.cols)
        if rows.shape != (nnz,) or cols.shape != (nnz,):
            raise ValueError(f"SparseLayout rows and cols must have shape ({nnz},), got "
                             f"{rows.shape} and {cols.shape}")
    matrix = sparse_matrix(_normal(rngs, (nnz,), config.init_std), rows, cols, (d_in, d_out))
    return SparseLinear(matrix, compute_dtype=config.compute_dtype)


def _build_nm(layout: NMLayout, spec: LinearSpec, config: LlamaConfig,
              rngs: nnx.Rngs) -> NMLinear:
    n, m = _check_nm(layout.n, layout.m)
    d_in, d_out = spec.in_features, spec.out_features
    if d_in % m:
        raise ValueError(f"M = {m} must divide the input dimension {d_in} for {n}:{m} sparsity")
    order = jnp.argsort(jax.random.uniform(rngs.params(), (d_in // m, m, d_out)), axis=1)
    indices = jnp.sort(order[:, :n], axis=1).reshape(d_in // m * n, d_out)
    return NMLinear(_normal(rngs, indices.shape, config.init_std), indices.astype(jnp.uint8), n,
                    m, compute_dtype=config.compute_dtype)


def _build_sum(layout: SumLayout, spec: LinearSpec, config: LlamaConfig,
               rngs: nnx.Rngs) -> SumLinear:
    if not isinstance(layout.parts, (tuple, list)) or not layout.parts:
        raise ValueError(f"SumLayout needs a non-empty tuple of parts, got {layout.parts!r}")
    return SumLinear([build_linear(part, spec, config, rngs) for part in layout.parts])


_BUILDERS = {LowRankLayout: _build_low_rank, SparseLayout: _build_sparse, NMLayout: _build_nm,
             SumLayout: _build_sum}


def build_linear(layout: Layout, spec: LinearSpec, config: LlamaConfig,
                 rngs: nnx.Rngs) -> nnx.Module:
    """The linear ``layout`` describes for ``spec``, randomly initialised (``init_std``);
    ``ValueError`` naming ``spec.path`` for a layout that does not fit the shape."""
    if type(layout) not in _LAYOUTS:
        raise TypeError(f"{spec.path}: layout must be one of "
                        f"{[t.__name__ for t in _LAYOUTS]}, got {layout!r}")
    if isinstance(layout, DenseLayout):
        return dense_linear(spec, config, rngs)
    try:
        return _BUILDERS[type(layout)](layout, spec, config, rngs)
    except ValueError as e:
        if str(e).startswith(spec.path + ":"):
            raise
        raise ValueError(f"{spec.path}: {e}") from e


def linear_specs(config: LlamaConfig) -> dict[str, LinearSpec]:
    """``{path: LinearSpec}`` of every linear a :class:`Llama` with ``config`` builds."""
    specs = {}

    def record(spec: LinearSpec, cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.Module:
        specs[spec.path] = spec
        return dense_linear(spec, cfg, rngs)

    abstract_params(config, linear=record)
    return specs


def structured_factory(layouts: Mapping[str, Layout], config: LlamaConfig) -> LinearFactory:
    """A :data:`LinearFactory` building ``layouts[spec.path]`` (dense where no layout is given).

    Every layout is checked against ``config`` here, by building it abstractly: unknown paths,
    wrong types and misfits (rank, N:M, nnz, index range) raise at once. Shapes depend on the
    layouts only, so ``abstract_params(config, linear=factory)`` is the restore template."""
    specs = linear_specs(config)
    unknown = sorted(set(layouts) - set(specs))
    if unknown:
        raise ValueError(f"layouts name unknown linears {unknown}; known paths look like "
                         f"{next(iter(specs))!r}")
    layouts = dict(layouts)
    for path, layout in layouts.items():
        _check_layout(layout, specs[path], config)

    def factory(spec: LinearSpec, cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.Module:
        return build_linear(layouts.get(spec.path, DenseLayout()), spec, cfg, rngs)

    return factory


def _check_layout(layout: Layout, spec: LinearSpec, config: LlamaConfig) -> None:
    """Build ``layout`` for ``spec`` abstractly (no allocation), raising what building raises."""
    nnx.eval_shape(lambda: build_linear(layout, spec, config, nnx.Rngs(params=0)))


def layout_of(module: nnx.Module) -> Layout:
    """The shape-only layout of a linear (``SparseLayout`` without indices): the template to
    build a model into which :func:`insert_linears` puts ``module``'s arrays."""
    if isinstance(module, nnx.Linear):
        return DenseLayout()
    if isinstance(module, LowRankLinear):
        return LowRankLayout(module.rank)
    if isinstance(module, SparseLinear):
        return SparseLayout(int(module.values.shape[0]))
    if isinstance(module, NMLinear):
        return NMLayout(module.n, module.m)
    if isinstance(module, SumLinear):
        return SumLayout(tuple(layout_of(p) for p in module.parts))
    raise TypeError(f"no layout for a {type(module).__name__}")


def insert_linears(params: dict, modules: Mapping[str, nnx.Module]) -> dict:
    """``params`` (a pure dict of a model built with the modules' layouts) with the subtree at
    each path replaced by ``nnx.to_pure_dict(nnx.state(module))``; the input is not modified.
    ``ValueError`` if a path is missing or its leaves differ in structure, shape or dtype."""
    out = dict(params)
    for path, module in modules.items():
        new = nnx.to_pure_dict(nnx.state(module))
        node, keys = out, path.split("/")
        for key in keys[:-1]:
            key = int(key) if key.isdigit() and int(key) in node else key
            if key not in node:
                raise ValueError(f"params have no linear at {path!r}")
            node[key] = dict(node[key])
            node = node[key]
        old = node.get(keys[-1])
        if old is None or _signature(old) != _signature(new):
            raise ValueError(f"params at {path!r} do not have the layout of the given "
                             f"{type(module).__name__}; build the model with "
                             f"structured_factory({{{path!r}: layout_of(module)}}, config)")
        node[keys[-1]] = new
    return out


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)
