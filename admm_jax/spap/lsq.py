"""The statistics of a GLU MLP's hidden activations and the closed-form ridge refit of
``W_down``.

A SwiGLU MLP maps its input rows ``X ∈ ℝ^{N×d}`` to ``Y = H W_down`` with the hidden activations
``H = silu(X W_gate) ⊙ (X W_up) ∈ ℝ^{N×n}`` (kernels ``[in, out]``: neuron ``i`` is column ``i``
of ``W_gate``/``W_up`` and row ``i`` of ``W_down``). Keeping the neurons ``K`` and refitting the
down projection to the dense output is the ridge problem (SPAP, Hu & Yuan, 2025, the
``W``-subproblem; the paper's ``(HHᵀ + δI)⁻¹`` in its ``[out, in]`` layout)::

    W_K = argmin_W ½‖Y − H_K W‖²_F + (δ/2)‖W‖²_F = (H_Kᵀ H_K + δI)⁻¹ H_Kᵀ Y.

Both ``H_Kᵀ H_K`` and ``H_Kᵀ Y`` are sub-blocks of the Gram matrix ``A = HᵀH`` (with ``HᵀY =
A W_down`` for the dense MLP), so the refit needs only the summed statistic :func:`glu_stats`,
never the ``[N, n]`` activations. ``δ`` is given relative to ``mean(diag A)`` (the mean squared
activation norm), like SparseGPT's ``percdamp``, so one default fits every layer and calibration
size.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from admm_jax._checks import check_real
from admm_jax.pruning.capture import BlockActivations

Array = jax.Array

#: Default ridge ``δ / mean(diag HᵀH)``: SparseGPT's dampening (1 %), which keeps the fp32
#: Cholesky factorisation well conditioned (``cond ≤ 1 + n/0.01``) while biasing a well-posed
#: refit by about 1 % of a typical neuron's energy.
RIDGE = 0.01
#: Floor of the absolute ridge, so an all-zero Gram matrix (dead neurons, no data) still solves.
_RIDGE_FLOOR = 1e-8

_HI = lax.Precision.HIGHEST


class GLUStats(NamedTuple):
    """Sums over calibration tokens of a block's MLP hidden activations ``h_t = silu(g_t)·u_t``.

    Attributes:
        gram: ``A = Σ_t h_t h_tᵀ = HᵀH`` (fp32 ``[n, n]``).
        total: ``Σ_t h_t`` (fp32 ``[n]``); with the token count it gives the means of FLAP.
    """

    gram: Array
    total: Array


def glu_stats(acts: BlockActivations) -> GLUStats:
    """The :class:`GLUStats` of one batch (a sum-decomposable statistic for
    :func:`~admm_jax.pruning.capture.capture_blocks`)."""
    h = acts.mlp_hidden.reshape(-1, acts.mlp_hidden.shape[-1]).astype(jnp.float32)
    return GLUStats(jnp.matmul(h.T, h, precision=_HI), jnp.sum(h, axis=0))


def hidden(mlp: dict, x: Array) -> Array:
    """``H = silu(X W_gate) ⊙ (X W_up)`` ``[N, n]`` of a GLU MLP's parameters on rows ``x``."""
    gate = jnp.matmul(x, mlp["gate_proj"]["kernel"], precision=_HI)
    return jax.nn.silu(gate) * jnp.matmul(x, mlp["up_proj"]["kernel"], precision=_HI)


def glu_forward(mlp: dict, x: Array) -> Array:
    """``Y = H W_down`` ``[N, d]``: the MLP's output on rows ``x: [N, d]``."""
    return jnp.matmul(hidden(mlp, x), mlp["down_proj"]["kernel"], precision=_HI)


def ridge_value(gram: Array, ridge: float) -> Array:
    """The absolute ridge ``δ = ridge · mean(diag A)`` (at least ``1e-8``)."""
    return jnp.maximum(ridge * jnp.mean(jnp.diagonal(gram)), _RIDGE_FLOOR)


@jax.jit
def masked_solve(gram: Array, rhs: Array, keep: Array, diag: Array) -> Array:
    """``W`` with ``W_K = (A_KK + diag(diag_K))⁻¹ rhs_K`` and ``W_{¬K} = 0``, at static shapes:
    the system of the kept rows, padded with identity rows for the others (Cholesky solve).

    Args:
        gram: ``A`` ``[n, n]`` (symmetric positive semi-definite).
        rhs: ``[n, d]``.
        keep: bool ``[n]``.
        diag: ``[n]`` added to the diagonal (positive on ``K``: the ridge, plus SPAP's penalty).
    """
    both = keep[:, None] & keep[None, :]
    a = jnp.where(both, gram, 0.0) + jnp.diag(jnp.where(keep, diag, 1.0))
    b = jnp.where(keep[:, None], rhs, 0.0)
    factor = jax.scipy.linalg.cho_factor(a, lower=True)
    return jax.scipy.linalg.cho_solve(factor, b)


def refit_down(gram: Array, cross: Array, keep: Array, *, ridge: float = RIDGE,
               n_tokens: int | None = None, where: str = "the MLP") -> Array:
    """The closed-form down projection on the kept neurons (module docstring):
    ``W_K = (A_KK + δI)⁻¹ [HᵀY]_K``, zero rows elsewhere, ``δ = ridge · mean(diag A)``.

    Args:
        gram: ``A = HᵀH`` ``[n, n]``.
        cross: ``HᵀY`` ``[n, d]`` (``A W_down`` when ``Y`` is the dense output of ``H``).
        keep: bool ``[n]``, the kept neurons ``K``.
        ridge: ``δ`` relative to ``mean(diag A)``, ``> 0``.
        n_tokens: calibration tokens behind ``gram``; fewer than ``|K|`` makes the plain least
            squares rank-deficient, which is warned about (the ridge keeps it solvable).
        where: the layer, named in the warning.

    Returns:
        fp32 ``[n, d]``; always finite for finite inputs.

    Raises:
        ValueError: ``ridge`` is not positive, or the solve was not finite (non-finite inputs).
    """
    ridge = check_real("ridge", ridge, low=0.0, low_open=True)
    keep = jnp.asarray(keep, bool)
    kept = int(jnp.sum(keep))
    if n_tokens is not None and n_tokens < kept:
        warnings.warn(f"{where}: {n_tokens} calibration tokens for {kept} kept neurons — the "
                      f"least-squares refit of down_proj is underdetermined; it is regularised "
                      f"by the ridge δ = {ridge} · mean(diag HᵀH). Use more calibration tokens.",
                      RuntimeWarning, stacklevel=2)
    gram = jnp.asarray(gram, jnp.float32)
    delta = ridge_value(gram, ridge)
    w = masked_solve(gram, jnp.asarray(cross, jnp.float32), keep,
                     jnp.full(keep.shape, delta, jnp.float32))
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"{where}: the least-squares refit of down_proj is not finite "
                         "(non-finite calibration statistics?)")
    return w


_GLU = ("gate_proj", "up_proj", "down_proj")


def check_glu(mlp: Any, where: str = "the MLP") -> tuple[int, int]:
    """``(dim, n)`` of a dense, bias-free GLU MLP's parameters ``{"gate_proj": {"kernel":
    [dim, n]}, "up_proj": {...}, "down_proj": {"kernel": [n, dim]}}``.

    Raises:
        ValueError: ``mlp`` is not such a GLU MLP (another MLP, extra parameters such as
            adapters or biases, or inconsistent shapes); structured GLU pruning needs all three.
    """
    if not isinstance(mlp, dict) or set(mlp) != set(_GLU) \
            or any(not isinstance(mlp[k], dict) or set(mlp[k]) != {"kernel"} for k in _GLU):
        found = sorted(mlp) if isinstance(mlp, dict) else type(mlp).__name__
        raise ValueError(f"{where} is not a dense GLU MLP: structured GLU pruning needs exactly "
                         f"the bias-free kernels {list(_GLU)}, got {found}")
    shapes = [tuple(jnp.shape(mlp[k]["kernel"])) for k in _GLU]
    dim, n = shapes[0] if len(shapes[0]) == 2 else (0, 0)
    if n == 0 or shapes != [(dim, n), (dim, n), (n, dim)]:
        raise ValueError(f"{where}: GLU kernels must be gate/up [dim, n] and down [n, dim], got "
                         f"{dict(zip(_GLU, shapes))}")
    return dim, n
