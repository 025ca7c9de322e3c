"""ρ schedules: multipliers ``t -> m(t)`` with ``m(0) ≈ 1``, passed to ``admm(rho_schedule=...)``.

These are ELSA's λ schedules (constant / linear / cosine / exponential, :func:`rho_ramp`) and
SALAAD's sigmoid ramp (:func:`sigmoid_ramp`). ``t`` is the transform's update count.
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
RampKind = Literal["constant", "linear", "cosine", "exponential"]
Schedule = Callable[[Array], Array]


def rho_ramp(kind: RampKind, steps: int, factor: float) -> Schedule:
    """ρ multiplier ``t -> m(t)`` from 1 at ``t = 0`` toward ``factor``.

    With ``p = min(t / steps, 1)``:

    * ``"constant"``: ``1``;
    * ``"linear"``: ``1 + (factor − 1)·p``;
    * ``"cosine"``: ``1 + (factor − 1)·(1 − cos(πp))/2``;
    * ``"exponential"``: ``factor^p``.

    Args:
        kind: the ramp shape (above).
        steps: ramp length ≥ 1 (steps to reach ``factor``).
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
        return jnp.asarray(factor, jnp.float32) ** p

    return multiplier


def sigmoid_ramp(center: float = 2000.0, width: float = 100.0, factor: float = 10.0) -> Schedule:
    """SALAAD's ρ ramp: a logistic step from ρ to ``factor``·ρ,

        m(t) = 1 + (factor − 1) · sigmoid((t − center) / width),

    so ``m(center) = (1 + factor)/2``, ``m → 1`` well before ``center`` (``m(0) − 1 =
    (factor − 1)·sigmoid(−center/width)``, 1.9e-8 at the defaults) and ``m → factor`` well after;
    the transition takes about ``±4·width`` steps. Defaults are the official implementation's
    (its code calls it a "tanh ramp"; the logistic is ``(1 + tanh(x/2))/2``, so the two differ
    only by the width convention).

    Args:
        center: step of the midpoint (≥ 0).
        width: steps per unit of the logistic's argument (> 0).
        factor: final multiplier > 0.

    Returns:
        ``t -> f32[]`` multiplier.
    """
    check_real("center", center, low=0.0)
    check_real("width", width, low=0.0, low_open=True)
    check_real("factor", factor, low=0.0, low_open=True)

    def multiplier(t):
        t = jnp.asarray(t, jnp.float32)
        return 1.0 + (factor - 1.0) * jax.nn.sigmoid((t - center) / width)

    return multiplier
