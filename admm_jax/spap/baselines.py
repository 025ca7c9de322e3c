"""Neuron-level baselines for structured GLU pruning, each with the closed-form ``W_down`` refit
switchable on or off.

Scores per neuron ``i`` (row ``W_i`` of the ``[n, d]`` down kernel, hidden column ``H_i``, ``N``
calibration tokens), the ``k`` highest kept:

============  =======================================  ===================================
method        score                                    without refit
============  =======================================  ===================================
magnitude     ``‖W_i‖₂`` (the paper's column norm)      weights kept as they are
FLAP          ``Var_t(h_ti) · ‖W_i‖²₂``                 mean compensation (below)
Wanda         ``‖H_i‖₂ · Σ_j |W_ij|``                   weights kept as they are
============  =======================================  ===================================

Wanda's score is the per-neuron sum of ``|W_ij| · ‖X_i‖₂`` (the structured "Wanda-sp" of An et
al., 2024); FLAP's is its fluctuation metric (An et al., 2024, Eq. 5–6).

FLAP compensates a pruned channel's mean ``h̄_i`` by adding ``Σ_{i∉K} h̄_i W_i`` to the layer's
output bias; the model's projections have no bias. This implementation keeps the compensation
but folds it into the kept weights: the constant ``c = Σ_{i∉K} h̄_i W_i`` that a bias would add is
fitted, in least squares, by the kept activations::

    Δ = argmin ½‖1cᵀ − H_K Δ‖² + (δ/2)‖Δ‖² = (H_KᵀH_K + δI)⁻¹ (Σ_t h_{t,K}) cᵀ,   W_K ← W_K + Δ,

the closest a bias-free layer gets to FLAP's bias (exact when a kept neuron is constant). With the
refit on, every method solves ``W_K = (H_KᵀH_K + δI)⁻¹ H_Kᵀ Y`` instead, which contains the
compensation (the refit's target includes the removed mean).

References:
    An, Zhao, Yu, Tang, Wang, "Fluctuation-based Adaptive Structured Pruning for Large Language
    Models", AAAI 2024.
    Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
    ICLR 2024.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from admm_jax._checks import check_choice, check_int
from admm_jax.ops.projection import topk_mask
from admm_jax.spap.lsq import RIDGE, GLUStats, check_glu, refit_down
from admm_jax.spap.spap import PrunedMLP

Array = jax.Array
Score = Literal["magnitude", "flap", "wanda"]
SCORES: tuple[str, ...] = ("magnitude", "flap", "wanda")
_HI = lax.Precision.HIGHEST


def neuron_scores(score: Score, w_down: Array, stats: GLUStats, n_tokens: int) -> Array:
    """The per-neuron score ``[n]`` of a baseline (module table).

    Args:
        score: ``"magnitude"``, ``"flap"`` or ``"wanda"``.
        w_down: down kernel ``[n, d]``.
        stats: :class:`~admm_jax.spap.lsq.GLUStats` of the hidden activations.
        n_tokens: calibration tokens behind ``stats`` (FLAP's sample variance).
    """
    check_choice("score", score, SCORES)
    w = jnp.asarray(w_down, jnp.float32)
    sq = jnp.diagonal(stats.gram)
    if score == "magnitude":
        return jnp.linalg.norm(w, axis=1)
    if score == "wanda":
        return jnp.sqrt(sq) * jnp.sum(jnp.abs(w), axis=1)
    var = jnp.maximum(sq - jnp.square(stats.total) / n_tokens, 0.0) / max(n_tokens - 1, 1)
    return var * jnp.sum(jnp.square(w), axis=1)


def flap_compensation(w_down: Array, stats: GLUStats, n_tokens: int, keep: Array, *,
                      ridge: float = RIDGE, where: str = "the MLP") -> Array:
    """``W_d`` with FLAP's mean compensation folded into its kept rows (module docstring) and its
    pruned rows zeroed: ``W_K + (H_KᵀH_K + δI)⁻¹ (Σ_t h_{t,K}) cᵀ``, ``c = Σ_{i∉K} h̄_i W_i``."""
    w = jnp.asarray(w_down, jnp.float32)
    mean = stats.total / n_tokens
    c = jnp.matmul(jnp.where(keep, 0.0, mean), w, precision=_HI)               # [d]
    delta = refit_down(stats.gram, stats.total[:, None] * c[None, :], keep, ridge=ridge,
                       n_tokens=n_tokens, where=where)
    return jnp.where(keep[:, None], w, 0.0) + delta


def baseline_prune_mlp(mlp: dict, stats: GLUStats, n_tokens: int, n_keep: int, *,
                       score: Score, refit: bool = False, ridge: float = RIDGE,
                       where: str = "the MLP") -> PrunedMLP:
    """Prune a GLU MLP to its ``n_keep`` highest-scoring neurons (:func:`neuron_scores`), then,
    with ``refit``, solve ``W_K = (H_KᵀH_K + δI)⁻¹ H_Kᵀ Y``; without it, keep the weights
    (FLAP: with its mean compensation, :func:`flap_compensation`). Keeping every neuron returns
    ``mlp`` unchanged.

    Args:
        mlp: dense GLU parameters.
        stats: :class:`~admm_jax.spap.lsq.GLUStats` of its hidden activations.
        n_tokens: calibration tokens behind ``stats``.
        n_keep: neurons to keep, ``1 ≤ n_keep ≤ n``.
        score: ``"magnitude"``, ``"flap"`` or ``"wanda"``.
        refit: the closed-form least-squares refit of the down projection.
        ridge: ``δ / mean(diag HᵀH)`` of the refit and of FLAP's compensation.
        where: the layer, named in warnings and errors.
    """
    _, n = check_glu(mlp, where)
    n_keep = check_int("n_keep", n_keep, 1, n)
    check_int("n_tokens", n_tokens, 1)
    wd = jnp.asarray(mlp["down_proj"]["kernel"], jnp.float32)
    scores = neuron_scores(score, wd, stats, n_tokens)
    if n_keep == n:
        return PrunedMLP(mlp, jnp.ones(n, bool), scores)
    keep = topk_mask(scores, n_keep)
    if refit:
        down = refit_down(stats.gram, jnp.matmul(stats.gram, wd, precision=_HI), keep,
                          ridge=ridge, n_tokens=n_tokens, where=where)
    elif score == "flap":
        down = flap_compensation(wd, stats, n_tokens, keep, ridge=ridge, where=where)
    else:
        down = jnp.where(keep[:, None], wd, 0.0)
    pruned = {name: {"kernel": jnp.where(keep[None, :], mlp[name]["kernel"], 0.0)}
              for name in ("gate_proj", "up_proj")}
    return PrunedMLP({**pruned, "down_proj": {"kernel": down}}, keep, scores)
