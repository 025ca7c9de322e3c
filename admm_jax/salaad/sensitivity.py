"""Sensitivity-aware deployment of an SLR surrogate: Fisher-diagonal unit scores and the
budget-constrained prefix allocation they drive.

SALAAD's Homomorphic Parameter Allocation (:mod:`admm_jax.salaad.hpa`) truncates every block by the
same ratios and estimates no sensitivity; the paper leaves open whether block-aware sensitivity
estimation does better (arXiv 2602.00942, open question 3). This module supplies that estimate
and the allocation that minimises it.

Unit sensitivity (Optimal Brain Damage with a Fisher Hessian)
--------------------------------------------------------------
Deleting a unit changes block ``W`` by ``ΔW``; to second order around a trained point (gradient
term dropped) the loss grows by ``½ vec(ΔW)ᵀ H vec(ΔW)``. With ``H`` replaced by the diagonal of
the empirical Fisher ``F = E[g ⊙ g]`` (LeCun, Denker & Solla 1990, "Optimal Brain Damage"; the
Fisher as curvature proxy as in Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting",
and Kwon et al. 2022, "A fast post-training pruning framework for Transformers"):

* triplet ``i`` (``ΔW = s_i u_i v_iᵀ``): ``½ s_i² Σ_pq F_pq u_pi² v_qi² = ½ s_i² (u_i²)ᵀ F (v_i²)``;
* sparse entry ``j`` at flat index ``idx_j``: ``½ F[idx_j] · value_j²``.

Limits: the Fisher is diagonal (no weight interactions) and the estimates are additive — each is
the cost of deleting that one unit from the *full* surrogate, and the cost of deleting a set is
taken as their sum (cross terms between units, and between the L and S parts, are ignored). A
Fisher from a calibration set is zero where that set has no gradient (embedding rows of tokens it
never contains), so those units look free to remove. Scaling ``F`` by a constant scales every
score and leaves the allocation unchanged.

Prefix allocation (:func:`sensitivity_allocation`)
---------------------------------------------------
A deployment keeps a prefix of each part (the ``r'_b`` first triplets, the ``k'_b`` first sparse
entries: the stored order), every unit of a part having the same parameter cost ``c``. Minimising
the removed score ``Σ`` (scores of the dropped units) under a parameter budget ``B`` is a
knapsack over prefixes. For a multiplier ``λ`` the Lagrangian relaxation keeps, in each part, the
prefix maximising ``(kept score) − λ·(kept cost)``; those maximisers are the vertices of the
upper concave envelope of the cumulative score against the cumulative cost, whose segments have
non-increasing score densities (score / cost). The envelope's slopes are the antitonic
(non-increasing) isotonic regression of the per-unit scores (Barlow et al. 1972, "Statistical
inference under order restrictions"), computed by pool-adjacent-violators.

1. Sort every envelope segment of every part by density, descending (ties: block order, the low
   rank part before the sparse part, then position, so each part's segments stay in order).
2. Keep the longest run of that order whose cost fits in ``B``: the Lagrangian solution for
   ``λ`` = the density of the first segment that does not fit, optimal among all prefix choices
   costing no more than it does.
3. Fill the rest ``R`` greedily: through the remaining segments in the same order, each takes
   as many of its units as still fit (a part that takes only some of a segment's units is left
   with less than one unit's cost, so it takes nothing later and stays a prefix). The fill ends
   when ``R`` is below every unit cost.

The kept cost never exceeds ``B`` and falls short of it by less than the cost of any unit left
out. Slack: the fractional (LP) optimum over the envelopes, ``kept score of step 2 + λ·R``,
bounds every prefix choice, so ``removed − optimum ≤ removed − lower_bound ≤ λ·R``, at most the
score of the segment at which step 2 stopped; the slack is 0 when the budget lands on a vertex.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import isotonic_regression

from admm_jax._checks import check_int
from admm_jax.core.tree import flat_paths
from admm_jax.salaad.surrogate import BlockSurrogate, Surrogate, tiles_of


class BlockSensitivity(NamedTuple):
    """Estimated loss increase of deleting each unit of one block (module docstring).

    Attributes:
        low_rank: ``f32[r]`` one score per stored singular triplet, in the stored order.
        sparse: ``f32[k]`` one score per stored sparse entry, in the stored order.
    """

    low_rank: np.ndarray
    sparse: np.ndarray


Sensitivity = dict[str, BlockSensitivity]
"""Block path (:func:`~admm_jax.core.tree.path_str`) -> :class:`BlockSensitivity`."""


class PrefixAllocation(NamedTuple):
    """The result of :func:`sensitivity_allocation`.

    Attributes:
        ranks: block path -> kept rank ``r'_b``.
        n_sparse: block path -> kept sparse count ``k'_b``.
        cost: parameters of the kept units (the constrained blocks only).
        removed: total score of the dropped units (the minimised objective).
        lower_bound: the LP lower bound on ``removed`` over every prefix choice within budget.
    """

    ranks: dict[str, int]
    n_sparse: dict[str, int]
    cost: int
    removed: float
    lower_bound: float


def fisher_diagonal(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                    batches: Iterable[Any]) -> Any:
    """Empirical Fisher diagonal ``F = (1/N) Σ_t g_t ⊙ g_t``, ``g_t = ∇_params loss_fn(params,
    batch_t)`` over the ``N`` batches (OBD / Fisher pruning; see the module docstring).

    With a batch-mean loss each ``g_t`` is a mean over the batch's examples, which shrinks the
    per-example noise term; use batches of one example for the per-example Fisher. Only ratios of
    scores matter to the allocation, so a global scale is immaterial.

    Args:
        loss_fn: scalar loss ``loss_fn(params, batch)``, differentiable in ``params``.
        params: the trained params pytree.
        batches: an iterable of calibration batches (consumed once).

    Returns:
        A pytree like ``params`` of ``float32`` Fisher diagonals.

    Raises:
        ValueError: ``batches`` is empty.
    """
    grad = jax.grad(loss_fn)

    @jax.jit
    def step(acc, params, batch):
        return jax.tree.map(lambda a, g: a + jnp.square(g.astype(jnp.float32)), acc,
                            grad(params, batch))

    acc = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
    count = 0
    for batch in batches:
        acc = step(acc, params, batch)
        count += 1
    if not count:
        raise ValueError("fisher_diagonal needs at least one batch")
    return jax.tree.map(lambda a: a / count, acc)


@jax.jit
def _triplet_curvature(u: jax.Array, v: jax.Array, fisher: jax.Array) -> jax.Array:
    """``(u_i²)ᵀ F (v_i²)`` for every column ``i``: ``[r, n]`` intermediates, no ``m×n×r``."""
    left = jnp.matmul((u * u).T, fisher, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(left * (v * v).T, axis=1)


def _fisher_leaves(surrogate: Surrogate, fisher: Any) -> dict[str, np.ndarray]:
    """The surrogate blocks' Fisher matrices, validated (present, same shape, finite, ≥ 0)."""
    flat = flat_paths(fisher)
    missing = [p for p in surrogate if p not in flat]
    if missing:
        raise ValueError(f"fisher has no leaf for surrogate blocks {missing[:5]} (leaves are "
                         "matched by path_str, like the surrogate's keys)")
    out = {}
    for path, block in surrogate.items():
        f = np.asarray(jax.device_get(flat[path]), np.float32)
        if f.shape != tuple(block.shape):
            raise ValueError(f"fisher leaf {path!r} has shape {f.shape} but the surrogate block "
                             f"has shape {tuple(block.shape)}")
        if not (np.isfinite(f).all() and (f >= 0).all()):
            raise ValueError(f"fisher leaf {path!r} must be finite and non-negative")
        out[path] = f
    return out


def unit_sensitivity(surrogate: Surrogate, fisher: Any) -> Sensitivity:
    """OBD scores of every unit of every surrogate block under a diagonal Fisher ``F``.

    Triplet ``i``: ``½ s_i² (u_i²)ᵀ F (v_i²)``; sparse entry ``j``: ``½ F[idx_j]·value_j²`` (a
    ``b × b`` tile of a block-structured surrogate: the sum of that over its entries) — the
    second-order loss increase of deleting that unit alone from the full block (module
    docstring; LeCun et al. 1990, Kwon et al. 2022).

    Args:
        surrogate: block path -> :class:`~admm_jax.salaad.surrogate.BlockSurrogate`.
        fisher: a pytree (e.g. :func:`fisher_diagonal`'s output) or a flat dict whose leaves at
            the surrogate's paths (:func:`~admm_jax.core.tree.path_str`) are ``[m, n]`` Fisher
            diagonals; other leaves are ignored.

    Returns:
        block path -> :class:`BlockSensitivity` (``float32``, the surrogate's order).

    Raises:
        ValueError: a block has no Fisher leaf, or one of another shape, non-finite or negative.
    """
    if not isinstance(surrogate, Mapping) or not all(
            isinstance(b, BlockSurrogate) for b in surrogate.values()):
        raise ValueError("surrogate must map block paths to BlockSurrogate")
    leaves = _fisher_leaves(surrogate, fisher)
    out: Sensitivity = {}
    for path, b in surrogate.items():
        f = leaves[path]
        s = np.asarray(b.s, np.float32)
        curv = (np.asarray(_triplet_curvature(jnp.asarray(b.u, jnp.float32),
                                              jnp.asarray(b.v, jnp.float32), jnp.asarray(f)))
                if b.rank else np.zeros(0, np.float32))
        values = np.asarray(b.values, np.float32)
        idx = np.asarray(b.indices, np.int64)
        if b.sparse_block > 1:  # a tile: the sum over its entries (padding has F = 0 there)
            tiles = tiles_of(np.asarray(f, np.float32), b.sparse_block)[idx]
            sparse = 0.5 * np.sum(tiles * values * values, axis=(1, 2))
        else:
            sparse = 0.5 * f.reshape(-1)[idx] * values * values
        out[path] = BlockSensitivity((0.5 * s * s * curv).astype(np.float32),
                                     sparse.astype(np.float32))
    return out


def _check_sensitivity(sensitivity: Mapping[str, BlockSensitivity],
                       surrogate: Surrogate) -> None:
    if not isinstance(sensitivity, Mapping) or not all(
            isinstance(s, BlockSensitivity) for s in sensitivity.values()):
        raise ValueError("sensitivity must map block paths to BlockSensitivity "
                         "(see unit_sensitivity)")
    if set(sensitivity) != set(surrogate):
        raise ValueError(f"sensitivity and surrogate cover different blocks; only in the "
                         f"surrogate: {sorted(set(surrogate) - set(sensitivity))[:5]}, only in "
                         f"sensitivity: {sorted(set(sensitivity) - set(surrogate))[:5]}")
    for path, b in surrogate.items():
        for part, size in (("low_rank", b.rank), ("sparse", b.nnz)):
            x = np.asarray(getattr(sensitivity[path], part))
            if x.shape != (size,):
                raise ValueError(f"sensitivity[{path!r}].{part} has shape {x.shape} but the "
                                 f"surrogate block has {size} such units")
            if not (np.isfinite(x).all() and (x >= 0).all()):
                raise ValueError(f"sensitivity[{path!r}].{part} must be finite and "
                                 "non-negative")


def removed_sensitivity(sensitivity: Mapping[str, BlockSensitivity], ranks: Mapping[str, int],
                        n_sparse: Mapping[str, int]) -> float:
    """Estimated loss increase of a deployment: ``Σ_b (Σ_{i ≥ r'_b} low_rank_i + Σ_{j ≥ k'_b}
    sparse_j)``, the total score of the dropped units (additive OBD estimate). Works for any
    allocation (e.g. an HPA one) of the surrogate ``sensitivity`` was computed for."""
    if set(ranks) != set(sensitivity) or set(n_sparse) != set(sensitivity):
        raise ValueError("ranks / n_sparse and sensitivity cover different blocks")
    return float(sum(np.sum(np.asarray(s.low_rank, np.float64)[int(ranks[p]):])
                     + np.sum(np.asarray(s.sparse, np.float64)[int(n_sparse[p]):])
                     for p, s in sensitivity.items()))


class _Segments(NamedTuple):
    """Envelope segments of all parts (part ``2b`` = block b's low rank, ``2b + 1`` its sparse)."""

    part: np.ndarray     # int64, the part of each segment
    length: np.ndarray   # int64, units in the segment
    score: np.ndarray    # float64, their total score
    density: np.ndarray  # float64, score per parameter (non-increasing within a part)


def _envelope(scores: np.ndarray, unit_cost: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lengths, scores, densities)`` of the upper concave envelope's segments of one part."""
    if not scores.size:
        return (np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    starts = isotonic_regression(scores, increasing=False).blocks
    length = np.diff(starts).astype(np.int64)
    total = np.add.reduceat(scores, starts[:-1])
    density = np.minimum.accumulate(total / (length * unit_cost))  # exact monotone order
    return length, total, density


def _segments(parts: list[tuple[np.ndarray, int]]) -> _Segments:
    pieces = [_envelope(scores, cost) for scores, cost in parts]
    part = np.repeat(np.arange(len(pieces), dtype=np.int64), [len(p[0]) for p in pieces])
    length, score, density = (np.concatenate([np.zeros(0, dtype)] + [p[j] for p in pieces])
                              for j, dtype in enumerate((np.int64, np.float64, np.float64)))
    return _Segments(part, length, score, density)


def _fill(seg: _Segments, order: np.ndarray, unit: np.ndarray, kept: np.ndarray,
          rest: int) -> int:
    """Step 3: spend ``rest`` on the segments ``order`` (density order), updating ``kept`` in
    place; returns the parameters left over (below the cost of every unit left out).

    Each segment takes as many of its units as fit. A part that takes only some of a segment's
    units leaves less than one of its units' cost, so it takes nothing later: kept sets stay
    prefixes."""
    cheapest = int(unit.min()) if len(unit) else 1
    cand = order[unit[seg.part[order]] <= rest]  # a costlier unit can never fit
    for part, length in zip(seg.part[cand].tolist(), seg.length[cand].tolist()):
        if rest < cheapest:
            break
        take = min(length, rest // int(unit[part]))
        kept[part] += take
        rest -= take * int(unit[part])
    return rest


def sensitivity_allocation(sensitivity: Mapping[str, BlockSensitivity], surrogate: Surrogate,
                           unit_costs: Mapping[str, tuple[int, int]],
                           budget: int) -> PrefixAllocation:
    """Prefixes of every block minimising the removed score within ``budget`` parameters.

    Lagrangian on the per-part concave envelopes, then a greedy fill (module docstring, steps
    1-3). Deterministic; exact integer costs; ``cost ≤ budget`` and ``budget − cost`` is below
    the cost of every unit left out.

    Args:
        sensitivity: block path -> :class:`BlockSensitivity` of ``surrogate`` (non-negative).
        surrogate: the blocks, in the order used for ties.
        unit_costs: block path -> ``(cost of one triplet, cost of one sparse entry)``.
        budget: parameters available to the constrained blocks (``≥ 0``).

    Raises:
        ValueError: ``sensitivity`` does not match ``surrogate`` (blocks, unit counts) or has
            negative / non-finite scores; ``unit_costs`` misses a block; ``budget < 0``.
    """
    budget = check_int("budget", budget, minimum=0)
    _check_sensitivity(sensitivity, surrogate)
    if any(p not in unit_costs or min(unit_costs[p]) < 1 for p in surrogate):
        raise ValueError("unit_costs must give every surrogate block two positive unit costs")
    parts = [(np.asarray(getattr(sensitivity[p], f), np.float64), int(unit_costs[p][j]))
             for p in surrogate for j, f in enumerate(("low_rank", "sparse"))]
    unit = np.array([c for _, c in parts], np.int64)
    seg = _segments(parts)
    order = np.lexsort((np.arange(len(seg.part)), -seg.density))
    cum = np.cumsum(seg.length[order] * unit[seg.part[order]])
    whole = int(np.searchsorted(cum, budget, side="right"))
    kept = np.bincount(seg.part[order[:whole]], seg.length[order[:whole]],
                       minlength=len(parts)).astype(np.int64)
    rest = budget - (int(cum[whole - 1]) if whole else 0)
    relaxed = float(np.sum(seg.score[order[:whole]]))
    if whole < len(order):
        relaxed += float(seg.density[order[whole]]) * rest
    rest = _fill(seg, order[whole:], unit, kept, rest)
    paths = list(surrogate)
    ranks = {p: int(kept[2 * i]) for i, p in enumerate(paths)}
    n_sparse = {p: int(kept[2 * i + 1]) for i, p in enumerate(paths)}
    total = float(sum(np.sum(scores) for scores, _ in parts))
    return PrefixAllocation(ranks, n_sparse, int(budget - rest),
                            removed_sensitivity(sensitivity, ranks, n_sparse),
                            max(0.0, total - relaxed))
