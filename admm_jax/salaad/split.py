"""SALAAD: sparse + low-rank (SLR) induction as an ADMM split.

Each constrained block X is coupled to Z = L + S, a low-rank part L and a sparse part S. Stage 2
of :func:`admm_jax.core.admm.admm` with this split runs one alternating pass (J = 1) over

    S ← prox_{(β/ρ)‖·‖₁}(V − L)      (soft-threshold)
    L ← prox_{(α/ρ)‖·‖_*}(V − S)     (singular-value soft-threshold)

on V = X + U (the official code's order, S before L; ``order="low_rank_first"`` swaps it), then
measures the effective-rank ratio Γ of L (energy γ) and the density Υ of S and lets the
I-controller (:mod:`admm_jax.salaad.controller`) move α and β toward the targets.

L is kept dense and S dense (static shapes under jit); the compact surrogate (factors of L,
values + indices of S) is exported once after training (:func:`slr_components`,
:mod:`admm_jax.salaad.surrogate`).

Two SVD back-ends: ``svd="exact"`` (``jnp.linalg.svd`` of every block, like the official code)
and ``svd="subspace"``, a randomized subspace iteration warm-started from the previous stage's
singular vectors with a rank cap of ``rank_cap_ratio·min(m, n)``
(:func:`admm_jax.ops.prox.svt_subspace`); it is matmul-only and works on sharded weights.

Initialisation (not specified by the paper; our choice): L = X, S = 0, α = β = 0, so Z = X and
the coupling starts at zero; the controller then raises the thresholds from zero.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admm_jax.core.admm import Split, admm, block_states, find_admm_states
from admm_jax.core.tree import SelectionSpec
from admm_jax.ops import prox
from admm_jax.salaad.controller import ControllerConfig, i_controller

Array = jax.Array


class SLRState(NamedTuple):
    """Per-block SALAAD state."""

    low_rank: Array  # L, f32[m, n]
    sparse: Array  # S, f32[m, n]
    alpha: Array  # nuclear-norm weight α
    beta: Array  # ℓ1 weight β
    rank_ratio: Array  # effective-rank ratio Γ of L at the last stage 2
    density: Array  # density Υ of S at the last stage 2
    factors: prox.LowRank | None  # last factors of L (subspace back-end warm start)
    key: Array | None  # PRNG key of the subspace back-end


def slr_metrics(state: SLRState) -> dict[str, Array]:
    """Per-block SALAAD metrics : rank ratio, density, α, β."""
    return {"rank_ratio": state.rank_ratio, "density": state.density, "alpha": state.alpha,
            "beta": state.beta}


def slr_split(controller: ControllerConfig | None = None, *, energy: float = 0.999,
              order: str = "sparse_first", svd: str = "exact", rank_cap_ratio: float = 0.25,
              n_iter: int = 2, seed: int = 0) -> Split:
    """The L + S split with the I-controller (see module docstring).

    Args:
        controller: targets and gains (default :class:`ControllerConfig`: Γ̂ = 0.15, Υ̂ = 0.05,
            Δα = 0.2, Δβ = 0.002).
        energy: γ of the effective rank (smallest r whose singular-value share reaches γ).
        order: ``"sparse_first"`` (official) or ``"low_rank_first"``.
        svd: ``"exact"`` or ``"subspace"`` (fast, rank-capped).
        rank_cap_ratio: rank cap of the subspace back-end as a fraction of ``min(m, n)``.
        n_iter: subspace iterations per stage 2.
        seed: PRNG seed of the subspace back-end.
    """
    controller = ControllerConfig() if controller is None else controller
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    if order not in ("sparse_first", "low_rank_first"):
        raise ValueError(f"order must be 'sparse_first' or 'low_rank_first', got {order!r}")
    if svd not in ("exact", "subspace"):
        raise ValueError(f"svd must be 'exact' or 'subspace', got {svd!r}")
    if not 0 < rank_cap_ratio <= 1:
        raise ValueError(f"rank_cap_ratio must be in (0, 1], got {rank_cap_ratio!r}")

    def rank_cap(shape) -> int:
        return max(1, math.ceil(rank_cap_ratio * min(shape)))

    def init(x):
        factors = key = None
        if svd == "subspace":
            cap = rank_cap(x.shape)
            factors = prox.LowRank(u=jnp.zeros((x.shape[0], cap), x.dtype),
                                   s=jnp.zeros((cap,), x.dtype),
                                   v=jnp.zeros((x.shape[1], cap), x.dtype))
            key = jax.random.key(seed)
        zero = jnp.zeros((), jnp.float32)
        state = SLRState(low_rank=x, sparse=jnp.zeros_like(x), alpha=zero, beta=zero,
                         rank_ratio=jnp.ones((), jnp.float32), density=zero, factors=factors,
                         key=key)
        return x, state

    def low_rank_prox(y, tau, state: SLRState):
        if svd == "exact":
            return (*prox.svt(y, tau), state.key)
        key, sub = jax.random.split(state.key)
        warm = jnp.any(state.factors.s > 0)
        lr_matrix, factors = prox.svt_subspace(
            y, tau, jax.tree_util.tree_map(lambda a: jnp.where(warm, a, 0), state.factors),
            rank_cap=rank_cap(y.shape), n_iter=n_iter, key=sub)
        return lr_matrix, factors, key

    def prox_fn(v, state: SLRState, rho, curvature):
        del curvature
        ell_tau, s_tau = state.alpha / rho, state.beta / rho
        if order == "sparse_first":
            sparse = prox.soft_threshold(v - state.low_rank, s_tau)
            low_rank, factors, key = low_rank_prox(v - sparse, ell_tau, state)
        else:
            low_rank, factors, key = low_rank_prox(v - state.sparse, ell_tau, state)
            sparse = prox.soft_threshold(v - low_rank, s_tau)
        rank_ratio = prox.effective_rank(factors.s, energy) / min(v.shape)
        dens = prox.density(sparse)
        alpha, beta = i_controller(state.alpha, state.beta, rho, rank_ratio, dens, controller)
        new_state = SLRState(low_rank=low_rank, sparse=sparse, alpha=alpha, beta=beta,
                             rank_ratio=rank_ratio.astype(jnp.float32), density=dens,
                             factors=factors if svd == "subspace" else None, key=key)
        return low_rank + sparse, new_state

    return Split(init=init, prox=prox_fn, metrics=slr_metrics)


def slr_admm(rho: float | Any = 1e-6, *, interval: int = 2, mask: SelectionSpec = None,
             controller: ControllerConfig | None = None, energy: float = 0.999,
             order: str = "sparse_first", svd: str = "exact", rank_cap_ratio: float = 0.25,
             n_iter: int = 2, seed: int = 0,
             **admm_kwargs) -> optax.GradientTransformationExtraArgs:
    """SALAAD as an optax transform: :func:`admm_jax.core.admm.admm` with :func:`slr_split`.

    Put it before the base optimizer::

        tx = optax.chain(optax.clip_by_global_norm(1.0), slr_admm(rho=1e-6), optax.adamw(8e-3))

    Args:
        rho: penalty ρ (float, or ``(path, shape) -> float``; official defaults 1e-6 for attention
            and MLP blocks, 3e-7 for the embedding). With targets and gains fixed it is the only
            knob to set.
        interval: K, steps between stage-2 updates (official: 2).
        mask: constrained leaves (default: decoder-layer kernels and the token embedding).
        controller, energy, order, svd, rank_cap_ratio, n_iter, seed: see :func:`slr_split`.
        **admm_kwargs: forwarded to :func:`admm_jax.core.admm.admm` (``rho_scaling``, ``n_layers``,
            ``rho_schedule``, ``coupling``, ``halt_on_nonfinite``, ...).
    """
    split = slr_split(controller, energy=energy, order=order, svd=svd,
                      rank_cap_ratio=rank_cap_ratio, n_iter=n_iter, seed=seed)
    return admm(split, rho, interval=interval, mask=mask, **admm_kwargs)


def slr_components(opt_state) -> dict[str, tuple[Array, Array]]:
    """``{block path: (L, S)}`` from an optimizer state containing a SALAAD transform."""
    states = find_admm_states(opt_state)
    if len(states) != 1:
        raise ValueError(f"expected one ADMM state in the optimizer state, found {len(states)}")
    return {path: (b.split.low_rank, b.split.sparse)
            for path, b in block_states(states[0]).items()}
