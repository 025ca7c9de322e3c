"""ρ schedules: multipliers ``t -> m(t)`` with ``m(0) = 1``, passed to ``admm(rho_schedule=...)``.

These are ELSA's λ schedules (constant / linear / cosine / exponential) and SALAAD's tanh ramp.
The transform evaluates the schedule only at stage 2, where it also rescales the scaled dual so
that ``Y = ρU`` is unchanged (:mod:`admm_jax.core.admm`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from admm_jax._checks import check_choice, check_int, check_real

Array = jax.Array
RampKind = Literal["constant", "linear", "cosine", "exponential", "tanh"]
Schedule = Callable[[Array], Array]


def rho_ramp(kind: RampKind, steps: int, factor: float) -> Schedule:
    """ρ multiplier ``t -> m(t)`` from 1 at ``t = 0`` toward ``factor``.

    With ``p = min(t / steps, 1)``:

    * ``"constant"``: ``1``;
    * ``"linear"``: ``1 + (factor − 1)·p``;
    * ``"cosine"``: ``1 + (factor − 1)·(1 − cos(πp))/2``;
    * ``"exponential"``: ``factor^p``;
    * ``"tanh"``: ``1 + (factor − 1)·tanh(t / steps)`` (SALAAD's ramp, approaches ``factor``).

    Args:
        kind: the ramp shape (above).
        steps: ramp length ≥ 1 (steps to reach ``factor``; the tanh ramp's time constant).
        factor: final multiplier > 0.

    Returns:
        ``t -> f32[]`` multiplier.
    """
    check_choice("rho ramp kind", kind, get_args(RampKind))
    check_int("steps", steps, 1)
    check_real("factor", factor, low=0.0, low_open=True)

    def multiplier(t):
        t = jnp.asarray(t, jnp.float32)
        p = jnp.minimum(t / steps, 1.0)
        if kind == "constant":
            return jnp.ones_like(t)
        if kind == "linear":
            return 1.0 + (factor - 1.0) * p
        if kind == "cosine":
            return 1.0 + (factor - 1.0) * 0.5 * (1.0 - jnp.cos(jnp.pi * p))
        if kind == "exponential":
            return jnp.asarray(factor, jnp.float32) ** p
        return 1.0 + (factor - 1.0) * jnp.tanh(t / steps)

    return multiplier


def tanh_ramp(steps: int, factor: float = 10.0) -> Schedule:
    """SALAAD's ρ ramp ``1 + (factor − 1)·tanh(t / steps)``: ``rho_ramp("tanh", steps, factor)``."""
    return rho_ramp("tanh", steps, factor)
