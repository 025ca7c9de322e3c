"""SALAAD's per-block controller for the ADMM penalty weights: integral action, and an optional
proportional term on the rate of change.

SALAAD regulates each block's structure with the nuclear-norm weight α (low-rank part) and the
ℓ1 weight β (sparse part). After every stage 2 an integral (I) controller moves them toward the
targets on effective-rank ratio Γ̂ and density Υ̂ (SALAAD §3, I-controller):

    α ← α + ρ · (Γ − Γ̂) · Δα          β ← β + ρ · (Υ − Υ̂) · Δβ

so a block whose low-rank part is too rich raises its singular-value threshold α/ρ by
(Γ − Γ̂)·Δα, and one whose sparse part is too dense raises its entry threshold β/ρ. With the
targets and steps fixed, ρ is the only knob.

The official implementation also adds, once ``proportional_after`` updates have passed, a term on
the *increase* of each rate since the previous stage 2:

    α ← α + ρ · max(0, Γ_t − Γ_{t−1}) · Δα_P        β ← β + ρ · max(0, Υ_t − Υ_{t−1}) · Δβ_P

which raises a threshold while its rate is still growing (a damping of late regrowth; it never
lowers a weight). The paper's text describes the I-controller only, so the P gains default to 0
(off). "Updates" is read as the transform's update count (optimizer steps), the same clock as
the ρ schedule; this is our reading of the official code. Weights are kept ≥ 0 (a negative weight
would turn the shrinkage of the prox into an expansion); this clamp is our choice, the paper does
not say.

Defaults follow the official implementation: Γ̂ = 0.15, Υ̂ = 0.05, Δα = 0.2, Δβ = 0.002, α and β
start at 0, P term after 1,500 updates (when its gains are set).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """Targets and gains of the SALAAD controller."""

    target_rank_ratio: float = 0.15
    """Target effective-rank ratio Γ̂ of each block's low-rank part L, in (0, 1)."""
    target_density: float = 0.05
    """Target density Υ̂ (fraction of non-zeros) of each block's sparse part S, in (0, 1)."""
    alpha_step: float = 0.2
    """Integral gain Δα of the nuclear-norm weight: α ← α + ρ·(Γ − Γ̂)·Δα (≥ 0)."""
    beta_step: float = 0.002
    """Integral gain Δβ of the ℓ1 weight: β ← β + ρ·(Υ − Υ̂)·Δβ (≥ 0)."""
    alpha_p_step: float = 0.0
    """Proportional gain Δα_P on the rank ratio's increase (0 = off, the paper's controller)."""
    beta_p_step: float = 0.0
    """Proportional gain Δβ_P on the density's increase (0 = off, the paper's controller)."""
    proportional_after: int = 1500
    """Update count from which the P term acts (official: 1,500)."""

    def __post_init__(self):
        for name in ("target_rank_ratio", "target_density"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        for name in ("alpha_step", "beta_step", "alpha_p_step", "beta_p_step"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if isinstance(self.proportional_after, bool) or not isinstance(
                self.proportional_after, int) or self.proportional_after < 0:
            raise ValueError(f"proportional_after must be an int >= 0, got "
                             f"{self.proportional_after!r}")


class Rates(NamedTuple):
    """A block's measured structure: effective-rank ratio Γ of L and density Υ of S."""

    rank_ratio: Array
    density: Array


def controller_step(alpha: Array, beta: Array, rho: Array, rates: Rates, previous: Rates,
                    step: Array, config: ControllerConfig) -> tuple[Array, Array]:
    """Move ``(α, β)`` toward the targets (module docstring): integral action on
    ``rates − targets`` plus, from update ``proportional_after`` on, the P term on
    ``max(0, rates − previous)``; both weights clamped at 0."""
    proportional = jnp.asarray(step) >= config.proportional_after

    def one(value, current, last, target, i_gain, p_gain):
        p_term = jnp.where(proportional, jnp.maximum(current - last, 0.0) * p_gain, 0.0)
        return jnp.maximum(value + rho * ((current - target) * i_gain + p_term), 0.0)

    return (one(alpha, rates.rank_ratio, previous.rank_ratio, config.target_rank_ratio,
                config.alpha_step, config.alpha_p_step),
            one(beta, rates.density, previous.density, config.target_density,
                config.beta_step, config.beta_p_step))
