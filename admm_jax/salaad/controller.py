"""SALAAD's per-block integral controller for the ADMM penalty weights.

SALAAD regulates each block's structure with the nuclear-norm weight α (low-rank part) and the
ℓ1 weight β (sparse part). After every stage 2 an integral (I) controller moves them toward the
targets on effective-rank ratio Γ̂ and density Υ̂ (SALAAD §3, I-controller):

    α ← α + ρ · (Γ − Γ̂) · Δα          β ← β + ρ · (Υ − Υ̂) · Δβ

so a block whose low-rank part is too rich raises its singular-value threshold α/ρ by
(Γ − Γ̂)·Δα, and one whose sparse part is too dense raises its entry threshold β/ρ. With the
targets and steps fixed, ρ is the only knob. Weights are kept ≥ 0 (a negative weight would turn
the shrinkage of the prox into an expansion); this clamp is our choice, the paper does not say.

Defaults follow the official implementation: Γ̂ = 0.15, Υ̂ = 0.05, Δα = 0.2, Δβ = 0.002, α and β
start at 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """Targets and integral gains of the SALAAD controller."""

    target_rank_ratio: float = 0.15
    """Target effective-rank ratio Γ̂ of each block's low-rank part L, in (0, 1)."""
    target_density: float = 0.05
    """Target density Υ̂ (fraction of non-zeros) of each block's sparse part S, in (0, 1)."""
    alpha_step: float = 0.2
    """Integral gain Δα of the nuclear-norm weight: α ← α + ρ·(Γ − Γ̂)·Δα (≥ 0)."""
    beta_step: float = 0.002
    """Integral gain Δβ of the ℓ1 weight: β ← β + ρ·(Υ − Υ̂)·Δβ (≥ 0)."""

    def __post_init__(self):
        for name in ("target_rank_ratio", "target_density"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        for name in ("alpha_step", "beta_step"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")


def integral_step(value: Array, rho: Array, current: Array, target: float, step: float) -> Array:
    """One integral-action update ``max(0, value + ρ·(current − target)·step)``."""
    return jnp.maximum(value + rho * (current - target) * step, 0.0)


def i_controller(alpha: Array, beta: Array, rho: Array, rank_ratio: Array, density: Array,
                 config: ControllerConfig) -> tuple[Array, Array]:
    """Move ``(α, β)`` toward the targets given the block's current rank ratio and density."""
    return (integral_step(alpha, rho, rank_ratio, config.target_rank_ratio, config.alpha_step),
            integral_step(beta, rho, density, config.target_density, config.beta_step))
