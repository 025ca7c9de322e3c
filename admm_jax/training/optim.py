"""The default optimizer of the loop: ``clip_by_global_norm → adamw`` with warm-up + cosine."""

from __future__ import annotations

import jax
import optax

from admm_jax.training.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up to ``lr`` then cosine decay to ``min_lr_ratio · lr`` at ``cfg.steps``."""
    opt = cfg.optimizer
    warmup = min(opt.warmup_steps, cfg.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=opt.lr * opt.min_lr_ratio)


def relative_lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """``η_t = lr_t / lr``: :func:`lr_schedule` as a fraction of its peak (warm-up, then cosine to
    ``min_lr_ratio``) — the clock of a decoupled ADMM pull that follows the learning rate, as
    decoupled weight decay does."""
    schedule = lr_schedule(cfg)
    return lambda count: schedule(count) / cfg.optimizer.lr


def adamw(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the schedule of :func:`lr_schedule`; no decay on 1-D params (norm scales)."""
    opt = cfg.optimizer
    return optax.adamw(lr_schedule(cfg), b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                       mask=lambda params: jax.tree_util.tree_map(lambda x: x.ndim > 1, params))


def default_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm → adamw``: the dense baseline."""
    return optax.chain(optax.clip_by_global_norm(cfg.optimizer.grad_clip), adamw(cfg))
