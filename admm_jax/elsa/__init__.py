"""ELSA: surrogate-free ADMM pruning (the sparsity split), the final hard projection and masked
fine-tuning."""

from admm_jax.elsa.finalize import finalize, masked_updates
from admm_jax.elsa.split import (
    SparsityState,
    elsa,
    make_projection,
    sparsity_metrics,
    sparsity_split,
)

__all__ = ["SparsityState", "elsa", "finalize", "make_projection", "masked_updates",
           "sparsity_metrics", "sparsity_split"]
