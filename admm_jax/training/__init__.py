"""Training: a train step with a trainable subset and a pluggable loss, the jitted loop for any
optax transformation, language-model losses, self-describing orbax checkpoints and data-parallel
sharding.

    config.py      TrainConfig (loop settings) with a nested OptimizerConfig
    optim.py       lr_schedule, relative_lr_schedule, adamw, default_optimizer
    step.py        make_train_step -> TrainStep(init, step); trainable_mask, split/merge_params
    loop.py        train (checkpoints, resume, logging)
    lm.py          next_token_loss, per_client_loss, perplexity
"""

from admm_jax.training.checkpoint import Checkpointer, LoadedModel, load_model, save_model
from admm_jax.training.config import OptimizerConfig, TrainConfig
from admm_jax.training.lm import make_nll_sum, next_token_loss, per_client_loss, perplexity
from admm_jax.training.loop import TrainResult, train
from admm_jax.training.optim import adamw, default_optimizer, lr_schedule, relative_lr_schedule
from admm_jax.training.step import (
    TrainStep,
    make_train_step,
    merge_params,
    split_params,
    trainable_mask,
)

__all__ = ["Checkpointer", "LoadedModel", "OptimizerConfig", "TrainConfig", "TrainResult",
           "TrainStep", "adamw", "default_optimizer", "load_model", "lr_schedule",
           "make_nll_sum", "make_train_step", "merge_params", "next_token_loss",
           "per_client_loss", "perplexity", "relative_lr_schedule", "save_model",
           "split_params", "train", "trainable_mask"]
