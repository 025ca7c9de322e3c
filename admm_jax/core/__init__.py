"""The shared ADMM core: the two-stage splitting transform, its state and metrics, ρ schedules,
low-precision state storage and pytree leaf selection."""

from admm_jax.core.admm import (
    ADMMState,
    BlockState,
    Split,
    admm,
    admm_metrics,
    block_states,
    find_admm_states,
    rho_ramp,
    state_memory,
    tanh_ramp,
)
from admm_jax.core.storage import StateStorage
from admm_jax.core.tree import DEFAULT_PATTERN, path_str, select, selected_paths

__all__ = ["DEFAULT_PATTERN", "ADMMState", "BlockState", "Split", "StateStorage", "admm",
           "admm_metrics", "block_states", "find_admm_states", "path_str", "rho_ramp", "select",
           "selected_paths", "state_memory", "tanh_ramp"]
