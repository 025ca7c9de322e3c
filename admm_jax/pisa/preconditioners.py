"""Preconditioners ``Q_i`` of the PISA local step and the Newton–Schulz iteration of NSISA.

The local step of PISA (Zhou et al., 2025, §2.3, eq. (2.8)) linearises client ``i``'s loss at the
global point ``w`` and adds a preconditioned proximal term; its closed form moves the client by

    Δ_i = (σ_i I + ρ Q_i)^{-1} d_i,      d_i = ĝ_i + π_i,      w_i = w − Δ_i

(``ĝ_i`` the client's gradient estimate at ``w``, ``π_i`` its dual). A :class:`Preconditioner`
computes ``Δ_i`` for one client (leaves without the client axis; the optimizer vmaps it):

* :func:`identity` — ``Q = I`` (PISA as stated): ``Δ = d / (σ + ρ)``;
* :func:`second_moment` — ``Q = diag(√v̂)`` with ``v̂`` Adam's bias-corrected EMA of ``g²`` (SISA):
  ``Δ = d / (σ + ρ√v̂)``; ``σ > 0`` keeps the denominator positive, so no ``ε`` is needed;
* :func:`orthogonalized` — NSISA: on 2-D leaves the Newton–Schulz *soft orthogonalisation*
  ``Δ = (ddᵀ + τ²I)^{-1/2} d / ρ`` with ``τ = σ/ρ`` (see :func:`soft_orthogonalize`), on every
  other leaf the SISA step.

Why the NSISA form: with ``d = U S Vᵀ``, ``(ddᵀ + τ²I)^{-1/2} d / ρ = U diag(s / √(ρ²s² + σ²)) Vᵀ``
equals ``(σI + ρQ)^{-1} d`` for the positive semi-definite ``Q = ((ρ²ddᵀ + σ²I)^{1/2} − σI)/ρ``
(``0 ⪯ Q ⪯ (ddᵀ)^{1/2}``), so it *is* a PISA step and the method's identities hold. For
``σ ≪ ρ s`` it is Muon's orthogonalised step ``U Vᵀ / ρ`` (``1/ρ`` the learning rate); for
``σ ≫ ρ s`` it is the plain step ``d / σ``, which vanishes at consensus (``d → 0``), where a bare
``U Vᵀ`` never would. It is computed without an SVD: the polar factor of the augmented matrix
``[d | τI]`` is ``(ddᵀ + τ²I)^{-1/2} [d | τI]``, whose left block is the step.

References:
    Zhou, Wang, Luo, Zhu, Li. Preconditioned Inexact Stochastic ADMM for Deep Models (2025),
    arXiv:2502.10784, §2.3 (PISA), §4 (SISA, NSISA).
    Jordan et al. Muon: an optimizer for hidden layers (2024) — the quintic Newton–Schulz
    iteration and its coefficients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admm_jax._checks import check_int, check_real

Array = jax.Array

#: Muon's quintic coefficients ``(a, b, c)`` of ``p(s) = a s + b s³ + c s⁵``: the slope at zero
#: ``a`` is as large as possible while iterating ``p`` still keeps every singular value in
#: ``(0, 1]`` inside the band :data:`NS_BAND` (the iteration oscillates there instead of
#: converging to exactly 1; Muon finds that harmless).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
#: where iterating :data:`NS_COEFFS` settles singular values that started in ``[1e-3, 1]``
#: (computed by iterating ``p``; a value ``s`` needs about ``log(1/s)/log(a)`` steps to get there)
NS_BAND = (0.68, 1.14)


def newton_schulz(x: Array, steps: int = 5, eps: float = 1e-7) -> Array:
    """Approximate polar factor ``U Vᵀ`` of a matrix ``x = U S Vᵀ`` by Muon's quintic iteration.

    ``X₀ = x / (‖x‖_F + eps)`` (all singular values in ``(0, 1]``), then ``steps`` times
    ``X ← a X + (b XXᵀ + c (XXᵀ)²) X`` with ``(a, b, c) =`` :data:`NS_COEFFS`, which applies
    ``p(s) = a s + b s³ + c s⁵`` to every singular value and keeps the singular vectors. The
    Gram matrix is taken on the short side (a tall ``x`` is transposed and back).

    Args:
        x: a 2-D array (computed in float32).
        steps: iterations (5 as in Muon; ill-conditioned inputs need ≈ ``log(κ√r)/log a`` + 2).
        eps: guards the normalisation of an all-zero ``x`` (which maps to zero).

    Returns:
        ``U S' Vᵀ`` with every nonzero ``S'`` in :data:`NS_BAND` once converged; shape of ``x``.
    """
    if x.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D array, got shape {x.shape}")
    steps = check_int("steps", steps, 0)
    tall = x.shape[0] > x.shape[1]
    y = (x.T if tall else x).astype(jnp.float32)
    y = y / (jnp.linalg.norm(y) + eps)
    a, b, c = NS_COEFFS

    def iterate(_, y):
        gram = y @ y.T
        return a * y + (b * gram + c * gram @ gram) @ y

    y = jax.lax.fori_loop(0, steps, iterate, y)
    return y.T if tall else y


def soft_orthogonalize(d: Array, tau: Array | float, steps: int = 5) -> Array:
    """``(ddᵀ + τ²I)^{-1/2} d = U diag(s/√(s² + τ²)) Vᵀ`` by Newton–Schulz on ``[d | τI]``.

    The polar factor of ``A = [d | τI]`` (``d`` turned short-wide, ``r × k`` with ``r ≤ k``) is
    ``(AAᵀ)^{-1/2} A = (ddᵀ + τ²I)^{-1/2} [d | τI]``; its first ``k`` columns are the result, and
    ``f(ddᵀ) d = d f(dᵀd)`` makes the transposed case the same function. ``τ = 0`` gives
    :func:`newton_schulz` of ``d``; directions with ``s ≪ τ`` are scaled by ``≈ 1/τ``
    instead of being blown up to unit length. Accurate up to the band :data:`NS_BAND` of the
    iteration on the singular values ``√(s² + τ²)`` of ``A``.

    Args:
        d: a 2-D array.
        tau: the softening ``τ ≥ 0`` (scalar, may be traced).
        steps: Newton–Schulz iterations.
    """
    if d.ndim != 2:
        raise ValueError(f"soft_orthogonalize needs a 2-D array, got shape {d.shape}")
    tall = d.shape[0] > d.shape[1]
    short = (d.T if tall else d).astype(jnp.float32)
    r, k = short.shape
    augmented = jnp.concatenate([short, jnp.asarray(tau, jnp.float32) * jnp.eye(r)], axis=1)
    out = newton_schulz(augmented, steps)[:, :k]
    return out.T if tall else out


class Preconditioner(NamedTuple):
    """The ``Q_i`` of the PISA local step, for one client.

    Attributes:
        init: ``params [m, ...] -> state`` (leaves with the client axis; state leaves too).
        step: ``(d, g, state, sigma, rho, count) -> (Δ, state)`` for one client (no client
            axis): ``Δ = (σI + ρQ)^{-1} d`` with ``Q`` built from the raw gradient ``g`` and
            ``state``; ``count`` is the number of earlier updates (int32 scalar).
    """

    init: Callable[[Any], Any]
    step: Callable[..., tuple[Any, Any]]


def _zeros(leaf: Array) -> Array:
    return jnp.zeros(leaf.shape, jnp.float32)


def identity() -> Preconditioner:
    """``Q = I``: ``Δ = d / (σ + ρ)`` (PISA, eq. (2.8) with an identity preconditioner)."""

    def step(d, g, state, sigma, rho, count):
        return jax.tree_util.tree_map(lambda x: x / (sigma + rho), d), state

    return Preconditioner(lambda params: optax.EmptyState(), step)


def _second_moment_update(v: Array, g: Array, b2, count) -> tuple[Array, Array]:
    """``(v', √v̂)``: ``v' = b2 v + (1 − b2) g²``, ``v̂ = v' / (1 − b2^{count+1})``."""
    v = b2 * v + (1.0 - b2) * jnp.square(g.astype(jnp.float32))
    return v, jnp.sqrt(v / (1.0 - b2 ** (count + 1).astype(jnp.float32)))


def second_moment(b2: float = 0.999) -> Preconditioner:
    """``Q = diag(√v̂)``, ``v̂`` the bias-corrected EMA of the squared raw gradient (SISA, §4):
    ``Δ = d / (σ + ρ√v̂)`` — RMSProp's step with learning rate ``1/ρ`` and ``ε = σ/ρ``.

    Args:
        b2: EMA decay of the second moment, in ``[0, 1)``.
    """
    check_real("b2", b2, low=0.0, high=1.0, high_open=True, allow_traced=True)

    def step(d, g, v, sigma, rho, count):
        def leaf(d, g, v):
            v, root = _second_moment_update(v, g, b2, count)
            return d / (sigma + rho * root), v

        return _unzip(jax.tree_util.tree_map(leaf, d, g, v), d)

    return Preconditioner(lambda params: jax.tree_util.tree_map(_zeros, params), step)


def orthogonalized(b2: float = 0.999, ns_steps: int = 5) -> Preconditioner:
    """NSISA: Newton–Schulz soft orthogonalisation on matrices, SISA on every other leaf.

    A leaf that is 2-D per client (``[m, r, k]`` in the params) moves by
    ``Δ = soft_orthogonalize(d, σ/ρ) / ρ = (σI + ρQ)^{-1} d`` with the PSD ``Q`` of the module
    docstring; other leaves (biases, norms, scalars) by :func:`second_moment`'s step and keep
    its ``v`` (matrix leaves keep no state: ``optax.MaskedNode``). With the optimizer's
    ``momentum`` option, ``d`` is the dual-corrected momentum ``ĝ + π`` as in Muon.

    Args:
        b2: second-moment decay of the non-matrix leaves.
        ns_steps: Newton–Schulz iterations (Muon: 5).
    """
    check_real("b2", b2, low=0.0, high=1.0, high_open=True, allow_traced=True)
    ns_steps = check_int("ns_steps", ns_steps, 1)

    def init(params):
        return jax.tree_util.tree_map(
            lambda p: optax.MaskedNode() if p.ndim == 3 else _zeros(p), params)

    def step(d, g, v, sigma, rho, count):
        def leaf(d, g, v):
            if d.ndim == 2:
                return soft_orthogonalize(d, sigma / rho, ns_steps) / rho, v
            v, root = _second_moment_update(v, g, b2, count)
            return d / (sigma + rho * root), v

        return _unzip(jax.tree_util.tree_map(leaf, d, g, v), d)

    return Preconditioner(init, step)


def _unzip(pairs: Any, like: Any) -> tuple[Any, Any]:
    """Split a tree of ``(a, b)`` pairs at the leaves of ``like`` into two trees."""
    outer = jax.tree_util.tree_structure(like)
    items = outer.flatten_up_to(pairs)
    return outer.unflatten([a for a, _ in items]), outer.unflatten([b for _, b in items])
