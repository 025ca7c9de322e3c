"""One-shot pruning: a registry of methods, layer-by-layer activation capture, and the magnitude,
Wanda and SparseGPT baselines.

* :func:`capture_blocks` walks the decoder blocks in order, sums a statistic of the inputs of
  every linear (:func:`gram_stats`, :func:`sqnorm_stats` or any sum-decomposable function of
  :class:`BlockActivations`) and lets a callback replace each block before the next one runs.
* :func:`prune` prunes every decoder-block linear of a model with a method registered by
  :func:`register_pruner` (:data:`PRUNERS`): ``"magnitude"``, ``"wanda"``, ``"sparsegpt"``, or
  a later one (SPAP) that registers itself without any change here.
* :func:`magnitude_prune`, :func:`wanda_prune` and :func:`sparsegpt_prune` prune one ``[in, out]``
  kernel.

Kernels are ``[in, out]``, so a layer computes ``y = x W`` and the PyTorch ``[out, in]`` weight of
the papers is ``Wᵀ``: an output "row" of the papers is a column here, an input "column" a row.

=========  ===========================================  ==========================================
method     score                                        mask selection
=========  ===========================================  ==========================================
magnitude  ``|W_ij|``                                   per tensor; N:M; whole output channels;
                                                        ``b × b`` tiles per tensor
Wanda      ``|W_ij| · ‖X_i‖₂``                          top-k per output (column); N:M; ``b × b``
                                                        tiles per tensor
SparseGPT  ``W_ij² / [U]_ii²``, ``H⁻¹ = UᵀU``            per ``blocksize`` inputs with OBS updates;
                                                        N:M; ``b × b`` tiles per lazy batch
=========  ===========================================  ==========================================

Structures are the values of :mod:`admm_jax.ops.structures` (or their strings ``"unstructured"``,
``"2:4"``, ``"channel"``, ``"block16"``); ``N:M`` keeps ``N`` of every ``M`` consecutive inputs
of each output (``M`` must divide every input dimension) and fixes the sparsity at ``1 − N/M``;
``blockB`` prunes whole ``B × B`` tiles of the kernel (a kernel the tiles do not divide has
partial edge tiles) and its sparsity is a fraction of tiles, scored by the method's score summed
over each tile.
"""

from typing import Any

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
from admm_jax.pruning.registry import (
    PRUNERS,
    DataFreeBlock,
    Pruner,
    check_kernel_args,
    get_pruner,
    per_kernel,
    prune,
    register_pruner,
    registered_methods,
    supported_structure,
    unregister_pruner,
)

# Importing a method's module registers it.
from admm_jax.pruning.magnitude import magnitude_prune  # isort: skip
from admm_jax.pruning.wanda import wanda_prune  # isort: skip
from admm_jax.pruning.sparsegpt import sparsegpt_prune  # isort: skip


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registered method names, always current
        return registered_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "INPUT_SITES",
    "LINEAR_INPUTS",
    "METHODS",
    "PRUNERS",
    "BlockActivations",
    "CapturedBlock",
    "DataFreeBlock",
    "Pruner",
    "block_activations",
    "capture_blocks",
    "check_kernel_args",
    "check_tokens",
    "get_pruner",
    "gram_stats",
    "magnitude_prune",
    "per_kernel",
    "prune",
    "register_pruner",
    "registered_methods",
    "resolve_config",
    "sparsegpt_prune",
    "sqnorm_stats",
    "supported_structure",
    "unregister_pruner",
    "wanda_prune",
]
