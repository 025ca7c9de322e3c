"""SALAAD: sparse + low-rank (SLR) induction as an ADMM split.

Each constrained block X is coupled to Z = L + S, a low-rank part L and a sparse part S. Stage 2
of :func:`admm_jax.core.admm.admm` with this split runs one alternating pass (J = 1) over

    S ← prox_{(β/ρ)‖·‖₁}(V − L)      (soft-threshold)
    L ← prox_{(α/ρ)‖·‖_*}(V − S)     (singular-value soft-threshold)

on V = X + U (the official code's order, S before L; ``order="low_rank_first"`` swaps it), then
measures the effective-rank ratio Γ of L (energy γ) and the density Υ of S and lets the
I-controller (:mod:`admm_jax.salaad.controller`) move α and β toward the targets.

Block-structured S (``sparse_structure=Block(b)`` / ``"blockB"``, opt-in): the kernel is
zero-padded to multiples of b and cut into b × b tiles (:mod:`admm_jax.ops.structures`), and the
entry soft-threshold becomes the group (tile) soft-threshold, the prox of the group lasso
τ·Σ_t w_t‖S_t‖_F (Yuan & Lin 2006) with τ = β/ρ and the weight w_t = √(b²) = b of a full tile:

    S_t = max(0, 1 − b·τ / ‖Y_t‖_F) · Y_t        (S_t = 0 where ‖Y_t‖_F = 0)

so a tile whose entries all have magnitude β/ρ is exactly at the threshold, as one entry is in
the ℓ1 case: β keeps its per-entry meaning and the controller's gains carry over. A partial edge
tile keeps the weight b (our choice: every tile is one unit, as in the block pruners). The
controller's density Υ is then the fraction of nonzero *tiles*, so the target density is a tile
fraction.

L is kept dense and S dense (static shapes under jit); the compact surrogate (factors of L,
values + indices of S) is exported once after training (:func:`slr_components`,
:mod:`admm_jax.salaad.surrogate`).

Two SVD back-ends: ``svd="exact"`` (``jnp.linalg.svd`` of every block, like the official code)
and ``svd="subspace"``, a randomized subspace iteration warm-started from the previous stage's
singular vectors with a rank cap of ``rank_cap_ratio·min(m, n)``
(:func:`admm_jax.ops.prox.svt_subspace`); it is matmul-only and works on sharded weights.

Under ``optax.inject_hyperparams`` only ``rho`` and ``decoupled_lr`` may be injected; pass
``interval``, ``energy``, ``rank_cap_ratio``, ``n_iter``, ``seed`` (and any callable ``rho`` or
``rho_schedule``) as ``static_args``.

The controller's rank ratio Γ is the effective rank of L's spectrum under the *energy* share
(``cumsum(σ²)/Σσ² ≥ γ``, :func:`admm_jax.ops.prox.effective_rank`), as the official controller
measures it; the σ share is a deployment-script convention only.

Initialisation (the official code's; the paper does not specify it): L₀ is the best rank-
⌊``init_rank_ratio``·min(m, n)⌋ approximation of X (``init_rank_ratio`` defaults to the target
Γ̂ = 0.15), S₀ = 0 and the dual U₀ = 0, α = β = 0. So Z₀ = L₀ ≠ X and the coupling pulls X toward
a low-rank matrix from the first step, and the first stage 2 (α = β = 0, no shrinkage) puts into
S only what L₀ misses of V − L₀ instead of learning a dense S from a full-rank L = X.
``init_rank_ratio=1.0`` gives L₀ = X up to rounding (no pull until the thresholds rise).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from admm_jax._checks import check_choice, check_int, check_real
from admm_jax.core.admm import Coupling, RhoScaling, RhoSpec, admm
from admm_jax.core.schedules import Schedule
from admm_jax.core.split import ProxContext, Split, blockwise
from admm_jax.core.state import block_states
from admm_jax.core.storage import StateStorage
from admm_jax.core.tree import SelectionSpec
from admm_jax.ops import prox
from admm_jax.ops.structures import (
    StructureSpec,
    expand_tiles,
    tile_scores,
)
from admm_jax.salaad.controller import ControllerConfig, Rates, controller_step
from admm_jax.salaad.surrogate import sparse_unit

Array = jax.Array
Order = Literal["sparse_first", "low_rank_first"]
SVD = Literal["exact", "subspace"]


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
    """Per-block SALAAD metrics: rank ratio, density, α, β (the split's ``metrics``)."""
    return {"rank_ratio": state.rank_ratio, "density": state.density, "alpha": state.alpha,
            "beta": state.beta}


def _rank_cap(shape: tuple[int, ...], rank_cap_ratio: float) -> int:
    return max(1, math.ceil(rank_cap_ratio * min(shape)))


def _init_rank(shape: tuple[int, ...], init_rank_ratio: float) -> int:
    return max(1, math.floor(init_rank_ratio * min(shape)))


def _init_state(x: Array, svd: SVD, rank_cap_ratio: float, init_rank_ratio: float, energy: float,
                seed: int) -> SLRState:
    """L₀ = best rank-⌊ratio·min(m, n)⌋ approximation of X, S₀ = 0, α = β = 0 (zero warm-start
    factors for the subspace back-end: its first stage 2 starts cold)."""
    factors = key = None
    if svd == "subspace":
        cap = _rank_cap(x.shape, rank_cap_ratio)
        factors = prox.LowRank(u=jnp.zeros((x.shape[0], cap), x.dtype),
                               s=jnp.zeros((cap,), x.dtype),
                               v=jnp.zeros((x.shape[1], cap), x.dtype))
        key = jax.random.key(seed)
    low_rank, lr0 = prox.hard_rank_truncation(x, _init_rank(x.shape, init_rank_ratio))
    zero = jnp.zeros((), jnp.float32)
    rank_ratio = prox.effective_rank_ratio(lr0.s, x.shape, energy)
    return SLRState(low_rank=low_rank, sparse=jnp.zeros_like(x), alpha=zero, beta=zero,
                    rank_ratio=rank_ratio, density=zero, factors=factors, key=key)


def tile_soft_threshold(y: Array, tau: Array, size: int) -> Array:
    """Group soft-threshold of ``y [in, out]`` over its ``size × size`` tiles (the kernel zero-
    padded to multiples of ``size``, :func:`admm_jax.ops.structures.tile_scores`):
    ``S_t = max(0, 1 − size·τ/‖Y_t‖_F) · Y_t``, the prox of ``τ·Σ_t size·‖S_t‖_F`` (module
    docstring; Yuan & Lin 2006). Tiles with ``‖Y_t‖_F ≤ size·τ`` become exactly 0."""
    norms = jnp.sqrt(tile_scores(jnp.square(y.astype(jnp.float32)), size))
    scale = jnp.maximum(0.0, 1.0 - size * tau / jnp.where(norms > 0, norms, 1.0))
    return (expand_tiles(scale, size, y.shape) * y).astype(y.dtype)


def tile_density(x: Array, size: int) -> Array:
    """Fraction of the ``size × size`` tiles of ``x [in, out]`` holding a nonzero entry."""
    return jnp.mean(tile_scores(jnp.abs(x), size) > 0).astype(jnp.float32)


def _low_rank_prox(y: Array, tau: Array, state: SLRState, svd: SVD, rank_cap_ratio: float,
                   n_iter: int) -> tuple[Array, prox.LowRank, Array | None]:
    """Singular-value soft-threshold of ``y`` at ``tau``: exact, or by warm-started subspace
    iteration (returns the matrix, its factors and the advanced PRNG key)."""
    if svd == "exact":
        return (*prox.svt(y, tau), state.key)
    key, sub = jax.random.split(state.key)
    warm = jnp.any(state.factors.s > 0)
    lr_matrix, factors = prox.svt_subspace(
        y, tau, jax.tree_util.tree_map(lambda a: jnp.where(warm, a, 0), state.factors),
        rank_cap=_rank_cap(y.shape, rank_cap_ratio), n_iter=n_iter, key=sub)
    return lr_matrix, factors, key


def slr_split(controller: ControllerConfig | None = None, *, energy: float = 0.999,
              order: Order = "sparse_first", svd: SVD = "exact", rank_cap_ratio: float = 0.25,
              n_iter: int = 2, seed: int = 0, init_rank_ratio: float | None = None,
              sparse_structure: StructureSpec = "unstructured") -> Split:
    """The L + S split with the I-controller (see module docstring).

    Args:
        controller: targets and gains (default :class:`ControllerConfig`: Γ̂ = 0.15, Υ̂ = 0.05,
            Δα = 0.2, Δβ = 0.002, no P term).
        energy: γ in ``(0, 1]`` of the effective rank (smallest r whose share of the spectral
            energy Σσ² reaches γ).
        order: ``"sparse_first"`` (official) or ``"low_rank_first"``.
        svd: ``"exact"`` or ``"subspace"`` (fast, rank-capped).
        rank_cap_ratio: rank cap of the subspace back-end as a fraction in ``(0, 1]`` of
            ``min(m, n)``.
        n_iter: subspace iterations per stage 2 (≥ 1).
        seed: PRNG seed of the subspace back-end.
        init_rank_ratio: rank of L₀ as a fraction in ``(0, 1]`` of ``min(m, n)`` (floored, at
            least 1); ``None`` = the controller's target rank ratio (official: 0.15).
        sparse_structure: ``"unstructured"`` (default: entry soft-threshold, density = entry
            fraction) or ``Block(b)`` / ``"blockB"``: the tile soft-threshold
            :func:`tile_soft_threshold` at ``β/ρ`` and density = fraction of nonzero tiles (the
            controller's target density is then a tile fraction; module docstring).

    Returns:
        The split; its per-block prox is one alternating pass (J = 1) followed by the
        controller step, and its metrics are :func:`slr_metrics`.
    """
    controller = ControllerConfig() if controller is None else controller
    check_real("energy", energy, low=0.0, low_open=True, high=1.0)
    check_choice("order", order, get_args(Order))
    check_choice("svd", svd, get_args(SVD))
    check_real("rank_cap_ratio", rank_cap_ratio, low=0.0, low_open=True, high=1.0)
    check_int("n_iter", n_iter, 1)
    check_int("seed", seed)
    init_rank_ratio = check_real("init_rank_ratio", controller.target_rank_ratio
                                 if init_rank_ratio is None else init_rank_ratio,
                                 low=0.0, low_open=True, high=1.0)
    unit = sparse_unit(sparse_structure)
    if unit > 1:
        def sparse_prox(y, tau):
            return tile_soft_threshold(y, tau, unit)

        def sparse_density(x):
            return tile_density(x, unit)
    else:
        sparse_prox, sparse_density = prox.soft_threshold, prox.density

    def init(x):
        state = _init_state(x, svd, rank_cap_ratio, init_rank_ratio, energy, seed)
        return state.low_rank, state

    def block_prox(v, state: SLRState, ctx: ProxContext):
        ell_tau, s_tau = state.alpha / ctx.rho, state.beta / ctx.rho
        if order == "sparse_first":
            sparse = sparse_prox(v - state.low_rank, s_tau)
            low_rank, factors, key = _low_rank_prox(v - sparse, ell_tau, state, svd,
                                                    rank_cap_ratio, n_iter)
        else:
            low_rank, factors, key = _low_rank_prox(v - state.sparse, ell_tau, state, svd,
                                                    rank_cap_ratio, n_iter)
            sparse = sparse_prox(v - low_rank, s_tau)
        rates = Rates(prox.effective_rank_ratio(factors.s, v.shape, energy),
                      sparse_density(sparse))
        alpha, beta = controller_step(state.alpha, state.beta, ctx.rho, rates,
                                      Rates(state.rank_ratio, state.density), ctx.step,
                                      controller)
        new_state = SLRState(low_rank=low_rank, sparse=sparse, alpha=alpha, beta=beta,
                             rank_ratio=rates.rank_ratio, density=rates.density,
                             factors=factors if svd == "subspace" else None, key=key)
        return low_rank + sparse, new_state

    return Split(init=init, prox=blockwise(block_prox), metrics=slr_metrics)


def slr_admm(rho: RhoSpec = 1e-6, *, interval: int = 2, mask: SelectionSpec = None,
             controller: ControllerConfig | None = None, energy: float = 0.999,
             order: Order = "sparse_first", svd: SVD = "exact", rank_cap_ratio: float = 0.25,
             n_iter: int = 2, seed: int = 0, init_rank_ratio: float | None = None,
             sparse_structure: StructureSpec = "unstructured", rho_scaling: RhoScaling = "none",
             n_layers: int | None = None, rho_schedule: Schedule | None = None,
             residual_balancing: tuple[float, float] | None = None,
             coupling: Coupling = "gradient", decoupled_lr: float | optax.Schedule = 1.0,
             state_storage: StateStorage | str | None = None, halt_on_nonfinite: bool = False,
             base: optax.GradientTransformation | None = None
             ) -> optax.GradientTransformationExtraArgs:
    """SALAAD as an optax transform: :func:`admm_jax.core.admm.admm` with :func:`slr_split`.

    Put it before the base optimizer; with ``coupling="decoupled"`` either wrap the base
    optimizer (``base=``) or chain it after (the split needs no curvature, so both work and
    give the same updates)::

        tx = optax.chain(optax.clip_by_global_norm(1.0), slr_admm(rho=1e-6), optax.adamw(8e-3))
        tx = optax.chain(optax.clip_by_global_norm(1.0),
                         slr_admm(rho=1e-2, coupling="decoupled", base=optax.adamw(8e-3)))

    Args:
        rho: penalty ρ (float, or ``(path, shape) -> float``; official defaults 1e-6 for attention
            and MLP blocks, 3e-7 for the embedding). With targets and gains fixed it is the only
            knob to set.
        interval: K, steps between stage-2 updates (official: 2).
        mask: constrained leaves (default: decoder-layer kernels and the token embedding).
        controller, energy, order, svd, rank_cap_ratio, n_iter, seed, init_rank_ratio,
            sparse_structure: see :func:`slr_split`.
        rho_scaling, n_layers, rho_schedule, residual_balancing, coupling, decoupled_lr,
            state_storage, halt_on_nonfinite, base: see :func:`admm_jax.core.admm.admm`
            (``rho_scaling="shape"`` with ``n_layers`` is SALAAD's 1/(n_layers·√(mn)) law,
            ``rho_schedule=sigmoid_ramp()`` its ρ ramp).
    """
    split = slr_split(controller, energy=energy, order=order, svd=svd,
                      rank_cap_ratio=rank_cap_ratio, n_iter=n_iter, seed=seed,
                      init_rank_ratio=init_rank_ratio, sparse_structure=sparse_structure)
    return admm(split, rho, interval=interval, mask=mask, rho_scaling=rho_scaling,
                n_layers=n_layers, rho_schedule=rho_schedule,
                residual_balancing=residual_balancing, coupling=coupling,
                decoupled_lr=decoupled_lr, state_storage=state_storage,
                halt_on_nonfinite=halt_on_nonfinite, base=base)


def slr_components(opt_state: Any) -> dict[str, tuple[Array, Array]]:
    """``{block path: (L, S)}`` from an optimizer state containing a SALAAD transform."""
    return {path: (b.split.low_rank, b.split.sparse)
            for path, b in block_states(opt_state).items()}
