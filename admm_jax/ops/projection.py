"""Sparsity projections: keep the k largest scores per tensor, globally over a pytree, or N:M.

A projection keeps the entries with the largest *score* and zeroes the rest. The score is ``v²``
(magnitude pruning) or, for objective-aware projection (ELSA), ``h·v²`` with ``h`` a diagonal
Hessian estimate such as Adam's second moment.

No projection sorts the whole model, and every one is built from elementwise compares and
reductions, so it runs on parameters sharded over a mesh without gathering them (the masks come
out sharded like the scores):

* per tensor (:func:`topk_mask`) and global (:func:`global_topk_masks`): the k-th largest score is
  found by bisection on counts (:func:`global_threshold`) over the 2³² float32 bit patterns, so
  32 passes of ``#{score ≥ t}`` find it exactly; then exactly ``k`` entries are kept — ties at the
  threshold are broken by position (list order, then row-major), earliest first. With
  ``score_fn`` the scores are recomputed inside every count instead of stored, and the tie-break
  locates its cut by counts too (never a per-entry rank), so the memory beyond the bool masks is
  a few small partial counts;
* N:M (:func:`nm_mask`): within every group of M consecutive entries along the input dimension
  (axis 0 of a ``[in, out]`` kernel), the N largest (ties: earliest), by ranking each entry
  against the other M − 1 of its group.

A projection never keeps more than the allowed number of non-zeros.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from admm_jax._checks import check_int, check_real

Array = jax.Array

_KEY_BITS = 32  # bisection steps that pin any float32 threshold exactly
_LIMB = 16  # counts are (high, low) int32 pairs, value = high·2¹⁶ + low, so totals reach 2⁴⁷
_LOW = (1 << _LIMB) - 1
_MAX_LEAF = 2**31 - 1  # per-tensor counts are int32
_SUBNORMAL_KEYS = 1 << 23  # keys of |value| < 2⁻¹²⁶ lie in [−2²³, 2²³)


def prune_count(size: int, sparsity: float) -> int:
    """Entries pruned at ``sparsity``: the nearest integer to ``sparsity·size`` (halves round
    up), so the achieved sparsity is the closest one a tensor of ``size`` entries allows.

    The rounding is done on ``sparsity·size + 1/2`` in float64, so a product such as
    ``0.29 · 100 = 28.999999999999996`` counts 29 — truncation would prune 28. Every pruning
    count of the library (per tensor, per output, global, SparseGPT's cumulative block counts)
    goes through this one rule.
    """
    sparsity = check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
    check_int("size", size, 0)
    return min(size, math.floor(sparsity * size + 0.5))


def keep_count(size: int, sparsity: float) -> int:
    """Entries kept at ``sparsity``: ``size − prune_count(size, sparsity)``."""
    return size - prune_count(size, sparsity)


def topk_mask(score: Array, k: int, iters: int = _KEY_BITS) -> Array:
    """Bool mask of the ``k`` largest entries of ``score`` (ties: lowest flat index first).

    The threshold bisection of :func:`global_topk_masks` on one tensor: 32 elementwise passes,
    no sort and no scatter, and the mask is sharded like ``score``. (``lax.top_k`` is faster
    only for very small ``k``: it is O(size·log k) but sort-based, 20–100× slower than the
    bisection at 50–90 % sparsity on CPU.)
    """
    return global_topk_masks([score], k, iters)[0]


def nm_mask(score: Array, n: int, m: int) -> Array:
    """N:M mask of a ``[in, out]`` matrix: in every group of ``m`` consecutive input rows of each
    output column, the ``n`` largest scores (ties: earliest row).

    An entry is kept when fewer than ``n`` entries of its group beat it (larger, or equal and
    earlier): ``m`` elementwise compares per entry, so the mask keeps the sharding of ``score``.
    """
    if score.ndim != 2:
        raise ValueError(f"N:M sparsity needs a 2-D [in, out] matrix, got shape {score.shape}")
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < n < m, got {n}:{m}")
    d_in = score.shape[0]
    if d_in % m:
        raise ValueError(f"M = {m} must divide the input dimension {d_in} for {n}:{m} sparsity")
    return _nm_jit(score, n, m)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _nm_jit(score: Array, n: int, m: int) -> Array:
    d_in, d_out = score.shape
    groups = score.reshape(d_in // m, m, d_out)  # [G, m, out]
    position = lax.broadcasted_iota(jnp.int32, (1, m, 1), 1)
    beaten_by = jnp.zeros(groups.shape, jnp.int32)
    for j in range(m):
        other = groups[:, j:j + 1, :]
        beaten_by += (other > groups) | ((other == groups) & (j < position))
    return (beaten_by < n).reshape(d_in, d_out)


# --- exact counts beyond int32: (high, low) pairs ------------------------------------------------

def _wide(x) -> tuple[Array, Array]:
    """An int (Python or int32 array) as a normalised (high, low) pair."""
    if isinstance(x, int):
        return jnp.int32(x >> _LIMB), jnp.int32(x & _LOW)
    return x >> _LIMB, x & _LOW


def _wide_const(x: int) -> tuple[Array, Array]:
    """A Python int as a (high, low) pair of concrete arrays (a traced argument, not a constant,
    so a new ``k`` does not recompile)."""
    return jnp.asarray(x >> _LIMB, jnp.int32), jnp.asarray(x & _LOW, jnp.int32)


def _wadd(a, b):
    low = a[1] + b[1]
    return a[0] + b[0] + (low >> _LIMB), low & _LOW


def _wsub(a, b):
    low = a[1] - b[1]
    return a[0] - b[0] + (low >> _LIMB), low & _LOW  # arithmetic shift borrows


def _wge(a, b) -> Array:
    return (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] >= b[1]))


def _weq(a, b) -> Array:
    return (a[0] == b[0]) & (a[1] == b[1])


def _wclip(a, bound: Array) -> Array:
    """``clip(a, 0, bound)`` as int32 (``bound`` an int32 ≥ 0)."""
    inside = a[0] * (1 << _LIMB) + a[1]  # wraps only where it is not selected
    return jnp.where(a[0] < 0, 0, jnp.where(_wge(a, _wide(bound)), bound, inside))


def _wsum(counts) -> tuple[Array, Array]:
    return functools.reduce(_wadd, (_wide(c) for c in counts), _wide(0))


# --- float32 order as int32 order ----------------------------------------------------------------

def _key(x: Array) -> Array:
    """int32 keys ordered like the float32 values: the bit pattern, with the negative half's
    magnitude bits flipped."""
    bits = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _value(key: Array) -> Array:
    """Inverse of :func:`_key`, with subnormal values flushed to 0 (XLA compares subnormals as
    zeros on CPU and GPU, so a subnormal threshold would only be an alias of 0)."""
    value = lax.bitcast_convert_type(jnp.where(key < 0, key ^ 0x7FFFFFFF, key), jnp.float32)
    return jnp.where((key >= -_SUBNORMAL_KEYS) & (key < _SUBNORMAL_KEYS), 0.0, value)


# --- global bisection ---------------------------------------------------------------------------

def _count(mask: Array) -> Array:
    """``#True`` of a bool array, as int32.

    Summed first in short int16 stages along the last axis (groups of ≤ 16, two stages), then
    in int32: XLA:CPU fuses the compare that makes ``mask`` into such narrow reductions, while a
    direct int32 sum materialises an int32 copy of the whole mask (4 bytes per entry, and 10×
    slower). Elsewhere it is just a sum.
    """
    b = mask
    for _ in range(2):
        c = b.shape[-1]
        g = next((g for g in (16, 8, 4, 2) if c % g == 0 and c > g), None)
        if g is None:
            break
        b = jnp.sum(b.reshape(*b.shape[:-1], c // g, g), axis=-1, dtype=jnp.int16)
    return jnp.sum(b, dtype=jnp.int32)


def _before(shape: tuple[int, ...], position: Array) -> Array:
    """Bool mask of the entries at row-major position ``< position`` (``0 ≤ position ≤ size``).

    Compares the index digits lexicographically instead of building a flat index, so every op
    depends on ``position`` and XLA does not hoist an int32 index array out of a loop.
    """
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
    digits = [position // strides[0]] + [(position // strides[a]) % shape[a]
                                         for a in range(1, len(shape))]
    below = jnp.zeros(shape, bool)
    for axis in range(len(shape) - 1, -1, -1):
        index = lax.broadcasted_iota(jnp.int32, shape, axis)
        below = (index < digits[axis]) | ((index == digits[axis]) & below)
    return below


class _Scores:
    """Scores computed where they are used: ``score(i, *tie)`` is the float32 score of item ``i``
    (``score_fn(items[i])``, or the item itself), at least 1-D.

    Each use recomputes it from the item, passed through an optimisation barrier together with
    ``tie`` (values of the loop step or branch that uses it): XLA can then neither hoist the
    score out of the loop or branch nor merge it with another use, so it is fused into the
    compare that consumes it and no score array is ever stored.
    """

    def __init__(self, items: Sequence, score_fn: Callable | None):
        if isinstance(items, (jax.Array, dict)) or not isinstance(items, Sequence):
            raise TypeError("scores must be a list of arrays (or of score_fn inputs), got "
                            f"{type(items).__name__}")
        self.items = list(items)
        self.fn = score_fn if score_fn is not None else (lambda s: s)
        shapes = [jax.eval_shape(self.fn, item) for item in self.items]
        for i, sh in enumerate(shapes):
            if not isinstance(sh, jax.ShapeDtypeStruct) or not (
                    jnp.issubdtype(sh.dtype, jnp.floating)
                    or jnp.issubdtype(sh.dtype, jnp.integer)):
                raise TypeError(f"score {i} must be a real array, got {sh}")
            if sh.size > _MAX_LEAF:
                raise ValueError(f"score {i} has {sh.size} entries; at most {_MAX_LEAF} per "
                                 "array")
        self.shapes = [tuple(sh.shape) for sh in shapes]
        self.total = sum(int(sh.size) for sh in shapes)

    def __len__(self) -> int:
        return len(self.items)

    def __call__(self, i: int, *tie) -> Array:
        item, _ = lax.optimization_barrier((self.items[i], tie))
        s = jnp.asarray(self.fn(item)).astype(jnp.float32)
        return s.reshape(1) if s.ndim == 0 else s


def _bisect(score: _Scores, k, iters: int):
    """Keys ``lo < hi`` with ``#{score ≥ lo} ≥ k > #{score ≥ hi}``, and those two counts.

    Starts from ``[key(−∞), key(+∞) + 1]``, an interval of fewer than 2³² keys, so after
    ``iters ≥ 32`` halvings ``hi = lo + 1``: ``lo`` is exactly the k-th largest score.
    """
    lo = _key(jnp.float32(-jnp.inf))
    hi = _key(jnp.float32(jnp.inf)) + 1

    def body(_, state):
        lo, hi, n_lo, n_hi = state
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # ⌊(lo + hi)/2⌋ without overflow
        t = _value(mid)
        n_mid = _wsum(_count(score(i, mid) >= t) for i in range(len(score)))
        enough = _wge(n_mid, k)
        pick = functools.partial(jax.tree.map, lambda a, b: jnp.where(enough, a, b))
        return (pick(mid, lo), pick(hi, mid), pick(n_mid, n_lo), pick(n_hi, n_mid))

    state = (lo, hi, _wide(score.total), _wide(0))
    return lax.fori_loop(0, min(iters, _KEY_BITS), body, state)


def global_threshold(scores: list[Array], k: int, iters: int = 64, *,
                     score_fn: Callable | None = None) -> Array:
    """The largest ``t`` with ``#{score ≥ t} ≥ k`` over all ``scores`` — the k-th largest score —
    by bisection on counts.

    The search runs over the int32 keys that order the float32 values (the bit patterns with the
    negative half flipped): each step halves the key interval, so 32 steps pin the k-th largest
    value exactly, whatever the range of the scores (``iters`` > 32 changes nothing; fewer
    steps give a lower bound). Each step is an elementwise compare and count per array — on
    sharded arrays, a local count and an all-reduce of scalars. ``score_fn``: see
    :func:`global_topk_masks`. Requires ``k ≥ 1``; scores must not be NaN.
    """
    score = _Scores(scores, score_fn)
    k = check_int("k", k, 0, score.total)
    check_int("iters", iters, 1)
    if k == 0:
        raise ValueError("k must be ≥ 1 for a threshold (every t keeps ≥ 0 entries)")
    return _threshold_jit(score.items, _wide_const(k), min(iters, _KEY_BITS), score_fn)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _threshold_jit(items, k, iters, score_fn):
    lo, *_ = _bisect(_Scores(items, score_fn), k, iters)
    return _value(lo)


def _position_cut(score: _Scores, i: int, band: Callable, allowed: Array) -> Array:
    """The smallest ``p`` with ``#{band entries of array i at row-major position < p} ≥
    allowed`` (``1 ≤ allowed ≤`` its band count), by bisection on counts: one pass of array
    ``i`` per halving of its size, O(1) memory."""
    size = int(math.prod(score.shapes[i]))

    def body(_, bracket):
        lo, hi = bracket
        mid = lo + (hi - lo) // 2
        s = score(i, mid)
        enough = _count(band(s) & _before(s.shape, mid)) >= allowed
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    steps = max(size - 1, 1).bit_length()  # ⌈log2 size⌉ halvings reach hi = lo + 1
    _, hi = lax.fori_loop(0, steps, body, (jnp.int32(0), jnp.int32(size)))
    return hi


def _first_in_band(score: _Scores, t_lo: Array, t_hi: Array, remaining) -> list[Array]:
    """Per array, the mask of its band entries (``t_lo ≤ s < t_hi``) that are among the first
    ``remaining`` band entries of all arrays, in list order then row-major.

    One pass counts the band entries of each array; the arrays before the cut keep all of
    theirs, those after it none, and in the one array the cut falls in, the cut position is
    found by bisection on counts (:func:`_position_cut`). No per-entry rank is ever built.
    """
    def band(s):
        return (s >= t_lo) & ~(s >= t_hi)  # t_hi is NaN (nothing above) when t_lo = +∞

    in_band = [_count(band(score(i, t_lo, t_hi))) for i in range(len(score))]
    keeps, before = [], _wide(0)
    for i, n_band in enumerate(in_band):
        allowed = _wclip(_wsub(remaining, before), n_band)
        before = _wadd(before, _wide(n_band))
        size = int(math.prod(score.shapes[i]))
        cut = lax.cond((0 < allowed) & (allowed < n_band),
                       functools.partial(_position_cut, score, i, band, allowed),
                       lambda allowed=allowed, size=size: jnp.where(allowed > 0, size, 0))
        s = score(i, cut)
        keeps.append((s >= t_hi) | (band(s) & _before(s.shape, cut)))
    return keeps


def global_topk_masks(scores: list[Array], k: int, iters: int = 64, *,
                      score_fn: Callable | None = None) -> list[Array]:
    """Masks keeping exactly ``k`` entries across ``scores`` (largest first; ties at the
    threshold by position: list order, then row-major).

    1. ``t`` = the k-th largest score, by bisection on counts (:func:`global_threshold`);
    2. if every entry equal to ``t`` fits (the usual case), the masks are ``score ≥ t``;
       otherwise entries ``> t`` are kept and the first ``k − #{> t}`` entries equal to ``t``
       (:func:`_first_in_band`).

    No concatenation, no sort, no per-entry rank: everything is elementwise compares and counts,
    so the memory beyond the bool masks is O(1) per array, and sharded scores give masks sharded
    the same way with only scalar all-reduces between devices.

    ``score_fn``: when given, ``scores`` holds its inputs and each score is recomputed inside
    every count instead of being stored, e.g. ``global_topk_masks(leaves, k,
    score_fn=jnp.square)`` or, for ``h·v²``, ``global_topk_masks(list(zip(vs, hs)), k,
    score_fn=lambda p: scores_of(*p))``. Precomputed ``scores`` built inside the same ``jax.jit``
    must be stored (4 bytes per entry); ``score_fn`` avoids that. ``iters`` < 32 stops the
    bisection early: still exactly ``k`` entries, but the lowest ones may not be the largest.
    Counts are exact up to 2⁴⁷ entries in all (below 2³¹ per array). Scores must not be NaN;
    subnormal scores count as 0 (XLA flushes them).
    """
    score = _Scores(scores, score_fn)
    k = check_int("k", k, 0, score.total)
    check_int("iters", iters, 1)
    if k == 0:
        return [jnp.zeros(shape, bool) for shape in score.shapes]
    return _topk_masks_jit(score.items, _wide_const(k), min(iters, _KEY_BITS), score_fn)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _topk_masks_jit(items, k, iters, score_fn):
    score = _Scores(items, score_fn)
    lo, hi, n_lo, n_hi = _bisect(score, k, iters)
    t_lo, t_hi = _value(lo), _value(hi)

    def all_band():
        return [score(i, t_lo) >= t_lo for i in range(len(score))]

    def first_in_band():
        return _first_in_band(score, t_lo, t_hi, _wsub(k, n_hi))

    masks = lax.cond(_weq(n_lo, k), all_band, first_in_band)
    return [m.reshape(shape) for m, shape in zip(masks, score.shapes)]


def scores_of(v: Array, curvature: Array | None = None) -> Array:
    """``v²`` or, with a diagonal Hessian estimate ``h``, ``h·v²``."""
    v2 = jnp.square(v.astype(jnp.float32))
    return v2 if curvature is None else curvature.astype(jnp.float32) * v2
