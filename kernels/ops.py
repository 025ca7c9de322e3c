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
``interpret=True`` runs it on CPU), ``"densify"`` (scatter ``W`` into a dense ``n_in × n_out``
matrix for the two matmuls, the XLA SDDMM for the values: the dense *gradient* is still never
formed), and ``"auto"``: Pallas on GPU; XLA on TPU; on CPU ``"densify"`` when the matrix is denser
than :func:`densify_above` of the token count, else ``"xla"``.

The CPU rule exists because XLA's gather + segment-sum does far less useful work per second than
the dense matmul, while densifying costs one scatter of ``nnz`` values and an ``n_in × n_out``
write and read on top of the dense matmul. Which cost is larger depends on the token count (the
matmul amortises the scatter over the tokens) and on the cache: in a whole model the 210 layers'
weights do not stay in cache, so the dense temporary costs memory traffic that a single-layer
benchmark hides. :data:`CPU_DENSIFY_ABOVE` therefore holds crossovers measured on whole SmolLM2
forwards (``python -m experiments.bench_sparse --parts crossover --standins smollm2``,
``results/bench_sparse_crossover.json``). A compact model stores (and keeps resident) only what
it keeps and runs each layer in the form that is faster at its density; :func:`densify_rule`
overrides the rule.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax._checks import check_choice
from kernels import pallas, reference, xla
from kernels.sparse import SparseMatrix

Impl = Literal["auto", "xla", "pallas", "densify", "reference"]
_IMPLS = ("auto", "xla", "pallas", "densify", "reference")

#: ``(tokens, density)``: on CPU, above this density the densified product beats the XLA SpMM
#: at that many tokens (the whole-model crossovers of ``results/bench_sparse_crossover.json``);
#: :func:`densify_above` interpolates between the points in log-tokens.
CPU_DENSIFY_ABOVE: tuple[tuple[int, float], ...] = ((1, 0.387), (8, 0.387), (64, 0.141),
                                                      (512, 0.071))


_RULES: list[tuple[tuple[int, float], ...]] = []  # densify_rule overrides, innermost last


@contextlib.contextmanager
def densify_rule(table: tuple[tuple[int, float], ...]):
    """Within the block, ``impl="auto"`` on CPU uses ``table`` (``(tokens, density)`` points,
    as :data:`CPU_DENSIFY_ABOVE`) instead of the measured crossovers: ``((1, 0.0),)`` densifies
    every non-empty matrix, ``((1, 1.0),)`` none. The rule is read when a product is *traced*,
    so it applies to functions jitted (first called) inside the block."""
    if not table or any(t < 1 or not 0.0 <= d <= 1.0 for t, d in table):
        raise ValueError(f"table must be (tokens ≥ 1, density in [0, 1]) points, got {table!r}")
    _RULES.append(tuple(sorted(table)))
    try:
        yield
    finally:
        _RULES.pop()


def densify_above(tokens: int) -> float:
    """The CPU crossover density at ``tokens`` rows of ``x``: :data:`CPU_DENSIFY_ABOVE` (or the
    innermost :func:`densify_rule`) interpolated linearly in ``log(tokens)`` and held constant
    beyond its end points."""
    t, d = zip(*(_RULES[-1] if _RULES else CPU_DENSIFY_ABOVE))
    return float(np.interp(np.log(max(tokens, 1)), np.log(t), d))


def resolve_impl(impl: Impl = "auto", *, density: float | None = None,
                 tokens: int | None = None) -> str:
    """The implementation ``impl`` stands for on the current backend. ``"auto"`` is
    ``"pallas"`` on GPU and ``"xla"`` on TPU (Mosaic-TPU lacks the gathers the kernels use). On
    CPU it is ``"densify"`` if ``density > densify_above(tokens)`` and ``"xla"`` otherwise (or
    when ``density`` / ``tokens`` is not given); see the module doc."""
    check_choice("impl", impl, _IMPLS)
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu":
        return "pallas"
    if backend == "cpu" and density is not None and tokens is not None \
            and density > densify_above(tokens):
        return "densify"
    return "xla"


def _ops(impl: str, interpret: bool):
    """``(spmm, spmm_t, sddmm)`` of a concrete implementation."""
    if impl == "pallas":
        return tuple(functools.partial(f, interpret=interpret)
                     for f in (pallas.spmm, pallas.spmm_t, pallas.sddmm))
    if impl == "densify":
        return reference.spmm, reference.spmm_t, xla.sddmm
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
    (:func:`resolve_impl` of ``W``'s density and the number of rows of ``x``); ``interpret``
    runs the Pallas kernels in interpret mode."""
    if not isinstance(w, SparseMatrix):
        raise TypeError(f"w must be a SparseMatrix, got {type(w).__name__}")
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x must have shape [..., {w.shape[0]}] to multiply W of shape "
                         f"{w.shape}, got {x.shape}")
    lead = x.shape[:-1]
    impl = resolve_impl(impl, density=w.density, tokens=math.prod(lead))
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
