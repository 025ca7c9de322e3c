"""``y = x @ W`` for a sparse ``W``, differentiable in ``x`` and in ``W.values``, by backend.

For ``x [..., n_in]`` (any batch/token axes, flattened to ``T``) and ``W ∈ R^{n_in × n_out}``
stored as a :class:`~kernels.sparse.SparseMatrix`, ``jax.custom_vjp`` wires

    forward   y         = x @ W                                  (SpMM)
    backward  ∂L/∂x     = dy @ Wᵀ                                (SpMM on the transposed order)
              ∂L/∂v[i]  = Σ_t dy[t, cols[i]] · x[t, rows[i]]     (SDDMM, only on the support)

so the dense ``n_in × n_out`` gradient ``xᵀ dy`` is never formed (Gale et al. 2020, "Sparse GPU
Kernels for Deep Learning"; the RoSA sparse adapter, Nikdan et al. 2024, trains its values the
same way). The indices receive no gradient.

Implementations (``impl``): ``"reference"`` (dense jnp, :mod:`kernels.reference`), ``"xla"``
(chunked gather + segment-sum, :mod:`kernels.xla`), ``"pallas"`` (:mod:`kernels.pallas`;
``interpret=True`` runs it on CPU), ``"auto"``: Pallas on GPU, XLA on CPU and TPU.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax

from admm_jax._checks import check_choice
from kernels import pallas, reference, xla
from kernels.sparse import SparseMatrix

Impl = Literal["auto", "xla", "pallas", "reference"]
_IMPLS = ("auto", "xla", "pallas", "reference")


def resolve_impl(impl: Impl = "auto") -> str:
    """The implementation ``impl`` stands for on the current backend: ``"auto"`` is
    ``"pallas"`` on GPU and ``"xla"`` elsewhere (Mosaic-TPU lacks the gathers the kernels use)."""
    check_choice("impl", impl, _IMPLS)
    if impl != "auto":
        return impl
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def _ops(impl: str, interpret: bool):
    """``(spmm, spmm_t, sddmm)`` of a concrete implementation."""
    if impl == "pallas":
        return tuple(functools.partial(f, interpret=interpret)
                     for f in (pallas.spmm, pallas.spmm_t, pallas.sddmm))
    module = xla if impl == "xla" else reference
    return module.spmm, module.spmm_t, module.sddmm


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, impl, interpret):
    return _ops(impl, interpret)[0](x, w)


def _matmul_fwd(x, w, impl, interpret):
    return _matmul(x, w, impl, interpret), (x, w)


def _matmul_bwd(impl, interpret, res, dy):
    x, w = res
    _, spmm_t, sddmm = _ops(impl, interpret)
    dx = spmm_t(dy, w).astype(x.dtype)
    dv = sddmm(x, dy, w).astype(w.values.dtype)
    return dx, SparseMatrix(values=dv, rows=None, cols=None, shape=w.shape)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def sparse_matmul(x: jax.Array, w: SparseMatrix, *, impl: Impl = "auto",
                  interpret: bool = False) -> jax.Array:
    """``y = x @ W`` for ``x [..., n_in]`` → ``[..., n_out]`` (dtype: that of ``x`` and
    ``W.values`` promoted, at least float32), differentiable in ``x`` and ``W.values`` with
    the SpMM / SDDMM backward of the module doc. ``impl`` picks the implementation
    (:func:`resolve_impl`); ``interpret`` runs the Pallas kernels in interpret mode."""
    if not isinstance(w, SparseMatrix):
        raise TypeError(f"w must be a SparseMatrix, got {type(w).__name__}")
    impl = resolve_impl(impl)
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x must have shape [..., {w.shape[0]}] to multiply W of shape "
                         f"{w.shape}, got {x.shape}")
    lead = x.shape[:-1]
    y = _matmul(x.reshape(-1, w.shape[0]), w, impl, bool(interpret))
    return y.reshape(*lead, w.shape[1])


spmm = sparse_matmul


def sddmm(x: jax.Array, dy: jax.Array, w: SparseMatrix, *, impl: Impl = "auto",
          interpret: bool = False) -> jax.Array:
    """``s[i] = Σ_t x[t, rows[i]] · dy[t, cols[i]]`` — the gradient of ``W.values`` for
    ``y = x @ W`` — with ``x [..., n_in]``, ``dy [..., n_out]`` sharing the batch axes."""
    impl = resolve_impl(impl)
    if x.shape[:-1] != dy.shape[:-1] or x.shape[-1:] != (w.shape[0],) or \
            dy.shape[-1:] != (w.shape[1],):
        raise ValueError(f"x [..., {w.shape[0]}] and dy [..., {w.shape[1]}] must share batch "
                         f"axes, got {x.shape} and {dy.shape}")
    return _ops(impl, interpret)[2](x.reshape(-1, w.shape[0]), dy.reshape(-1, w.shape[1]), w)
