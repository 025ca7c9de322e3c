"""PISA / SISA / NSISA: preconditioned inexact stochastic consensus ADMM as optax optimizers.

The problem ``min_w Σ_i F_i(w)`` over ``m`` clients is split as ``min Σ_i F_i(w_i)`` s.t.
``w_i = w`` with the augmented Lagrangian ``Σ_i F_i(w_i) + ⟨π_i, w_i − w⟩ + σ_i/2 ‖w_i − w‖²``
(Zhou et al., 2025, §2.3). One iteration ``ℓ``, for every client ``i`` in parallel:

1. the gradient estimate at the global point: ``g_i = ∇F_i(w^ℓ; B_i)`` (optionally smoothed,
   ``ĝ_i = EMA(g_i)`` bias-corrected, the ``momentum`` option; ``ĝ_i = g_i`` without it);
2. the inexact local step (eq. (2.8)): ``F_i`` linearised at ``w^ℓ`` plus the preconditioned
   proximal term ``ρ/2 ⟨w_i − w^ℓ, Q_i (w_i − w^ℓ)⟩``, in closed form
   ``w_i = w^ℓ − Δ_i``, ``Δ_i = (σ_i I + ρ Q_i)^{-1} (ĝ_i + π_i)``
   (``Q_i`` from :mod:`admm_jax.pisa.preconditioners`);
3. the dual update (ascent on the Lagrangian): ``π_i ← π_i + σ_i (w_i − w^ℓ) = π_i − σ_i Δ_i``;
4. the global aggregation (the minimiser of the Lagrangian in ``w``):
   ``w^{ℓ+1} = Σ_i (σ_i w_i + π_i) / Σ_i σ_i`` — a sum over clients (``psum`` on a mesh).

The paper aggregates first and then steps the clients; an optax update receives the gradient
at the params it returned last, so here each update runs steps 2–4 and returns the updates that
put ``w^{ℓ+1}`` on every client row. The params the user holds are thus always the consensus
point broadcast over clients, and :func:`admm_jax.pisa.client_value_and_grad` (or
``admm_jax.training.per_client_loss``) on them gives exactly the gradients ``∇F_i(w^ℓ)`` of
step 1. Clients must start from one model (:func:`admm_jax.pisa.stack_clients`); with the
initial ``π = 0`` that model is the paper's ``w¹``. The local models ``w_i`` are not stored:
``w_i = w^ℓ + (π_i^{new} − π_i^{old})/σ_i``.

Identities the iteration implies (tested): stationarity of step 2 with step 3,
``ĝ_i + π_i^{old} = (σ_i I + ρQ_i)(π_i^{old} − π_i^{new})/σ_i``; aggregation,
``w^{ℓ+1} − w^ℓ = Σ_i (2π_i^{new} − π_i^{old}) / Σ_i σ_i``; at a fixed point ``Σ_i π_i = 0`` and
``π_i = −∇F_i(w*)``, so ``Σ_i ∇F_i(w*) = 0``: the global minimiser, not the average of the
clients' own minimisers.

How it moves (derived from steps 2–4, diagonal ``Q``): ``π_i ← (ρQ_i π_i − σ_i ĝ_i)/(σ_i + ρQ_i)``,
so ``−π_i`` is an exponential average of the client's gradients with rate ``σ_i/(σ_i + ρQ_i)``,
and ``w^{ℓ+1} − w^ℓ = Σ_i (2π_i^{new} − π_i^{old})/Σ_i σ_i``: the global model moves like
momentum SGD on ``Σ_i F_i`` with learning rate ``1/Σ_i σ_i`` (for ``Q = 0``:
``w ← w − (2ḡ^ℓ − ḡ^{ℓ−1})/σ``, ``ḡ`` the client mean), the preconditioner setting each
coordinate's momentum horizon. ``σ`` too small therefore diverges; an extra gradient EMA
(``momentum``) stacks a second integrator on the dual's and oscillates unless ``σ`` is
comparable to ``ρQ`` (so it is off by default).

The σ schedule: ``σ_i^ℓ = σ_i γ^{⌊ℓ/k₀⌋}`` (``sigma_growth`` γ ≥ 1 every ``sigma_interval`` k₀
steps). Since the global step scales as ``1/σ``, growing σ decays it geometrically, like a
learning-rate schedule; :func:`sigma_interval_for` picks k₀ by the paper's heuristic of matching
the cumulative decay of such a schedule. Too fast a growth freezes the model early.

References:
    Zhou, Wang, Luo, Zhu, Li. Preconditioned Inexact Stochastic ADMM for Deep Models (2025),
    arXiv:2502.10784, §2.3 (eq. (2.8): the linearised local step); §4 (SISA, NSISA);
    App. A.2 (choosing k₀).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from admm_jax._checks import check_int, check_real, is_traced
from admm_jax.pisa.clients import CLIENT_AXIS, check_clients, check_mesh, client_specs
from admm_jax.pisa.preconditioners import (
    Preconditioner,
    identity,
    orthogonalized,
    second_moment,
)

Array = jax.Array
Sigma = float | Sequence[float] | Array  # one σ for all clients, or one per client [m]


class ConsensusState(NamedTuple):
    """State of :func:`scale_by_pisa` (every leaf but ``count`` has the client axis)."""

    count: Array  # int32, updates done (the iteration ℓ)
    dual: Any  # π_i, float32, params-shaped [m, ...]
    momentum: Any  # EMA of the gradient (float32 [m, ...]), or EmptyState without momentum
    preconditioner: Any  # the preconditioner's state


def sigma_schedule(sigma: Sigma, growth: float = 1.0, interval: int = 1
                   ) -> Callable[[Array], Array]:
    """``count -> σ^ℓ = σ · γ^{⌊ℓ / k₀⌋}`` (float32, the shape of ``sigma``)."""

    def schedule(count):
        steps = jnp.floor_divide(count, interval).astype(jnp.float32)
        return jnp.asarray(sigma, jnp.float32) * jnp.asarray(growth, jnp.float32) ** steps

    return schedule


def sigma_interval_for(total_steps: int, growth: float, final_ratio: float) -> int:
    """k₀ such that σ grows by ``final_ratio`` over ``total_steps`` (App. A.2's heuristic).

    The global step scales like ``1/σ``; a learning-rate schedule that decays by a factor
    ``final_ratio`` over the run is matched when ``γ^{T/k₀} = final_ratio``, i.e.
    ``k₀ = T ln γ / ln final_ratio`` rounded to the nearest integer (at least 1).

    Args:
        total_steps: the run's length ``T``.
        growth: γ > 1.
        final_ratio: the total growth of σ (> 1), e.g. 10 for a 10× learning-rate decay.
    """
    total_steps = check_int("total_steps", total_steps, 1)
    growth = check_real("growth", growth, low=1.0, low_open=True)
    final_ratio = check_real("final_ratio", final_ratio, low=1.0, low_open=True)
    return max(1, round(total_steps * math.log(growth) / math.log(final_ratio)))


def _check_sigma(sigma: Sigma) -> None:
    if is_traced(sigma):
        return
    values = np.asarray(sigma, np.float64)
    if values.ndim > 1 or values.size == 0:
        raise ValueError(f"sigma must be a scalar or one value per client, got shape "
                         f"{values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"sigma must be positive and finite (every client's), got {sigma!r}")


def _client_sigma(sigma: Array, m: int) -> Array:
    """σ as one value per client ``[m]``, after checking a per-client σ has ``m`` entries."""
    if sigma.ndim == 1 and sigma.shape[0] != m:
        raise ValueError(f"sigma has {sigma.shape[0]} values but the params have {m} clients")
    return jnp.broadcast_to(sigma, (m,))


def _client_step(g, w, dual, momentum, pre_state, sigma, rho, b1, count, *, pre):
    """Steps 1–3 for one client (module docstring); returns ``σ w_i + π_i`` and the states."""
    g = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), g)
    if isinstance(momentum, optax.EmptyState):
        estimate = g
    else:
        momentum = jax.tree_util.tree_map(lambda mu, x: b1 * mu + (1.0 - b1) * x, momentum, g)
        correction = 1.0 - b1 ** (count + 1).astype(jnp.float32)
        estimate = jax.tree_util.tree_map(lambda mu: mu / correction, momentum)
    direction = jax.tree_util.tree_map(jnp.add, estimate, dual)
    delta, pre_state = pre.step(direction, g, pre_state, sigma, rho, count)
    dual = jax.tree_util.tree_map(lambda pi, dx: pi - sigma * dx, dual, delta)
    contribution = jax.tree_util.tree_map(
        lambda x, dx, pi: sigma * (x.astype(jnp.float32) - dx) + pi, w, delta, dual)
    return contribution, dual, momentum, pre_state


def _shard_update(grads, params, dual, momentum, pre_state, sigma, scalars, *, pre,
                  axis_name):
    """Steps 1–4 for the clients of one shard (all of them off a mesh): the per-client step
    under ``vmap``, then the aggregation as a sum over clients, ``psum`` across the mesh."""
    step = jax.vmap(functools.partial(_client_step, pre=pre),
                    in_axes=(0, 0, 0, 0, 0, 0, None, None, None))
    contribution, dual, momentum, pre_state = step(grads, params, dual, momentum, pre_state,
                                                   sigma, *scalars)
    total = (jax.tree_util.tree_map(lambda c: jnp.sum(c, axis=0), contribution),
             jnp.sum(sigma))
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    numerator, denominator = total
    updates = jax.tree_util.tree_map(
        lambda p, n: (n / denominator - p.astype(jnp.float32)).astype(p.dtype), params,
        numerator)
    return updates, dual, momentum, pre_state


def _consensus_update(grads, state: ConsensusState, params, *, pre, schedule, rho, momentum,
                      mesh, axis_name):
    """One update of :func:`scale_by_pisa`: checks, σ^ℓ, then :func:`_shard_update` on all
    clients, or under ``shard_map`` with the client axis on ``mesh[axis_name]``."""
    m = check_clients(params=params, grads=grads, dual=state.dual)
    sigma = _client_sigma(schedule(state.count), m)
    scalars = (jnp.asarray(rho, jnp.float32),
               jnp.asarray(0.0 if momentum is None else momentum, jnp.float32), state.count)
    args = (grads, params, state.dual, state.momentum, state.preconditioner, sigma)
    run = functools.partial(_shard_update, pre=pre,
                            axis_name=None if mesh is None else axis_name)
    if mesh is not None:
        check_mesh(m, mesh, axis_name)
        specs = client_specs(args, axis_name)
        run = jax.shard_map(run, mesh=mesh,
                            in_specs=(*specs, (PartitionSpec(),) * len(scalars)),
                            out_specs=(specs[1], *specs[2:5]))
    updates, dual, mom, pre_state = run(*args, scalars)
    return updates, ConsensusState(optax.safe_int32_increment(state.count), dual, mom,
                                   pre_state)


def scale_by_pisa(preconditioner: Preconditioner, sigma: Sigma, rho: float, *,
                  sigma_growth: float = 1.0, sigma_interval: int = 1,
                  momentum: float | None = None, mesh: Mesh | None = None,
                  axis_name: str = CLIENT_AXIS) -> optax.GradientTransformationExtraArgs:
    """PISA with any preconditioner: the consensus-ADMM update of the module docstring.

    Params, gradients and the state carry a leading client axis ``[m, ...]``; ``grads[i]`` is
    client ``i``'s gradient at ``params[i]`` (the consensus point). The updates put the next
    consensus point on every row. Arithmetic and state are float32; updates have the params'
    dtypes.

    Args:
        preconditioner: the ``Q_i`` (:func:`~admm_jax.pisa.identity`, ``second_moment``,
            ``orthogonalized``).
        sigma: the penalty σ_i > 0: one value, or one per client.
        rho: the proximal weight ρ > 0 (with ``Q`` normalised as in SISA, ``1/ρ`` is the
            learning rate of the local step).
        sigma_growth: γ ≥ 1, the factor σ grows by every ``sigma_interval`` steps.
        sigma_interval: k₀ ≥ 1 (static under ``inject_hyperparams``).
        momentum: EMA decay of the gradient estimate ``ĝ`` in ``[0, 1)``, or ``None`` for
            ``ĝ = g`` (static: it decides whether the state keeps a momentum).
        mesh: run the client axis split over ``mesh[axis_name]`` with ``shard_map``
            (aggregation by ``psum``); ``None``: all clients on one device under ``vmap``.
        axis_name: the mesh axis that carries the clients.

    Raises:
        ValueError: non-positive σ or ρ, ``sigma_growth < 1``, ``momentum`` outside [0, 1), a
            per-client σ, gradients or dual with a client count other than the params', or a
            client count the mesh axis does not divide.
    """
    _check_sigma(sigma)
    check_real("rho", rho, low=0.0, low_open=True, allow_traced=True)
    check_real("sigma_growth", sigma_growth, low=1.0, allow_traced=True)
    sigma_interval = check_int("sigma_interval", sigma_interval, 1)
    if momentum is not None:
        check_real("momentum", momentum, low=0.0, high=1.0, high_open=True, allow_traced=True)
    if mesh is not None:
        check_mesh(0, mesh, axis_name)  # the axis exists (client counts are checked in init)
    schedule = sigma_schedule(sigma, sigma_growth, sigma_interval)

    def init_fn(params):
        zeros = functools.partial(jax.tree_util.tree_map,
                                  lambda p: jnp.zeros(p.shape, jnp.float32))
        if jax.tree_util.tree_leaves(params):  # checks skipped for map_params' leafless probe
            m = check_clients(params=params)
            _client_sigma(jnp.asarray(sigma), m)
            if mesh is not None:
                check_mesh(m, mesh, axis_name)
        return ConsensusState(
            count=jnp.zeros([], jnp.int32), dual=zeros(params),
            momentum=optax.EmptyState() if momentum is None else zeros(params),
            preconditioner=preconditioner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("scale_by_pisa needs params (the consensus point) in update")
        return _consensus_update(updates, state, params, pre=preconditioner,
                                 schedule=schedule, rho=rho, momentum=momentum, mesh=mesh,
                                 axis_name=axis_name)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def pisa(sigma: Sigma, rho: float, *, sigma_growth: float = 1.0, sigma_interval: int = 1,
         momentum: float | None = None, mesh: Mesh | None = None,
         axis_name: str = CLIENT_AXIS) -> optax.GradientTransformationExtraArgs:
    """PISA with the identity preconditioner: ``Δ_i = (ĝ_i + π_i) / (σ_i + ρ)``.

    Arguments as in :func:`scale_by_pisa`.
    """
    return scale_by_pisa(identity(), sigma, rho, sigma_growth=sigma_growth,
                         sigma_interval=sigma_interval, momentum=momentum, mesh=mesh,
                         axis_name=axis_name)


def sisa(sigma: Sigma, rho: float, *, b2: float = 0.999, sigma_growth: float = 1.0,
         sigma_interval: int = 1, momentum: float | None = None, mesh: Mesh | None = None,
         axis_name: str = CLIENT_AXIS) -> optax.GradientTransformationExtraArgs:
    """SISA: PISA with the second-moment preconditioner ``Q_i = diag(√v̂_i)`` (§4),
    ``Δ_i = (ĝ_i + π_i) / (σ_i + ρ√v̂_i)``.

    Args:
        b2: second-moment EMA decay; the rest as in :func:`scale_by_pisa`.
    """
    return scale_by_pisa(second_moment(b2), sigma, rho, sigma_growth=sigma_growth,
                         sigma_interval=sigma_interval, momentum=momentum, mesh=mesh,
                         axis_name=axis_name)


def nsisa(sigma: Sigma, rho: float, *, b2: float = 0.999, ns_steps: int = 5,
          sigma_growth: float = 1.0, sigma_interval: int = 1, momentum: float | None = None,
          mesh: Mesh | None = None, axis_name: str = CLIENT_AXIS
          ) -> optax.GradientTransformationExtraArgs:
    """NSISA: Newton–Schulz soft orthogonalisation of the dual-corrected momentum on leaves
    that are matrices per client, SISA's step on the others
    (:func:`~admm_jax.pisa.orthogonalized`).

    Args:
        b2: second-moment decay of the non-matrix leaves.
        ns_steps: Newton–Schulz iterations (static under ``inject_hyperparams``).
        The rest as in :func:`scale_by_pisa` (``momentum`` off by default: the dual already
        is one, see the module docstring).
    """
    return scale_by_pisa(orthogonalized(b2, ns_steps), sigma, rho, sigma_growth=sigma_growth,
                         sigma_interval=sigma_interval, momentum=momentum, mesh=mesh,
                         axis_name=axis_name)
