"""One-shot pruning: layer-by-layer activation capture and the magnitude, Wanda and SparseGPT
baselines.

* :func:`capture_blocks` walks the decoder blocks in order, sums a statistic of the inputs of
  every linear (:func:`gram_stats`, :func:`sqnorm_stats` or any sum-decomposable function of
  :class:`BlockActivations`) and lets a callback replace each block before the next one runs.
* :func:`prune` prunes every decoder-block linear of a model with ``method="magnitude"``,
  ``"wanda"`` or ``"sparsegpt"``; :func:`magnitude_prune`, :func:`wanda_prune` and
  :func:`sparsegpt_prune` prune one ``[in, out]`` kernel.
"""

from admm_jax.pruning.capture import (
    INPUT_SITES,
    LINEAR_INPUTS,
    BlockActivations,
    CapturedBlock,
    block_activations,
    capture_blocks,
    check_tokens,
    gram_stats,
    resolve_config,
    sqnorm_stats,
)
from admm_jax.pruning.oneshot import (
    METHODS,
    magnitude_prune,
    prune,
    sparsegpt_prune,
    wanda_prune,
)

__all__ = [
    "INPUT_SITES",
    "LINEAR_INPUTS",
    "METHODS",
    "BlockActivations",
    "CapturedBlock",
    "block_activations",
    "capture_blocks",
    "check_tokens",
    "gram_stats",
    "magnitude_prune",
    "prune",
    "resolve_config",
    "sparsegpt_prune",
    "sqnorm_stats",
    "wanda_prune",
]
