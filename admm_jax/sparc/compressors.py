"""Gradient compressors of RA-SpaRC: SVD_r, Top_k and SpaRC (sparse plus low-rank).

A compressor maps ``X ∈ ℝ^{m×n}`` to a cheap structured approximation ``C(X)`` (Definition 1,
§3.1). SpaRC at a parameter budget ``p`` solves eq. (4)/(10)

    C_p(X) = argmin_{Y = L + S, (m+n)·rank(L) + ‖S‖₀ ≤ p} ‖Y − X‖²_F

approximately: Alg. 1 searches the rank ``r ∈ [0, r_max]``, ``r_max = ⌊p/(m+n)⌋``, giving the
remaining ``k_r = p − r(m+n)`` parameters to sparse entries; each candidate is scored by one
step of Alg. 2's alternating projection on ONE precomputed SVD of ``X`` (``L = SVD_r(X)`` as a
slice of it, ``S = Top_{k_r}(X − L)``).

Choices the paper leaves open, made here:

* **Costs.** A rank-1 factor costs ``m + n`` parameters and a sparse entry costs 1 (its value),
  as in eq. (4): the index of a sparse entry is fixed, not trained, and is not counted.
* **Endpoints.** ``r = 0`` is ``Top_p`` (eq. 6). At ``r = r_max`` the leftover
  ``p − r_max(m+n) < m + n`` goes to sparse entries of the residual, which can only lower the
  error of ``SVD_{r_max}`` (eq. 5). Both endpoints are always evaluated and the chosen rank is
  the argmin over every evaluated rank (ties: the smaller rank), so SpaRC is never worse than
  either pure compressor.
* **Search.** Alg. 1's bisection on the sign of ``loss(r+1) − loss(r)`` (which assumes the
  one-step error is unimodal in ``r``, App. C.2). The evaluated points are then checked for
  unimodality (:func:`is_unimodal`); if they are not, all ranks are scanned. The result records
  which happened and the error curve over the evaluated ranks.
* **Refinement.** The chosen ``(r, k_r)`` is refined with ``n_iter`` alternating projections
  (Alg. 1 line 19; default 1, the single step of §3.4). Each step can only lower the error:
  ``SVD_r(X − S)`` is the best rank-r fit of ``X − S`` and ``Top_k(X − L)`` the best k-sparse
  fit of ``X − L``.
* **Factors.** ``Σ`` is split evenly: ``u = U√Σ`` ``[m, r]``, ``v = √ΣVᵀ`` ``[r, n]``, the
  balanced form of eq. (12) (``λ = γ = 1``).
* **Ties in Top_k**: the lowest row-major flat index wins (``lax.top_k``).
* **Static shapes.** So that one compiled program serves any rank and a stack of layers can be
  vmapped, the SpaRC result is padded: ``r_max`` low-rank columns (those ``≥ rank`` are zero)
  and ``p`` sparse slots (those ``≥ nnz`` have value 0 and distinct, in-range indices: the next
  largest residual entries). :func:`exact_parts` trims them.

Input is computed in float32. Eager checks (shape, finiteness, budget) raise ``ValueError``;
under an enclosing ``jax.jit`` the finiteness check is skipped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from admm_jax._checks import check_choice, check_int, check_real, is_traced

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Search = Literal["bisect", "scan"]

_HIGHEST = lax.Precision.HIGHEST
UNIMODAL_TOL = 1e-5  # slack, in relative-error units, before a bump counts as a second mode


class LowRankFactors(NamedTuple):
    """``L = u @ v`` with ``Σ`` split evenly: ``u = U√Σ``: f32[..., m, r], ``v = √ΣVᵀ``:
    f32[..., r, n]."""

    u: Array
    v: Array


class SparseEntries(NamedTuple):
    """``S[rows[i], cols[i]] = values[i]``: ``values`` f32[..., k], ``rows``/``cols``
    int32[..., k], distinct positions."""

    values: Array
    rows: Array
    cols: Array


class SparcResult(NamedTuple):
    """SpaRC compression ``C_p(X) = L + S`` (padded to static shapes, see the module notes).

    Attributes:
        low_rank: factors of width ``r_max``; columns ``≥ rank`` are zero.
        sparse: ``p`` slots; slots ``≥ nnz`` have value 0.
        rank: int32 chosen rank ``r*``.
        nnz: int32 sparse entries ``k* = p − r*(m+n)``.
        rel_error: f32 ``‖X − L − S‖_F / ‖X‖_F`` (0 for ``X = 0``).
        unimodal: bool, whether the evaluated one-step errors were unimodal in ``r``.
        error_curve: f32[r_max + 1] one-step relative error per rank, NaN where not evaluated.
    """

    low_rank: LowRankFactors
    sparse: SparseEntries
    rank: Array
    nnz: Array
    rel_error: Array
    unimodal: Array
    error_curve: Array


# ---------------------------------------------------------------------------------------------
# validation and budgets


def _as_matrices(name: str, x: ArrayLike, ndim: int) -> Array:
    """``x`` as float32 with exactly ``ndim`` dims, all entries finite (checked when concrete)."""
    x = jnp.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {x.shape}")
    x = x.astype(jnp.float32)
    if not is_traced(x) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} must be finite, got NaN or inf entries")
    return x


def check_budget(shape: tuple[int, int], budget: int) -> int:
    """``budget`` as an int in ``[m + n, m·n]``: at least one rank-1 factor, at most dense."""
    m, n = shape
    try:
        return check_int("budget", budget, m + n, m * n)
    except ValueError:
        raise ValueError(f"budget must be in [m + n, m·n] = [{m + n}, {m * n}] for a {m}×{n} "
                         f"matrix (one rank-1 factor up to dense), got {budget}") from None


def sparc_budget(shape: tuple[int, int], *, r_max: int | None = None,
                 density: float | None = None) -> int:
    """The parameter budget ``p`` of §3.4 from exactly one of ``r_max`` or ``density``.

    ``p = r_max·(m + n)`` (a LoRA of rank ``r_max``), or ``p = round(density·m·n)`` (nearest
    integer, the ``s_ratio`` form). ``p`` must lie in ``[m + n, m·n]`` (:func:`check_budget`);
    ``density`` must lie in ``(0, 1]``.
    """
    if (r_max is None) == (density is None):
        raise ValueError("give exactly one of r_max or density")
    m, n = (check_int("shape", d, 1) for d in shape)
    if r_max is not None:
        p = check_int("r_max", r_max, 1) * (m + n)
    else:
        density = check_real("density", density, low=0.0, high=1.0, low_open=True)
        p = math.floor(density * m * n + 0.5)
    return check_budget((m, n), p)


# ---------------------------------------------------------------------------------------------
# SVD_r and Top_k


def _factors(u: Array, s: Array, vt: Array, rank, width: int) -> LowRankFactors:
    """Balanced factors of the first ``width`` triplets of an SVD, those ``≥ rank`` zeroed."""
    root = jnp.sqrt(jnp.where(jnp.arange(width) < rank, s[:width], 0.0))
    return LowRankFactors(u[:, :width] * root, root[:, None] * vt[:width])


def low_rank_dense(factors: LowRankFactors) -> Array:
    """The dense ``L = u @ v``: f32[..., m, n]."""
    return jnp.matmul(factors.u, factors.v, precision=_HIGHEST)


def sparse_dense(entries: SparseEntries, shape: tuple[int, int]) -> Array:
    """The dense ``S`` of shape ``shape`` (one matrix) with ``S[rows, cols] = values``."""
    return jnp.zeros(shape, entries.values.dtype).at[entries.rows, entries.cols].add(
        entries.values)


def _top_entries(x: Array, k: int, count) -> SparseEntries:
    """The ``k`` largest-``|x|`` entries of a matrix (ties: lowest flat index); slots ``≥ count``
    get value 0."""
    _, flat = lax.top_k(jnp.abs(x).ravel(), k)
    values = jnp.where(jnp.arange(k) < count, x.ravel()[flat], 0.0)
    rows, cols = jnp.divmod(flat.astype(jnp.int32), jnp.int32(x.shape[1]))
    return SparseEntries(values, rows, cols)


@functools.partial(jax.jit, static_argnums=1)
def _svd_jit(g: Array, rank: int) -> LowRankFactors:
    u, s, vt = jnp.linalg.svd(g, full_matrices=False)
    return _factors(u, s, vt, rank, rank)


def svd_compress(g: ArrayLike, rank: int) -> LowRankFactors:
    """``SVD_r(X)``, the best rank-``r`` approximation (Eckart–Young–Mirsky, §3.1).

    ``SVD_r(X) = U_r Σ_r V_rᵀ = argmin_{rank(L) ≤ r} ‖L − X‖_F`` with error
    ``‖SVD_r(X) − X‖²_F = Σ_{i>r} σ_i²``; a compressor with ``α = r / min(m, n)``.

    Args:
        g: f32[m, n].
        rank: static int in ``[1, min(m, n)]``.

    Returns:
        :class:`LowRankFactors` ``u = U_r√Σ_r`` [m, r], ``v = √Σ_r V_rᵀ`` [r, n].
    """
    g = _as_matrices("g", g, 2)
    return _svd_jit(g, check_int("rank", rank, 1, min(g.shape)))


@functools.partial(jax.jit, static_argnums=1)
def _topk_jit(g: Array, k: int) -> SparseEntries:
    return _top_entries(g, k, k)


def topk_compress(g: ArrayLike, k: int) -> SparseEntries:
    """``Top_k(X)``: the ``k`` entries of largest magnitude, the rest zero (§3.1).

    The best ``k``-sparse approximation, ``argmin_{‖S‖₀ ≤ k} ‖S − X‖_F``; a compressor with
    ``α = k / (mn)``. Exactly ``k`` distinct positions are returned, by decreasing ``|X|``;
    ties go to the lowest row-major index.

    Args:
        g: f32[m, n].
        k: static int in ``[1, m·n]``.

    Returns:
        :class:`SparseEntries` of length ``k``.
    """
    g = _as_matrices("g", g, 2)
    return _topk_jit(g, check_int("k", k, 1, g.size))


def reconstruct(result: SparcResult) -> Array:
    """The dense ``C_p(X) = L + S`` of one :class:`SparcResult` (``jax.vmap`` it for a
    stack)."""
    dense = low_rank_dense(result.low_rank)
    return dense + sparse_dense(result.sparse, dense.shape)


def exact_parts(result: SparcResult) -> tuple[LowRankFactors, SparseEntries]:
    """Trim the padding of one concrete :class:`SparcResult`: factors of width ``rank``
    (``u`` [m, rank], ``v`` [rank, n]) and exactly ``nnz`` sparse entries (not jittable:
    the shapes depend on the values)."""
    r, k = int(result.rank), int(result.nnz)
    u, v = result.low_rank
    return (LowRankFactors(u[:, :r], v[:r]),
            SparseEntries(*(a[:k] for a in result.sparse)))


# ---------------------------------------------------------------------------------------------
# Alg. 1: rank search


def is_unimodal(curve: ArrayLike, tol: float = UNIMODAL_TOL) -> Array:
    """Whether the evaluated points of an error curve over ``r`` are unimodal (one valley).

    ``curve[r]`` is the error at rank ``r``, NaN where not evaluated. The evaluated points
    ``e`` are unimodal (quasi-convex) iff ``e_j ≤ max(e_i, e_k)`` for all ``i < j < k``, i.e.
    iff no point exceeds both the smallest error to its left and the smallest to its right;
    an excess of at most ``tol`` is float noise, not a second mode. This is the assumption
    behind Alg. 1 (App. C.2); it can only be judged on the evaluated points.

    Returns:
        bool scalar (jittable).
    """
    e = jnp.asarray(curve, jnp.float32)
    e = jnp.where(jnp.isnan(e), jnp.inf, e)
    inf = jnp.full((1,), jnp.inf, e.dtype)
    left = jnp.concatenate([inf, lax.cummin(e)[:-1]])
    right = jnp.concatenate([lax.cummin(e, reverse=True)[1:], inf])
    return ~jnp.any(jnp.isfinite(e) & (e - jnp.maximum(left, right) > tol))


def _rel(err_sq: Array, norm: Array) -> Array:
    """``√err² / ‖X‖_F``, with 0 for ``X = 0``."""
    return jnp.sqrt(err_sq) / jnp.where(norm > 0, norm, 1.0)


def _sq_norm(x: Array) -> Array:
    return jnp.sum(jnp.square(x))


def bisection_curve(loss: Callable[[Array], Array], r_max: int) -> Array:
    """Alg. 1 lines 3–16 plus both endpoints: ``f32[r_max + 1]``, ``loss(r)`` at the ranks the
    bisection visits and NaN elsewhere (traceable; ``loss`` maps an int32 rank to a scalar).

    The bisection keeps ``[left, right]`` and moves toward the lower of ``loss(mid)`` and
    ``loss(mid + 1)``, which finds the minimum of a unimodal curve in ``O(log r_max)``
    evaluations (App. C.2); :func:`is_unimodal` judges the visited points."""
    curve = jnp.full((r_max + 1,), jnp.nan, jnp.float32)
    curve = curve.at[0].set(loss(0)).at[r_max].set(loss(r_max))

    def body(state):
        left, right, curve = state
        m1 = left + (right - left) // 2
        l1, l2 = loss(m1), loss(m1 + 1)
        curve = curve.at[m1].set(l1).at[m1 + 1].set(l2)
        lower = l1 < l2
        return jnp.where(lower, left, m1 + 1), jnp.where(lower, m1, right), curve

    start = (jnp.int32(0), jnp.int32(r_max), curve)
    return lax.while_loop(lambda s: s[0] < s[1], body, start)[2]


def _search(loss, r_max: int, scan_all: bool) -> tuple[Array, Array]:
    """``(curve, unimodal)``: the bisection, replaced by the full scan over ``[0, r_max]``
    when its points are not unimodal (or always, with ``scan_all``)."""
    def scan(_):
        return lax.map(loss, jnp.arange(r_max + 1, dtype=jnp.int32))

    if scan_all:
        curve = scan(None)
        return curve, is_unimodal(curve)
    curve = bisection_curve(loss, r_max)
    unimodal = is_unimodal(curve)
    return lax.cond(unimodal, lambda c: c, scan, curve), unimodal


def _sparc_single(g: Array, p: int, n_iter: int, scan_all: bool) -> SparcResult:
    """SpaRC of one matrix (Alg. 1 with Alg. 2), traceable for ``jax.vmap``."""
    m, n = g.shape
    r_max = p // (m + n)
    svd = jnp.linalg.svd(g, full_matrices=False)
    norm = jnp.sqrt(_sq_norm(g))

    def project(r, svd):
        """Alg. 2, one step: ``L = SVD_r`` from ``svd``, ``S = Top_{p − r(m+n)}(g − L)``."""
        factors = _factors(*svd, r, r_max)
        return factors, _top_entries(g - low_rank_dense(factors), p, p - r * (m + n))

    def error(parts):
        return _sq_norm(g - low_rank_dense(parts[0]) - sparse_dense(parts[1], g.shape))

    curve, unimodal = _search(lambda r: _rel(error(project(r, svd)), norm), r_max, scan_all)
    rank = jnp.nanargmin(curve).astype(jnp.int32)

    def refine(_, parts):
        return project(rank, jnp.linalg.svd(g - sparse_dense(parts[1], g.shape),
                                             full_matrices=False))

    parts = lax.fori_loop(0, n_iter - 1, refine, project(rank, svd))
    return SparcResult(*parts, rank=rank, nnz=jnp.int32(p) - rank * (m + n),
                       rel_error=_rel(error(parts), norm), unimodal=unimodal,
                       error_curve=curve)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _sparc_jit(g: Array, p: int, n_iter: int, scan_all: bool) -> SparcResult:
    return _sparc_single(g, p, n_iter, scan_all)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _sparc_stack_jit(gs: Array, p: int, n_iter: int, scan_all: bool) -> SparcResult:
    return jax.vmap(lambda g: _sparc_single(g, p, n_iter, scan_all))(gs)


def _sparc_args(shape, budget, n_iter, search) -> tuple[int, int, bool]:
    p = check_budget(shape, budget)
    n_iter = check_int("n_iter", n_iter, 1)
    return p, n_iter, check_choice("search", search, ("bisect", "scan")) == "scan"


def sparc_compress(g: ArrayLike, budget: int, *, n_iter: int = 1,
                   search: Search = "bisect") -> SparcResult:
    """SpaRC ``C_p(X) ≈ argmin_{(m+n)rank(L) + ‖S‖₀ ≤ p} ‖L + S − X‖²_F`` (eq. 4; Alg. 1–2).

    One SVD ``X = UΣVᵀ``; for a rank ``r ∈ [0, ⌊p/(m+n)⌋]`` the one-step alternating
    projection gives ``L_r = U_rΣ_rV_rᵀ``, ``S_r = Top_{p − r(m+n)}(X − L_r)`` and the loss
    ``‖X − L_r − S_r‖_F`` (Alg. 2 with ``n_iter = 1``). ``r*`` minimises the loss over the ranks
    evaluated by Alg. 1's bisection (both endpoints included), or over all ranks if those are
    not unimodal; ``(r*, p − r*(m+n))`` is then refined by ``n_iter`` alternating projections
    (Alg. 1 line 19). The error is at most that of ``Top_p(X)`` and of ``SVD_{⌊p/(m+n)⌋}(X)``.

    Args:
        g: f32[m, n], finite.
        budget: static int ``p ∈ [m + n, m·n]`` (see :func:`sparc_budget`).
        n_iter: static int ≥ 1, alternating projections for the chosen rank.
        search: ``"bisect"`` (Alg. 1 with the unimodality fallback) or ``"scan"`` (all
            ranks).

    Returns:
        :class:`SparcResult` (padded to ``r_max`` columns and ``p`` sparse slots).
    """
    g = _as_matrices("g", g, 2)
    return _sparc_jit(g, *_sparc_args(g.shape, budget, n_iter, search))


def sparc_compress_stack(gs: ArrayLike, budget: int, *, n_iter: int = 1,
                         search: Search = "bisect") -> SparcResult:
    """:func:`sparc_compress` of each matrix of a stack ``f32[L, m, n]`` at the same budget
    ``p``, vmapped in one jitted program; every field of the result gets a leading ``L``.
    Under ``vmap`` the fallback's ``lax.cond`` runs both branches, so the full scan is paid for
    every matrix (the results equal the per-matrix path's)."""
    gs = _as_matrices("gs", gs, 3)
    return _sparc_stack_jit(gs, *_sparc_args(gs.shape[1:], budget, n_iter, search))


def sparc_compress_dict(mats: Mapping[str, ArrayLike], *, r_max: int | None = None,
                        density: float | None = None, n_iter: int = 1,
                        search: Search = "bisect") -> dict[str, SparcResult]:
    """:func:`sparc_compress` of every matrix of a dict, each at the budget
    :func:`sparc_budget` gives its shape (``r_max·(m+n)`` or ``density·m·n``); matrices of one
    shape are stacked and compressed together (:func:`sparc_compress_stack`)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, mat in mats.items():
        groups.setdefault(np.shape(mat), []).append(name)
    out = {}
    for shape, names in groups.items():
        if len(shape) != 2:
            raise ValueError(f"matrix {names[0]!r} must have 2 dims, got shape {shape}")
        p = sparc_budget(shape, r_max=r_max, density=density)
        stacked = sparc_compress_stack(jnp.stack([mats[k] for k in names]), p, n_iter=n_iter,
                                       search=search)
        out.update({k: jax.tree.map(lambda a, i=i: a[i], stacked) for i, k in enumerate(names)})
    return {k: out[k] for k in mats}
