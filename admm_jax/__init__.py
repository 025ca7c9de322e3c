"""admm_jax: ADMM-family methods for structured LLM weights as composable optax transformations.

The public API, by concept:

* ADMM core: :func:`admm`, :class:`Split`, :func:`admm_metrics`, :func:`tanh_ramp`
* SALAAD: :func:`slr_admm`, :func:`slr_split`, :class:`ControllerConfig`, :func:`i_controller`,
  :func:`allocate` / :func:`deploy` (HPA), surrogates (:func:`block_surrogate`, ...)
* ELSA: :func:`elsa`, :func:`sparsity_split`, :func:`finalize`, :func:`masked_updates`;
  projections in :mod:`admm_jax.ops.projection`; ELSA-L storage :class:`StateStorage`,
  :func:`state_memory`
* proximal operators: :func:`soft_threshold`, :func:`svt`, :func:`svt_subspace`, ...
* one-shot pruning: :func:`prune` (magnitude, Wanda, SparseGPT) over the layer-by-layer capture
  :func:`capture_blocks`; more in :mod:`admm_jax.pruning`
* robust PCA: :func:`rpca`
* models, data, training and checkpoints: :mod:`admm_jax.models`, :mod:`admm_jax.data`,
  :mod:`admm_jax.training.loop`, :mod:`admm_jax.training.checkpoint`
"""

from admm_jax.core import (
    ADMMState,
    BlockState,
    Split,
    admm,
    admm_metrics,
    rho_ramp,
    state_memory,
    tanh_ramp,
)
from admm_jax.core.storage import StateStorage
from admm_jax.elsa import elsa, finalize, masked_updates, sparsity_split
from admm_jax.ops.prox import (
    LowRank,
    density,
    effective_rank,
    hard_rank_truncation,
    soft_threshold,
    svt,
    svt_subspace,
)
from admm_jax.ops.rpca import RPCAResult, rpca
from admm_jax.pruning import (
    capture_blocks,
    magnitude_prune,
    prune,
    sparsegpt_prune,
    wanda_prune,
)
from admm_jax.salaad.controller import ControllerConfig, i_controller
from admm_jax.salaad.hpa import Allocation, allocate, deploy
from admm_jax.salaad.split import SLRState, slr_admm, slr_components, slr_split
from admm_jax.salaad.surrogate import (
    BlockSurrogate,
    block_surrogate,
    load_surrogate,
    reconstruct,
    save_surrogate,
)

__version__ = "0.1.0"

__all__ = [
    "ADMMState",
    "Allocation",
    "BlockState",
    "BlockSurrogate",
    "ControllerConfig",
    "LowRank",
    "RPCAResult",
    "SLRState",
    "Split",
    "StateStorage",
    "admm",
    "admm_metrics",
    "allocate",
    "block_surrogate",
    "capture_blocks",
    "density",
    "deploy",
    "effective_rank",
    "elsa",
    "finalize",
    "hard_rank_truncation",
    "i_controller",
    "load_surrogate",
    "magnitude_prune",
    "masked_updates",
    "prune",
    "reconstruct",
    "rho_ramp",
    "rpca",
    "save_surrogate",
    "slr_admm",
    "slr_components",
    "slr_split",
    "soft_threshold",
    "sparsegpt_prune",
    "sparsity_split",
    "state_memory",
    "svt",
    "svt_subspace",
    "tanh_ramp",
    "wanda_prune",
]
