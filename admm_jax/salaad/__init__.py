"""SALAAD: training-time sparse + low-rank induction (the L + S split and its I-controller),
compact surrogates and Homomorphic Parameter Allocation for elastic deployment."""

from admm_jax.salaad.controller import ControllerConfig, i_controller
from admm_jax.salaad.hpa import Allocation, allocate, deploy
from admm_jax.salaad.split import SLRState, slr_admm, slr_components, slr_metrics, slr_split
from admm_jax.salaad.surrogate import (
    BlockSurrogate,
    block_surrogate,
    load_surrogate,
    reconstruct,
    save_surrogate,
)

__all__ = ["Allocation", "BlockSurrogate", "ControllerConfig", "SLRState", "allocate",
           "block_surrogate", "deploy", "i_controller", "load_surrogate", "reconstruct",
           "save_surrogate", "slr_admm", "slr_components", "slr_metrics", "slr_split"]
