"""Model definitions and loaders."""

from admm_jax.models.config import PRESETS, BlockShape, LlamaConfig
from admm_jax.models.llama import (
    LinearFactory,
    LinearSpec,
    Llama,
    abstract_params,
    count_params,
    dense_linear,
    forward,
    init_params,
    sown_inputs,
)

__all__ = ["PRESETS", "BlockShape", "LinearFactory", "LinearSpec", "Llama", "LlamaConfig",
           "abstract_params", "count_params", "dense_linear", "forward", "init_params",
           "sown_inputs"]
