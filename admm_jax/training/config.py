"""Settings of the training loop and of its default optimizer, as frozen dataclasses.

Every field carries a docstring (the ``--help`` text of the experiment CLIs) and is checked in
``__post_init__``, so a bad value fails when the config is built, not steps into a run.
"""

from __future__ import annotations

import dataclasses

from admm_jax._checks import check_int, check_real


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up and cosine decay, after global-norm clipping.

    The learning rate rises linearly from 0 to ``lr`` over ``warmup_steps`` and then follows a
    cosine to ``min_lr_ratio · lr`` at the last step of the run (:func:`lr_schedule`).
    """

    lr: float = 3e-3
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak lr (end of the cosine decay), in [0, 1]."""
    warmup_steps: int = 100
    """Steps of linear warm-up from 0 to the peak lr."""
    b1: float = 0.9
    """Adam first-moment decay β₁, in [0, 1)."""
    b2: float = 0.95
    """Adam second-moment decay β₂, in [0, 1)."""
    weight_decay: float = 0.1
    """Decoupled weight decay; applied to matrices only, never to 1-D params (norm scales)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value before the optimizer."""

    def __post_init__(self):
        check_real("OptimizerConfig.lr", self.lr, low=0.0, low_open=True)
        check_real("OptimizerConfig.min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        check_int("OptimizerConfig.warmup_steps", self.warmup_steps, minimum=0)
        for name in ("b1", "b2"):
            check_real(f"OptimizerConfig.{name}", getattr(self, name), low=0.0, high=1.0,
                       high_open=True)
        check_real("OptimizerConfig.weight_decay", self.weight_decay, low=0.0)
        check_real("OptimizerConfig.grad_clip", self.grad_clip, low=0.0, low_open=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop settings of :func:`admm_jax.training.train`: length, batches, seed and cadences.

    Everything except the cadences in :attr:`RESUMABLE_FIELDS` fixes the trajectory, so a run
    directory refuses to resume under a config that differs in any other field.
    """

    steps: int = 2000
    """Optimizer steps of the whole run (the learning-rate schedule ends here)."""
    batch_size: int = 32
    """Sequences per step (divisible by the number of devices on the data axis)."""
    seq_len: int = 128
    """Tokens per training sequence (at most the model's max_seq_len)."""
    seed: int = 0
    """Seed of the parameter init and of the batch order (batches are a function of seed, step)."""
    log_every: int = 10
    """Log loss, gradient norm, learning rate and throughput every this many steps."""
    eval_every: int = 250
    """Measure validation perplexity every this many steps (at a logging step) and at the end."""
    eval_batches: int = 16
    """Validation batches per evaluation; 0 = the whole validation split."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Number of most recent checkpoints kept on disk."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    """The default optimizer and its learning-rate schedule."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every",
                     "checkpoint_every", "keep_checkpoints"):
            check_int(f"TrainConfig.{name}", getattr(self, name), minimum=1)
        check_int("TrainConfig.seed", self.seed)
        check_int("TrainConfig.eval_batches", self.eval_batches, minimum=0)
        if not isinstance(self.optimizer, OptimizerConfig):
            raise TypeError(f"TrainConfig.optimizer must be an OptimizerConfig, "
                            f"got {type(self.optimizer).__name__}")

    #: fields that may change when resuming a run (they do not alter the trajectory; ``steps``
    #: does, through the learning-rate schedule)
    RESUMABLE_FIELDS = ("log_every", "eval_every", "eval_batches", "checkpoint_every",
                        "keep_checkpoints")
