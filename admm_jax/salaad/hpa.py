"""Homomorphic Parameter Allocation (HPA): deploy one SLR surrogate at any parameter budget.

SALAAD (arXiv 2602.00942, "Homomorphic Parameter Allocation") deploys the compact surrogate
(:mod:`admm_jax.salaad.surrogate`) of a trained model at a memory budget by keeping, in *every*
constrained block, the same fraction ϕL of singular triplets (largest first) and the same fraction
ϕS of sparse entries (largest magnitude first); a mixing coefficient κ splits the budget between
the low-rank and the sparse parts. No per-block sensitivity is estimated.

Parameter-count convention (all counts are exact Python ints)
-------------------------------------------------------------
* A rank-``r`` low-rank part of an ``m × n`` block costs ``r·(m + n + 1)`` (``u``, ``v`` and ``s``).
* A sparse part with ``k`` entries costs ``2·k`` (values + indices; an index counts as one
  parameter whatever its integer width).
* A block-structured sparse part (``sparse_block = b > 1``: ``k`` whole ``b × b`` tiles,
  :mod:`admm_jax.salaad.surrogate`) costs ``(b² + 1)·k``: a tile's ``b²`` values (a partial edge
  tile stores its padding too) plus its one tile index. ``b = 1`` is the entry cost ``2·k``, so
  below a sparse *unit* is an entry or a tile and ``c = b² + 1`` its cost.
* Every params leaf that is not a constrained block (not a key of the surrogate: norms, the LM
  head, unconstrained matrices) counts dense, its ``size``.
* The dense parameter count is ``D = count_params(params)``; ``O = D − Σ_b m_b·n_b`` is the
  count outside the constrained blocks.

A deployment keeping ranks ``r'_b`` and sparse counts ``k'_b`` therefore counts
``O + Σ_b [r'_b·(m_b + n_b + 1) + c_b·k'_b]`` (:func:`param_count`; :func:`block_cost` is the one
place that prices a block).

Budget (:func:`allocate`)
-------------------------
``budget`` is a fraction in ``(0, 1]`` of a reference count (``relative_to``):

* ``"dense"`` (default): of ``D``; the target is ``T = floor(budget·D)`` and the constrained
  blocks get ``B_c = T − O`` (``budget < O/D`` cannot be represented: ``ValueError``);
* ``"constrained"``: of the constrained blocks' dense size ``C = Σ_b m_b·n_b``; the target is
  ``T = O + floor(budget·C)`` and ``B_c = floor(budget·C)`` (every budget is representable).

In both a product within float rounding of an integer counts as that integer (``budget = N/D``
gives ``N``).

Strategies (``strategy``)
-------------------------
``"sensitivity"`` (beyond the paper) keeps, in each block, the prefixes that minimise the total
estimated loss increase of the removed units (:func:`admm_jax.salaad.sensitivity.unit_sensitivity`
scores) within ``B_c``: a Lagrangian on per-part concave envelopes plus a greedy fill
(:func:`admm_jax.salaad.sensitivity.sensitivity_allocation`). The count never exceeds ``T`` and
falls short of it by less than the cost of any unit left out (``T − 1`` while a sparse entry is
left out). κ and ``exact`` play no part: the split between L and S falls out of the scores.
``phi_low_rank`` / ``phi_sparse`` then report the aggregate kept fractions ``Σ r'_b / Σ r_b`` and
``Σ k'_b / Σ k_b`` (1 for an empty part).

``"homomorphic"`` (default) is SALAAD's HPA. It needs one sparse unit cost ``c`` over the blocks
with sparse units (all entries, ``c = 2``, or all ``b × b`` tiles of one ``b``, ``c = b² + 1``;
``ValueError`` otherwise); every count of sparse entries below is then one of units (tiles kept
whole, largest Frobenius norm first, the same fraction ϕS of every block's tiles). With
``P_L = Σ_b r_b(m_b+n_b+1)`` and ``P_S = Σ_b c·k_b`` the costs of the full surrogate:

1. If ``B_c ≥ P_L + P_S`` everything is kept (ϕL = ϕS = 1) and the reported count is the actual,
   smaller one ``O + P_L + P_S``.
2. Otherwise the low-rank share is ``B_L = min(P_L, max(κ·B_c, B_c − P_S))``: ``κ·B_c``, with the
   excess over either part's full cost flowing to the other part.
3. ϕL is the largest ratio ``φ ∈ {0} ∪ {j / r_b}`` whose ranks ``floor(φ·r_b)`` cost at most
   ``B_L``; every block keeps ``floor(ϕL·r_b)`` triplets (so ``0 ≤ ϕL − r'_b/r_b < 1/r_b``).
4. ``exact=True`` (default): the rest, ``B_c`` minus the exact low-rank cost, buys
   ``K = min(Σk_b, floor(rest / c))`` sparse entries, distributed as ``floor(ϕS·k_b)`` with
   ``ϕS = K / Σk_b`` plus one more for the blocks with the largest remainders ``ϕS·k_b −
   floor(ϕS·k_b)`` (ties by block order = the params' flatten order), so every block keeps
   ``floor(ϕS·k_b)`` or ``floor(ϕS·k_b) + 1`` entries and the total is ``T`` or ``T − 1``
   (with tiles: within ``c − 1`` below ``T``, ``T − c + 1 ≤ count ≤ T``).
   If the rest exceeds ``P_S + c − 1`` (every sparse unit fits with budget to spare), ϕL is rounded
   *up* instead — to the smallest breakpoint costing at least ``B_L`` — when that still fits in
   ``B_c``, and the sparse part gives back the difference (less than one step of ϕL). The total
   can fall short of ``T − 1`` only when even that does not fit (the sparse part is smaller than
   one step of ϕL, e.g. a surrogate without sparse entries); the shortfall is then less than the
   cost of the triplets added by the next step of ϕL.
   ``exact=False`` ("nested"): always round ϕL down; the sparse part gets exactly its share
   ``B_S = B_c − B_L``, ``ϕS = B_S / P_S`` and every block keeps ``floor(ϕS·k_b)``; the count
   falls short of ``T`` by the rounding slack (< one step of ϕL + 2·#blocks).

HPA monotonicity: ϕL, every kept rank, and the total count never decrease when the budget grows
(both modes). With ``exact=False`` every kept sparse count, hence every kept set, is also nested in
that of any larger budget. With ``exact=True`` that is impossible for the sparse counts: when a
slightly larger budget adds triplets (a step of ϕL costs ``Σ (m_b + n_b + 1)`` over the blocks it
grows, at least 3) while the total stays within ±1 of ``T``, the sparse part must give back half
that many entries. Its total ``K`` stays within one ϕL step of ``B_S / 2`` (within one step of
``Σk_b`` once every sparse entry fits), so between any two budgets ``K`` shrinks by at most about
one ϕL step's cost and each block's count by that share of ``k_b / Σk_b`` plus 2 entries.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax._checks import check_choice, check_real
from admm_jax.core.tree import path_str
from admm_jax.salaad.sensitivity import Sensitivity, sensitivity_allocation
from admm_jax.salaad.surrogate import BlockSurrogate, Surrogate, reconstruct


class Allocation(NamedTuple):
    """The result of :func:`allocate`.

    Attributes:
        phi_low_rank: shared fraction of singular triplets kept (``r'_b = floor(ϕL·r_b)``).
        phi_sparse: shared fraction of sparse units (entries or tiles) kept (up to one unit per
            block).
        ranks: block path -> kept rank ``r'_b``.
        n_sparse: block path -> kept sparse count ``k'_b`` (entries, or tiles when the
            surrogate block's ``sparse_block > 1``).
        params: exact deployed parameter count (module docstring convention).
        budget: target count ``T`` (``floor(fraction·D)``, or ``O + floor(fraction·C)`` when
            ``relative_to == "constrained"``).
        dense_params: ``D = count_params(params)``.
        fraction: the requested budget as a fraction of the ``relative_to`` reference count.
        kappa: the low-rank share κ (as passed; unused by the sensitivity strategy).
        strategy: ``"homomorphic"`` or ``"sensitivity"``.
        relative_to: ``"dense"`` (``D``) or ``"constrained"`` (``C = Σ_b m_b·n_b``).
    """

    phi_low_rank: float
    phi_sparse: float
    ranks: dict[str, int]
    n_sparse: dict[str, int]
    params: int
    budget: int
    dense_params: int
    fraction: float
    kappa: float
    strategy: str = "homomorphic"
    relative_to: str = "dense"


def sparse_unit_cost(sparse_block: int = 1) -> int:
    """Parameters of one sparse unit: ``b² + 1`` — a ``b × b`` tile's values (padding included)
    plus its index; ``2`` (value + index) for an entry, ``b = 1``."""
    return int(sparse_block) ** 2 + 1


def block_cost(shape: tuple[int, int], rank: int, n_sparse: int, sparse_block: int = 1) -> int:
    """Parameters of one block kept at ``rank`` triplets and ``n_sparse`` sparse units (entries,
    or ``sparse_block × sparse_block`` tiles): ``rank·(m + n + 1) + (b² + 1)·n_sparse``, i.e.
    ``2·n_sparse`` for entries (:func:`sparse_unit_cost`)."""
    m, n = shape
    return int(rank) * (int(m) + int(n) + 1) + sparse_unit_cost(sparse_block) * int(n_sparse)


class _Block(NamedTuple):
    path: str
    shape: tuple[int, int]
    rank: int
    nnz: int
    sparse_block: int = 1


def _blocks(surrogate: Surrogate, params: Any) -> tuple[list[_Block], int, int]:
    """Constrained blocks in the params' flatten order, ``D`` and ``O``; validates paths/shapes."""
    if not isinstance(surrogate, dict) or not all(
            isinstance(b, BlockSurrogate) for b in surrogate.values()):
        raise ValueError("surrogate must be a dict mapping block paths to BlockSurrogate")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes = {path_str(p): tuple(int(d) for d in x.shape) for p, x in flat}
    missing = [p for p in surrogate if p not in shapes]
    if missing:
        raise ValueError(f"surrogate blocks {missing[:5]} are not leaves of params")
    blocks = []
    for path, shape in shapes.items():
        if path in surrogate:
            b = surrogate[path]
            if tuple(b.shape) != shape:
                raise ValueError(f"surrogate block {path!r} has shape {tuple(b.shape)} but the "
                                 f"params leaf has shape {shape}")
            blocks.append(_Block(path, shape, b.rank, b.nnz, b.sparse_block))
    dense = int(sum(math.prod(s) for s in shapes.values()))
    other = dense - sum(b.shape[0] * b.shape[1] for b in blocks)
    return blocks, dense, other


def param_count(params: Any, surrogate: Surrogate, ranks: dict[str, int] | None = None,
                n_sparse: dict[str, int] | None = None) -> int:
    """Deployed parameter count with the given kept ranks / sparse counts (default: all kept).

    ``params`` may hold arrays or ``jax.ShapeDtypeStruct`` leaves (only shapes are read)."""
    blocks, _, other = _blocks(surrogate, params)
    ranks = ranks or {}
    n_sparse = n_sparse or {}
    return other + sum(block_cost(b.shape, ranks.get(b.path, b.rank), n_sparse.get(b.path, b.nnz),
                                  b.sparse_block) for b in blocks)


def minimum_budget(params: Any, surrogate: Surrogate) -> float:
    """Smallest representable budget fraction ``O / D`` (every constrained block emptied)."""
    _, dense, other = _blocks(surrogate, params)
    return other / dense


class _RankLadder:
    """The breakpoints ``φ ∈ {0} ∪ {j / r_b}`` of the shared low-rank ratio and their costs.

    Ranks at ``φ = num/den`` are ``floor(φ·r_b) = (num·r_b) // den`` (exact integers); the cost
    ``Σ_b floor(φ·r_b)·(m_b + n_b + 1)`` strictly increases from one distinct breakpoint to the
    next. Breakpoints are sorted in float order and searched by bisection."""

    def __init__(self, ranks: np.ndarray, unit: np.ndarray):
        self.ranks = ranks.astype(np.int64)
        self.unit = unit.astype(np.int64)
        nz = self.ranks[self.ranks > 0]
        nums = np.concatenate([np.zeros(1, np.int64)]
                              + [np.arange(1, r + 1, dtype=np.int64) for r in nz])
        dens = np.concatenate([np.ones(1, np.int64), np.repeat(nz, nz)])
        order = np.argsort(nums / dens, kind="stable")
        self.nums, self.dens = nums[order], dens[order]

    def cost(self, i: int) -> int:
        return int(np.sum((self.nums[i] * self.ranks) // self.dens[i] * self.unit))

    def kept(self, i: int) -> np.ndarray:
        return (self.nums[i] * self.ranks) // self.dens[i]

    def ratio(self, i: int) -> Fraction:
        return Fraction(int(self.nums[i]), int(self.dens[i]))

    def floor(self, limit: Fraction | int) -> int:
        """Index of the largest breakpoint costing at most ``limit`` (``limit >= 0``)."""
        lo, hi = 0, len(self.nums)  # cost(lo) <= limit < cost(hi); index 0 is φ = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.cost(mid) <= limit:
                lo = mid
            else:
                hi = mid
        return lo

    def ceil(self, limit: Fraction | int) -> int:
        """Index of the smallest breakpoint costing at least ``limit`` (``limit <= full cost``)."""
        i = self.floor(limit)
        return i if self.cost(i) >= limit or i + 1 == len(self.nums) else i + 1


def _target(frac: Fraction, dense: int) -> int:
    """``floor(budget·D)``, taking ``budget·D`` within float rounding of an integer as that
    integer (so ``budget = N / D`` gives exactly ``N``)."""
    x = frac * dense
    nearest = round(x)
    return nearest if abs(x - nearest) <= dense * Fraction(2) ** -50 else math.floor(x)


def _rank_breakpoint(ladder: _RankLadder, b_l: Fraction, b_c: int, p_s: int, unit: int,
                     exact: bool) -> int:
    """The rank-ladder breakpoint for a low-rank budget ``b_l``: rounded down, or up (step 4)
    when ``exact`` and every sparse unit (cost ``unit``) would fit with budget to spare."""
    i = ladder.floor(b_l)
    if exact and b_c - ladder.cost(i) > p_s + unit - 1:
        up = ladder.ceil(b_l)
        if ladder.cost(up) <= b_c:
            i = up
    return i


def _apportion(k: int, nnz: np.ndarray) -> np.ndarray:
    """``k`` sparse entries split over the blocks in proportion to their ``nnz`` (largest
    remainder; ties to the earlier block), so they sum to exactly ``k``."""
    total = int(np.sum(nnz))
    if not total:
        return np.zeros(len(nnz), np.int64)
    kept = [k * int(n) // total for n in nnz]
    rem = [k * int(n) % total for n in nnz]
    for j in sorted(range(len(nnz)), key=lambda j: (-rem[j], j))[:k - sum(kept)]:
        kept[j] += 1
    return np.array(kept, np.int64)


def _targets(frac: Fraction, budget: float, relative_to: str, dense: int, other: int) -> int:
    """The target ``T`` for the ``relative_to`` reference (module docstring, "Budget")."""
    if relative_to == "constrained":
        return other + _target(frac, dense - other)
    target = _target(frac, dense)
    if target < other:
        raise ValueError(
            f"budget {budget!r} ({target} parameters) is below the smallest representable model: "
            f"the {other} parameters outside the constrained blocks need budget >= "
            f"{other / dense:.6g} (= {other}/{dense}); relative_to='constrained' measures the "
            "budget against the constrained blocks only")
    return target


def _shared_unit_cost(blocks: list[_Block]) -> int:
    """The one sparse unit cost ``c`` of the blocks holding sparse units (2 if none does)."""
    sizes = sorted({b.sparse_block for b in blocks if b.nnz})
    if len(sizes) > 1:
        raise ValueError(f"HPA keeps one fraction of sparse units in every block, so the blocks "
                         f"must share one sparse unit; got sparse_block sizes {sizes}")
    return sparse_unit_cost(sizes[0] if sizes else 1)


def _homomorphic(blocks: list[_Block], b_c: int, kap: Fraction,
                 exact: bool) -> tuple[np.ndarray, np.ndarray, Fraction, Fraction]:
    """HPA steps 1-4 (module docstring): ``(ranks, sparse counts, ϕL, ϕS)`` within ``b_c``."""
    ranks_full = np.array([b.rank for b in blocks], np.int64)
    nnz_full = np.array([b.nnz for b in blocks], np.int64)
    unit = np.array([b.shape[0] + b.shape[1] + 1 for b in blocks], np.int64)
    c = _shared_unit_cost(blocks)
    p_l = int(np.sum(ranks_full * unit))
    p_s = c * int(np.sum(nnz_full))
    total_k = int(np.sum(nnz_full))
    if b_c >= p_l + p_s:
        return ranks_full, nnz_full, Fraction(1), Fraction(1)
    b_l = min(Fraction(p_l), max(kap * b_c, Fraction(b_c - p_s)))
    ladder = _RankLadder(ranks_full, unit)
    i = _rank_breakpoint(ladder, b_l, b_c, p_s, c, exact)
    if exact:
        k = min(total_k, (b_c - ladder.cost(i)) // c)
        phi_s = Fraction(k, total_k) if total_k else Fraction(1)
        kept = _apportion(k, nnz_full)
    else:
        phi_s = (Fraction(b_c) - b_l) / p_s if p_s else Fraction(1)
        kept = np.array([math.floor(phi_s * int(n)) for n in nnz_full], np.int64)
    return ladder.kept(i), kept, ladder.ratio(i), phi_s


def _by_sensitivity(surrogate: Surrogate, blocks: list[_Block], b_c: int,
                    sensitivity: Any) -> tuple[np.ndarray, np.ndarray, Fraction, Fraction]:
    """The sensitivity strategy's ``(ranks, sparse counts, aggregate ϕL, aggregate ϕS)``."""
    ordered = {b.path: surrogate[b.path] for b in blocks}
    costs = {b.path: (block_cost(b.shape, 1, 0), block_cost(b.shape, 0, 1, b.sparse_block))
             for b in blocks}
    sol = sensitivity_allocation(sensitivity, ordered, costs, b_c)
    ranks = np.array([sol.ranks[b.path] for b in blocks], np.int64)
    kept = np.array([sol.n_sparse[b.path] for b in blocks], np.int64)

    def share(part: np.ndarray, full: int) -> Fraction:
        return Fraction(int(np.sum(part)), full) if full else Fraction(1)

    return (ranks, kept, share(ranks, sum(b.rank for b in blocks)),
            share(kept, sum(b.nnz for b in blocks)))


def allocate(surrogate: Surrogate, budget: float, kappa: float = 0.5, *, params: Any,
             exact: bool = True, strategy: Literal["homomorphic", "sensitivity"] = "homomorphic",
             sensitivity: Sensitivity | None = None,
             relative_to: Literal["dense", "constrained"] = "dense") -> Allocation:
    """Parameter allocation of ``surrogate`` at ``budget``: HPA or sensitivity-aware (see the
    module docstring).

    Args:
        surrogate: block path -> :class:`~admm_jax.salaad.surrogate.BlockSurrogate`.
        budget: deployed size as a fraction, in ``(0, 1]``, of the ``relative_to`` count.
        kappa: HPA's share of the constrained blocks' budget given to the low-rank parts, in
            ``[0, 1]`` (1: as much low rank as possible before any sparse entry; 0: the reverse).
            Checked but unused by ``strategy="sensitivity"``.
        params: the model's params (arrays or ``jax.ShapeDtypeStruct``); fixes ``D``, ``O``, the
            block order and validates the surrogate's paths and shapes.
        exact: HPA only: spend the low-rank rounding slack on sparse entries so the count is
            ``T`` or ``T − 1`` (default); ``False`` keeps every kept set nested across budgets.
        strategy: ``"homomorphic"`` (SALAAD's shared ratios) or ``"sensitivity"`` (minimise the
            total estimated loss increase of the removed units).
        sensitivity: block path -> :class:`~admm_jax.salaad.sensitivity.BlockSensitivity` of
            this surrogate (:func:`~admm_jax.salaad.sensitivity.unit_sensitivity`); required by,
            and only accepted with, ``strategy="sensitivity"``.
        relative_to: ``"dense"``: ``budget`` is a fraction of the dense count ``D``;
            ``"constrained"``: of the constrained blocks' dense size ``Σ_b m_b·n_b``, on top of
            the ``O`` parameters outside them.

    Raises:
        TypeError: ``budget`` or ``kappa`` is not a real number.
        ValueError: ``budget`` outside ``(0, 1]`` (a fraction, not a percentage) or, relative to
            ``D``, below the smallest representable model ``O / D``; ``kappa`` outside
            ``[0, 1]``; an unknown ``strategy`` / ``relative_to``; ``sensitivity`` missing,
            superfluous or not matching the surrogate; surrogate/params mismatch.
    """
    frac = Fraction(check_real("budget", budget, low=0.0, high=1.0, low_open=True))
    kap = Fraction(check_real("kappa", kappa, low=0.0, high=1.0))
    check_choice("strategy", strategy, ("homomorphic", "sensitivity"))
    check_choice("relative_to", relative_to, ("dense", "constrained"))
    if strategy == "sensitivity" and sensitivity is None:
        raise ValueError("strategy='sensitivity' needs sensitivity= (per-unit scores, see "
                         "admm_jax.salaad.sensitivity.unit_sensitivity)")
    if strategy == "homomorphic" and sensitivity is not None:
        raise ValueError("sensitivity= is only used by strategy='sensitivity'")
    blocks, dense, other = _blocks(surrogate, params)
    target = _targets(frac, budget, relative_to, dense, other)
    if strategy == "sensitivity":
        ranks, kept, phi_l, phi_s = _by_sensitivity(surrogate, blocks, target - other,
                                                    sensitivity)
    else:
        ranks, kept, phi_l, phi_s = _homomorphic(blocks, target - other, kap, exact)
    rank_d = {b.path: int(r) for b, r in zip(blocks, ranks)}
    kept_d = {b.path: int(k) for b, k in zip(blocks, kept)}
    total = other + sum(block_cost(b.shape, rank_d[b.path], kept_d[b.path], b.sparse_block)
                        for b in blocks)
    if total > target:  # impossible by construction; guard the invariant
        raise RuntimeError(f"allocated {total} parameters above the budget {target}")
    return Allocation(float(phi_l), float(phi_s), rank_d, kept_d, int(total), int(target),
                      int(dense), float(budget), float(kappa), strategy, relative_to)


def deploy(params: Any, surrogate: Surrogate, allocation: Allocation) -> Any:
    """Dense params with every constrained block replaced by its truncated surrogate.

    Block ``b`` becomes ``reconstruct(surrogate[b], allocation.ranks[b],
    allocation.n_sparse[b])`` (top ``r'_b`` triplets + top ``k'_b`` sparse entries), cast to the
    leaf's dtype; every other leaf is returned unchanged (the same object). Reconstruction runs
    in numpy on the host (O(Σ r'_b·m_b·n_b) flops).
    """
    if not isinstance(allocation, Allocation):
        raise ValueError(f"allocation must be an Allocation, got {type(allocation).__name__}")
    if set(allocation.ranks) != set(surrogate) or set(allocation.n_sparse) != set(surrogate):
        raise ValueError("allocation and surrogate cover different blocks; allocate this "
                         "surrogate first")
    _blocks(surrogate, params)  # validates paths and shapes

    def leaf(path, x):
        p = path_str(path)
        if p not in surrogate:
            return x
        w = reconstruct(surrogate[p], allocation.ranks[p], allocation.n_sparse[p])
        return jnp.asarray(w, dtype=x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, params)
