"""Model definitions and loaders."""

from admm_jax.models.llama import (
    PRESETS,
    Llama,
    LlamaConfig,
    abstract_params,
    count_params,
    forward,
    init_params,
)

__all__ = ["PRESETS", "Llama", "LlamaConfig", "abstract_params", "count_params", "forward",
           "init_params"]
