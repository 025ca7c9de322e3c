"""Training: the jitted loop for any optax transformation, language-model losses, self-describing
orbax checkpoints and data-parallel sharding."""

from admm_jax.training.checkpoint import Checkpointer, LoadedModel, load_model, save_model
from admm_jax.training.lm import make_nll_sum, next_token_loss, perplexity
from admm_jax.training.loop import (
    TrainConfig,
    TrainResult,
    adamw,
    default_optimizer,
    lr_schedule,
    make_train_step,
    train,
)

__all__ = ["Checkpointer", "LoadedModel", "TrainConfig", "TrainResult", "adamw",
           "default_optimizer", "load_model", "lr_schedule", "make_nll_sum", "make_train_step",
           "next_token_loss", "perplexity", "save_model", "train"]
