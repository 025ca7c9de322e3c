"""ELSA: surrogate-free ADMM pruning (the sparsity split), the final hard projection and masked
fine-tuning."""

from admm_jax.elsa.split import (
    SparsityState,
    elsa,
    finalize,
    make_projection,
    masked_updates,
    sparsity_metrics,
    sparsity_split,
)

__all__ = ["SparsityState", "elsa", "finalize", "make_projection", "masked_updates",
           "sparsity_metrics", "sparsity_split"]
