"""LoRA + sparse adapters for Flax NNX: ``W = W0 + λ·A B + Mat(E)`` on a frozen base linear.

:mod:`admm_jax.adapters.modules` holds the layer (:class:`SparseLoRA`) and its Variable types
(:class:`AdapterParam` ⊃ :class:`LowRankParam`, :class:`SparseParam`: filter on them to train
the adapters only); :mod:`admm_jax.adapters.insert` chooses a LLaMA model's linears, inserts,
counts, merges and unmerges adapters.
"""

from admm_jax.adapters.insert import (
    ADAPTABLE,
    adapt_params,
    adapter_param_count,
    adapter_paths,
    adapters_of,
    insert_adapters,
    lora_inits,
    merge_adapters,
    unmerge_adapters,
)
from admm_jax.adapters.modules import (
    AdapterInit,
    AdapterParam,
    LowRankParam,
    SparseDelta,
    SparseLoRA,
    SparseParam,
    lora_init,
)

__all__ = [
    "ADAPTABLE",
    "AdapterInit",
    "AdapterParam",
    "LowRankParam",
    "SparseDelta",
    "SparseLoRA",
    "SparseParam",
    "adapt_params",
    "adapter_param_count",
    "adapter_paths",
    "adapters_of",
    "insert_adapters",
    "lora_init",
    "lora_inits",
    "merge_adapters",
    "unmerge_adapters",
]
