"""SALAAD: training-time sparse + low-rank induction (the L + S split and its I-controller),
compact surrogates and their allocation (Homomorphic Parameter Allocation or sensitivity-aware)
for elastic deployment."""

from admm_jax.salaad.controller import ControllerConfig, Rates, controller_step
from admm_jax.salaad.hpa import Allocation, allocate, deploy
from admm_jax.salaad.sensitivity import (
    BlockSensitivity,
    fisher_diagonal,
    removed_sensitivity,
    unit_sensitivity,
)
from admm_jax.salaad.split import SLRState, slr_admm, slr_components, slr_metrics, slr_split
from admm_jax.salaad.surrogate import (
    BlockSurrogate,
    block_surrogate,
    load_surrogate,
    reconstruct,
    save_surrogate,
)

__all__ = [
    "Allocation",
    "BlockSensitivity",
    "BlockSurrogate",
    "ControllerConfig",
    "Rates",
    "SLRState",
    "allocate",
    "block_surrogate",
    "controller_step",
    "deploy",
    "fisher_diagonal",
    "load_surrogate",
    "reconstruct",
    "removed_sensitivity",
    "save_surrogate",
    "slr_admm",
    "slr_components",
    "slr_metrics",
    "slr_split",
    "unit_sensitivity",
]
