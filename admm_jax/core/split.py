"""A constraint set for the ADMM transform: :class:`Split`, its :class:`ProxContext`, and
:func:`blockwise`, which lifts a per-block prox to the list form the transform calls.

The transform calls ``split.prox`` once per stage 2 with every constrained block, so a split
that couples blocks (ELSA's global sparsity budget) and a split that treats each block alone
(SALAAD's L + S pass) have the same signature; the latter is written per block and lifted::

    split = Split(init=lambda x: (x, None), prox=blockwise(lambda v, state, ctx: (v, state)))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Array = jax.Array


class ProxContext(NamedTuple):
    """What the transform tells the prox about one block at a stage 2.

    Attributes:
        rho: ρ in effect for the block (f32 scalar, after schedule and balancing).
        step: the transform's update count at this stage 2 (int32 scalar).
        curvature: ``h``, the EMA of the squared raw gradient ``∇f(X)`` of the block (taken
            before the coupling term is added; a diagonal Hessian estimate) as of the previous
            step, if the split sets ``curvature_decay``, else ``None``.
    """

    rho: Array
    step: Array
    curvature: Array | None = None


BlockProx = Callable[[Array, Any, ProxContext], tuple[Array, Any]]
ListProx = Callable[[list[Array], list[Any], list[ProxContext]], tuple[list[Array], list[Any]]]


def _no_metrics(state: Any) -> dict[str, Array]:
    del state
    return {}


class Split(NamedTuple):
    """A constraint set ``C`` as pure functions over blocks (f32 ``[m, n]`` matrices).

    Attributes:
        init: ``x -> (z0, state)``: the initial auxiliary variable and split state of a block.
        prox: ``(vs, states, contexts) -> (zs, states)``: ``Z = prox_C(V)`` for ``V = X + U``
            over all constrained blocks at once, as lists in pytree-flatten order (use
            :func:`blockwise` for a prox that treats each block alone).
        metrics: ``state -> {name: f32 scalar}`` per-block diagnostics; the transform evaluates
            it after :attr:`init` and after every prox and keeps the result in
            ``BlockState.metrics``, so :func:`admm_jax.core.state.admm_metrics` needs only
            the optimizer state.
        curvature_decay: if set, the transform keeps per block ``h ← d·h + (1 − d)·g²`` with
            this decay ``d`` in ``[0, 1)`` and ``g`` the raw gradient (before the coupling term),
            and passes ``h`` as ``ProxContext.curvature``. The transform then needs the raw
            gradients: first in the chain for ``coupling="gradient"``, and ``base=`` for
            ``coupling="decoupled"`` (:func:`admm_jax.core.admm.admm`).
    """

    init: Callable[[Array], tuple[Array, Any]]
    prox: ListProx
    metrics: Callable[[Any], dict[str, Array]] = _no_metrics
    curvature_decay: float | None = None


def blockwise(prox: BlockProx) -> ListProx:
    """Lift a per-block prox ``(v, state, ctx) -> (z, state)`` to the list form of
    :attr:`Split.prox` (one call per block, in order)."""

    def list_prox(vs, states, contexts):
        zs, new_states = zip(*(prox(*args) for args in zip(vs, states, contexts)))
        return list(zs), list(new_states)

    return list_prox
