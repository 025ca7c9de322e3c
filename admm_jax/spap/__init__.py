"""SPAP: structured pruning of GLU MLPs by a penalty method and alternating minimisation, its
neuron-level baselines, global width allocation and physical shrinking.

* :func:`spap_prune_mlp` — SPAP on one MLP (:func:`penalty_select`, the closed-form
  :func:`refit_down`, :func:`alternating_minimisation`); :func:`baseline_prune_mlp` — column
  magnitude, FLAP and Wanda-sp scores, refit on or off.
* Importing this package registers ``"spap"``, ``"mag-neuron"``, ``"flap"`` and
  ``"wanda-neuron"`` with :func:`admm_jax.pruning.prune` (``structure="channel"``, uniform
  sparsity per layer); :func:`global_prune` prunes to one model-wide budget instead.
* :func:`shrink_mlp` turns the masks (:func:`kept_neurons`) into a smaller model with a
  per-layer ``mlp_dim``.

References:
    Hu & Yuan, "SPAP: Structured Pruning via Alternating Optimization and Penalty Methods",
    arXiv:2505.03373, 2025.
"""

from admm_jax.spap.allocation import GlobalPruned, allocate_widths, global_prune
from admm_jax.spap.baselines import SCORES, baseline_prune_mlp, flap_compensation, neuron_scores
from admm_jax.spap.lsq import (
    RIDGE,
    GLUStats,
    check_glu,
    glu_forward,
    glu_stats,
    hidden,
    masked_solve,
    refit_down,
)
from admm_jax.spap.methods import GLU_METHODS, GLUMethod, glu_masks, prune_glu_block
from admm_jax.spap.shrink import kept_neurons, shrink_mlp
from admm_jax.spap.spap import (
    SPAP_DEFAULTS,
    PrunedMLP,
    alternating_minimisation,
    check_spap_options,
    composite_score,
    penalty_select,
    relaxed_to_binary,
    spap_prune_mlp,
)

__all__ = [
    "GLU_METHODS",
    "RIDGE",
    "SCORES",
    "SPAP_DEFAULTS",
    "GLUMethod",
    "GLUStats",
    "GlobalPruned",
    "PrunedMLP",
    "allocate_widths",
    "alternating_minimisation",
    "baseline_prune_mlp",
    "check_glu",
    "check_spap_options",
    "composite_score",
    "flap_compensation",
    "global_prune",
    "glu_forward",
    "glu_masks",
    "glu_stats",
    "hidden",
    "kept_neurons",
    "masked_solve",
    "neuron_scores",
    "penalty_select",
    "prune_glu_block",
    "refit_down",
    "relaxed_to_binary",
    "shrink_mlp",
    "spap_prune_mlp",
]
