"""Compressor quality (RA-SpaRC §3.3): the metric M(C) of eq. (9) and the relative error, averaged
over stochastic gradients, and the three compressors at one shared budget (Table 4).

A sample ``g_ξ`` is one matrix or a pytree of matrices (one per layer); norms of a pytree are the
paper's ``‖X‖² = Σ_ℓ ‖X_ℓ‖²_F`` over its layers (§3.1), and the compressor is applied layer by
layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax._checks import check_choice, check_real
from admm_jax.sparc.compressors import (
    _as_matrices,
    low_rank_dense,
    reconstruct,
    sparc_budget,
    sparc_compress,
    sparse_dense,
    svd_compress,
    topk_compress,
)

Array = jax.Array
Compressor = Callable[[Array], Array]
Kind = Literal["sparc", "svd", "topk"]


class CompressorQuality(NamedTuple):
    """Averages over the samples ``g_ξ`` (f32 scalars).

    Attributes:
        metric: ``M(C) = E_ξ[‖C(g_ξ)‖² − (1 + μ)‖C(g_ξ) − g_ξ‖²]`` (eq. 9).
        rel_error: ``E_ξ[‖C(g_ξ) − g_ξ‖ / ‖g_ξ‖]``.
        rel_sq_error: ``E_ξ[‖C(g_ξ) − g_ξ‖² / ‖g_ξ‖²]`` (the error column of Table 4).
    """

    metric: Array
    rel_error: Array
    rel_sq_error: Array


def compressor(kind: Kind, *, r_max: int | None = None, density: float | None = None,
               n_iter: int = 1) -> Compressor:
    """The dense compressor ``X ↦ C(X)`` of ``kind`` at the budget ``p`` that
    :func:`~admm_jax.sparc.sparc_budget` gives ``X``'s shape from ``r_max`` or ``density``.

    * ``"sparc"``: ``C_p(X)`` (eq. 4, :func:`~admm_jax.sparc.sparc_compress`, ``n_iter``
      refinement steps);
    * ``"svd"``: ``SVD_{⌊p/(m+n)⌋}(X)``, the pure low-rank point of eq. (5);
    * ``"topk"``: ``Top_p(X)``, the pure sparse point of eq. (6).

    All three spend at most ``p`` parameters (a sparse entry costs 1, a rank-1 factor
    ``m + n``), so ``‖C_p(X) − X‖ ≤ min`` of the other two.
    """
    check_choice("kind", kind, ("sparc", "svd", "topk"))

    def apply(x: Array) -> Array:
        shape = jnp.shape(x)
        if len(shape) != 2:
            raise ValueError(f"a compressed matrix must have 2 dims, got shape {shape}")
        p = sparc_budget(shape, r_max=r_max, density=density)
        if kind == "sparc":
            return reconstruct(sparc_compress(x, p, n_iter=n_iter))
        if kind == "svd":
            return low_rank_dense(svd_compress(x, p // sum(shape)))
        return sparse_dense(topk_compress(x, p), shape)

    return apply


def _sample_terms(sample: Any, compress: Compressor) -> tuple[Array, Array, Array]:
    """``(‖C(g)‖², ‖C(g) − g‖², ‖g‖²)`` of one sample, summed over its layers."""
    kept = err = total = jnp.float32(0)
    for x in jax.tree.leaves(sample):
        x = _as_matrices("a gradient matrix", x, 2)
        c = jnp.asarray(compress(x), jnp.float32)
        if c.shape != x.shape:
            raise ValueError(f"compress must keep the shape {x.shape}, got {c.shape}")
        kept += jnp.sum(c**2)
        err += jnp.sum((c - x) ** 2)
        total += jnp.sum(x**2)
    return kept, err, total


def compressor_quality(samples: Array | Sequence[Any], compress: Compressor, *,
                       mu: float = 1.0) -> CompressorQuality:
    """Quality metric ``M(C)`` (eq. 9) and relative errors of ``compress``, averaged over
    stochastic gradients.

    ``M(C) = E_ξ[‖C(g_ξ)‖² − (1 + μ)‖C(g_ξ) − g_ξ‖²]`` is the left side of the descent
    condition (8) of Thm. 3.1 (higher is better; ``μ = 1`` is the paper's standard choice and
    the one of Table 4). The expectation is the sample mean.

    Args:
        samples: f32[B, m, n] (B gradients of one matrix) or a non-empty sequence of samples,
            each a matrix or a pytree of matrices (norms summed over its layers).
        compress: dense compressor of one matrix, e.g. :func:`compressor`.
        mu: μ > 0.

    Returns:
        :class:`CompressorQuality`. A zero sample counts relative error 0.
    """
    mu = check_real("mu", mu, low=0.0, low_open=True)
    if isinstance(samples, (jax.Array, np.ndarray)) and jnp.ndim(samples) != 3:
        raise ValueError(f"a stack of samples must be f[B, m, n], got shape {samples.shape}")
    if len(samples) == 0:
        raise ValueError("samples must be non-empty")
    terms = [_sample_terms(s, compress) for s in samples]
    kept, err, total = (jnp.stack(t) for t in zip(*terms))
    rel_sq = err / jnp.where(total > 0, total, 1.0)
    return CompressorQuality(metric=jnp.mean(kept - (1 + mu) * err),
                             rel_error=jnp.mean(jnp.sqrt(rel_sq)),
                             rel_sq_error=jnp.mean(rel_sq))
