"""admm_jax: ADMM-family methods for structured LLM weights as composable optax transformations."""

__version__ = "0.1.0"
