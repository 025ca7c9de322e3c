"""Classical robust PCA: principal component pursuit by inexact augmented Lagrange multipliers.

Principal component pursuit (Candès, Li, Ma & Wright 2011, eq. 1.1)

    min_{L, S}  ‖L‖_* + λ‖S‖₁   s.t.  L + S = M,      λ = 1/√max(m, n) by default,

solved by the inexact ALM of Lin, Chen & Ma (2010, Alg. 5) with the update order (S before L),
dual initialisation and penalty schedule of the authors' MATLAB code (``‖M‖_∞ = max |M_ij|``):

    Y₀ = M / max(‖M‖₂, ‖M‖_∞/λ),   μ₀ = 1.25/‖M‖₂,   μ̄ = 10⁷·μ₀,   L₀ = 0
    S_{k+1} = prox_{(λ/μ_k)‖·‖₁}(M − L_k + Y_k/μ_k)          (soft-threshold)
    L_{k+1} = prox_{(1/μ_k)‖·‖_*}(M − S_{k+1} + Y_k/μ_k)     (singular-value soft-threshold)
    Y_{k+1} = Y_k + μ_k·(M − L_{k+1} − S_{k+1}),   μ_{k+1} = min(ρ·μ_k, μ̄)

until ``‖M − L − S‖_F / ‖M‖_F < tol`` (or ``max_iter``). The loop is one
``jax.lax.while_loop`` (one compile per shape). :func:`rpca_tree` runs it on every 2-D leaf of
a pytree (the post-hoc "vanilla + RPCA" baseline of SALAAD).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax._checks import check_choice, check_int, check_real, is_traced
from admm_jax.core.tree import path_str
from admm_jax.ops import prox

Array = jax.Array


class RPCAResult(NamedTuple):
    """Output of :func:`rpca`.

    Attributes:
        low_rank: L̂, f32[m, n].
        sparse: Ŝ, f32[m, n] (exact zeros off its support).
        n_iter: int32[], iterations run.
        converged: bool[], whether the residual fell below ``tol`` within ``max_iter``.
        residual: f32[], ``‖M − L̂ − Ŝ‖_F / ‖M‖_F`` at the last iteration.
    """

    low_rank: Array
    sparse: Array
    n_iter: Array
    converged: Array
    residual: Array


def _check_scalar(name: str, value, low: float, *, low_open: bool) -> None:
    """:func:`~admm_jax._checks.check_real` for an optional (``None``) hyperparameter that may
    also be a concrete 0-d array, or a tracer (unchecked)."""
    if value is None:
        return
    if isinstance(value, (jax.Array, np.ndarray)) and not is_traced(value) and value.ndim == 0:
        value = value.item()
    check_real(name, value, low=low, low_open=low_open, allow_traced=True)


def rpca(m: jax.typing.ArrayLike, *, lam: float | Array | None = None,
         mu: float | Array | None = None, rho: float | Array = 1.5,
         tol: float | Array | None = None, max_iter: int = 500,
         svd: Literal["exact", "subspace"] = "exact",
         rank_cap: int | None = None, n_iter: int = 2, key: Array | None = None) -> RPCAResult:
    """Robust PCA ``M = L + S`` by principal component pursuit, inexact ALM (module docstring).

    Args:
        m: M, f32[m, n] (computed in float32 or wider).
        lam: λ > 0; default ``1/√max(m, n)`` (Candès et al. 2011, Thm. 1.1).
        mu: initial penalty μ₀ > 0; default ``1.25/‖M‖₂`` (Lin et al. 2010).
        rho: growth factor ρ ≥ 1 of μ (capped at ``10⁷·μ₀``).
        tol: stop when ``‖M − L − S‖_F / ‖M‖_F < tol`` (> 0). Default
            ``max(1e-7, √min(m, n)·ε)``: 1e-7 (Lin et al.) in float64; in float32 the residual
            stalls at its rounding floor (≈ 7e-7 for 500 × 500), above 1e-7, so the default
            there is the attainable ``√min(m, n)·ε`` (2.7e-6 for 500 × 500).
        max_iter: iteration limit ≥ 1.
        svd: ``"exact"`` (:func:`admm_jax.ops.prox.svt`) or ``"subspace"``
            (:func:`admm_jax.ops.prox.svt_subspace` warm-started from the previous iterate's
            factors; needs ``rank_cap``, at least the rank of L, and ``key``).
        rank_cap: static rank cap of the subspace back-end, in ``[1, min(m, n)]``.
        n_iter: static subspace iterations per SVT of the subspace back-end (≥ 0).
        key: PRNG key of the subspace back-end.

    Returns:
        :class:`RPCAResult`.
    """
    m = jnp.asarray(m)
    if m.ndim != 2:
        raise ValueError(f"m must be a 2-D matrix, got shape {m.shape}")
    m = m.astype(jnp.promote_types(m.dtype, jnp.float32))
    for name, value in (("lam", lam), ("mu", mu), ("tol", tol)):
        _check_scalar(name, value, 0.0, low_open=True)
    _check_scalar("rho", rho, 1.0, low_open=False)
    check_int("max_iter", max_iter, 1)
    check_choice("svd", svd, ("exact", "subspace"))
    if svd == "subspace" and (rank_cap is None or key is None):
        raise ValueError("svd='subspace' needs rank_cap (an int in [1, min(m, n)]) and key")
    lam = 1.0 / math.sqrt(max(m.shape)) if lam is None else lam
    if tol is None:
        tol = max(1e-7, math.sqrt(min(m.shape)) * float(jnp.finfo(m.dtype).eps))
    return _rpca(m, lam, mu, rho, tol, max_iter, key, svd=svd, rank_cap=rank_cap, n_iter=n_iter)


@functools.partial(jax.jit, static_argnames=("svd", "rank_cap", "n_iter"))
def _rpca(m: Array, lam, mu, rho, tol, max_iter, key, *, svd: str, rank_cap: int | None,
          n_iter: int) -> RPCAResult:
    tiny = jnp.finfo(m.dtype).tiny
    norm_fro = jnp.maximum(jnp.linalg.norm(m), tiny)
    norm_two = jnp.maximum(jnp.linalg.norm(m, ord=2), tiny)
    mu0 = 1.25 / norm_two if mu is None else jnp.asarray(mu, m.dtype)
    mu_bar = 1e7 * mu0
    dual0 = m / jnp.maximum(norm_two, jnp.max(jnp.abs(m)) / lam)

    def low_rank_step(x, tau, factors, i):
        if svd == "exact":
            return prox.svt(x, tau)
        return prox.svt_subspace(x, tau, factors, rank_cap=rank_cap, n_iter=n_iter,
                                 key=jax.random.fold_in(key, i))

    def cond(carry):
        i, *_, residual = carry
        return (i < max_iter) & (residual >= tol)

    def body(carry):
        i, low_rank, _, dual, mu_k, factors, _ = carry
        sparse = prox.soft_threshold(m - low_rank + dual / mu_k, lam / mu_k)
        low_rank, new_factors = low_rank_step(m - sparse + dual / mu_k, 1 / mu_k, factors, i)
        gap = m - low_rank - sparse
        dual = dual + mu_k * gap
        return (i + 1, low_rank, sparse, dual, jnp.minimum(rho * mu_k, mu_bar),
                new_factors if svd == "subspace" else None, jnp.linalg.norm(gap) / norm_fro)

    factors0 = None
    if svd == "subspace":
        r, (rows, cols) = rank_cap, m.shape
        factors0 = prox.LowRank(u=jnp.zeros((rows, r), m.dtype), s=jnp.zeros((r,), m.dtype),
                                v=jnp.zeros((cols, r), m.dtype))
    zeros = jnp.zeros_like(m)
    init = (jnp.zeros((), jnp.int32), zeros, zeros, dual0, mu0, factors0,
            jnp.asarray(jnp.inf, m.dtype))
    i, low_rank, sparse, _, _, _, residual = jax.lax.while_loop(cond, body, init)
    return RPCAResult(low_rank=low_rank, sparse=sparse, n_iter=i, converged=residual < tol,
                      residual=residual)


def rpca_tree(tree: Any, *, key: Array | None = None, verbose: bool = True,
              **kwargs) -> Any:
    """:func:`rpca` on every 2-D leaf of ``tree`` (e.g. every weight matrix of a model).

    Args:
        tree: a pytree of arrays.
        key: PRNG key for ``svd="subspace"``; leaf ``i`` uses ``fold_in(key, i)``.
        verbose: print one progress line per 2-D leaf to stderr (path, shape, iterations,
            residual, density of Ŝ, seconds).
        **kwargs: forwarded to :func:`rpca`.

    Returns:
        A pytree with the structure of ``tree``: an :class:`RPCAResult` at every 2-D leaf and
        ``None`` at every other leaf.
    """
    total = sum(jnp.ndim(leaf) == 2 for leaf in jax.tree_util.tree_leaves(tree))
    done = 0

    def run(path, leaf):
        nonlocal done
        if jnp.ndim(leaf) != 2:
            return None
        start = time.perf_counter()
        leaf_key = None if key is None else jax.random.fold_in(key, done)
        result = jax.block_until_ready(rpca(leaf, key=leaf_key, **kwargs))
        done += 1
        if verbose:
            print(f"rpca [{done}/{total}] {path_str(path)} {tuple(leaf.shape)}: "
                  f"{int(result.n_iter)} it, residual {float(result.residual):.1e}, "
                  f"{'converged' if result.converged else 'NOT converged'}, "
                  f"density {float(prox.density(result.sparse)):.3f}, "
                  f"{time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        return result

    return jax.tree_util.tree_map_with_path(run, tree)
