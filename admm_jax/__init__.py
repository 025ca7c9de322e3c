"""admm_jax: ADMM-family methods for structured LLM weights as composable optax transformations.

The top level holds each method's main entry points; everything else lives in its namespace.

Shared layers (a method depends on these only, never on another method):

* :mod:`admm_jax.core` — the two-stage ADMM transform :func:`admm`, the constraint-set interface
  :class:`Split` / :class:`ProxContext` / :func:`blockwise`, ρ schedules (:func:`rho_ramp`), the
  state lookup :func:`admm_state`, :func:`admm_metrics`, :func:`state_memory`, low-precision
  state storage and leaf selection;
* :mod:`admm_jax.ops` — pure array math: proximal operators, sparsity projections, robust PCA,
  sparsity structures;
* :mod:`admm_jax.models` — the LLaMA model (per-layer widths, one linear factory, capture hooks)
  and pretrained loaders;
* :mod:`admm_jax.training` — train step (trainable subset, pluggable loss), loop, checkpoints,
  sharding;
* :mod:`admm_jax.data` — corpora, tokenizer, token caches, batches, calibration samples;
* :mod:`admm_jax.pruning` — the one-shot registry (:func:`prune`, :func:`register_pruner`) and the
  layer-by-layer capture.

Methods:

* :mod:`admm_jax.salaad` — :func:`slr_admm`, :class:`ControllerConfig`, :func:`slr_components`,
  and elastic deployment (:func:`allocate`, :func:`deploy`);
* :mod:`admm_jax.elsa` — :func:`elsa`, :func:`finalize`, :func:`masked_updates`;
* :mod:`admm_jax.spap` — structured GLU pruning registered as one-shot methods (``"spap"``,
  ``"mag-neuron"``, ``"flap"``, ``"wanda-neuron"``), :func:`global_prune`, :func:`shrink_mlp`;
* :mod:`admm_jax.pisa` — :func:`pisa`, :func:`sisa`, :func:`nsisa` (consensus ADMM over a
  client axis).
"""

from admm_jax.core import (
    ProxContext,
    Split,
    admm,
    admm_metrics,
    admm_state,
    blockwise,
    rho_ramp,
    state_memory,
)
from admm_jax.elsa import elsa, finalize, masked_updates
from admm_jax.pisa import nsisa, pisa, sisa
from admm_jax.pruning import prune, register_pruner
from admm_jax.salaad import ControllerConfig, allocate, deploy, slr_admm, slr_components
from admm_jax.spap import global_prune, shrink_mlp

__version__ = "0.1.0"

__all__ = [
    "ControllerConfig",
    "ProxContext",
    "Split",
    "admm",
    "admm_metrics",
    "admm_state",
    "allocate",
    "blockwise",
    "deploy",
    "elsa",
    "finalize",
    "global_prune",
    "masked_updates",
    "nsisa",
    "pisa",
    "prune",
    "register_pruner",
    "rho_ramp",
    "shrink_mlp",
    "sisa",
    "slr_admm",
    "slr_components",
    "state_memory",
]
