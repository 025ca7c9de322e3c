"""The shared ADMM core: the two-stage splitting transform (:mod:`~admm_jax.core.admm`), the
constraint-set interface (:mod:`~admm_jax.core.split`), ρ schedules
(:mod:`~admm_jax.core.schedules`), the state with its lookup, metrics and memory
(:mod:`~admm_jax.core.state`), low-precision state storage and pytree leaf selection."""

from admm_jax.core.admm import admm
from admm_jax.core.schedules import rho_ramp, sigmoid_ramp
from admm_jax.core.split import ProxContext, Split, blockwise
from admm_jax.core.state import (
    ADMMState,
    BlockState,
    DecoupledState,
    admm_metrics,
    admm_state,
    block_states,
    state_memory,
)
from admm_jax.core.storage import StateStorage
from admm_jax.core.tree import DEFAULT_PATTERN, flat_paths, path_str, select, selected_paths

__all__ = ["DEFAULT_PATTERN", "ADMMState", "BlockState", "DecoupledState", "ProxContext", "Split",
           "StateStorage", "admm", "admm_metrics", "admm_state", "block_states", "blockwise",
           "flat_paths", "path_str", "rho_ramp", "select", "selected_paths", "sigmoid_ramp",
           "state_memory"]
