"""Pure array math shared by the methods: proximal operators (:mod:`~admm_jax.ops.prox`),
sparsity projections (:mod:`~admm_jax.ops.projection`) and robust PCA
(:mod:`~admm_jax.ops.rpca`)."""
