"""Sparsity projections: keep the k largest scores per tensor, globally over a pytree, or N:M.

A projection keeps the entries with the largest *score* and zeroes the rest. The score is ``v²``
(magnitude pruning) or, for objective-aware projection (ELSA), ``h·v²`` with ``h`` a diagonal
Hessian estimate such as Adam's second moment.

No projection sorts the whole model:

* per tensor: ``lax.top_k`` on the flattened scores (O(N log k));
* global: a threshold found by bisection on counts (:func:`global_threshold`, O(N·iters), each
  count an elementwise compare + sum, so it runs on sharded parameters), then exactly ``k``
  entries are kept — ties at the threshold are broken by position (pytree flatten order, then
  row-major), earliest first;
* N:M: within every group of M consecutive entries along the input dimension (axis 0 of a
  ``[in, out]`` kernel), the N largest (ties: earliest).

A projection never keeps more than the allowed number of non-zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _check_sparsity(sparsity) -> None:
    if isinstance(sparsity, (int, float)) and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")


def keep_count(size: int, sparsity: float) -> int:
    """Entries kept at ``sparsity``: ``size − floor(sparsity·size)`` (at least one pruned entry
    per full ``1/sparsity`` block, never more kept than allowed)."""
    _check_sparsity(sparsity)
    return size - int(sparsity * size)


def topk_mask(score: Array, k: int) -> Array:
    """Bool mask of the ``k`` largest entries of ``score`` (ties: lowest flat index first)."""
    flat = score.reshape(-1)
    if not 0 <= k <= flat.size:
        raise ValueError(f"k must be in [0, {flat.size}], got {k}")
    if k == 0:
        return jnp.zeros(score.shape, bool)
    _, idx = lax.top_k(flat, k)
    return jnp.zeros(flat.shape, bool).at[idx].set(True).reshape(score.shape)


def nm_mask(score: Array, n: int, m: int) -> Array:
    """N:M mask of a ``[in, out]`` matrix: in every group of ``m`` consecutive input rows of each
    output column, the ``n`` largest scores (ties: earliest row)."""
    if score.ndim != 2:
        raise ValueError(f"N:M sparsity needs a 2-D [in, out] matrix, got shape {score.shape}")
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < n < m, got {n}:{m}")
    d_in, d_out = score.shape
    if d_in % m:
        raise ValueError(f"M = {m} must divide the input dimension {d_in} for {n}:{m} sparsity")
    groups = score.reshape(d_in // m, m, d_out).transpose(0, 2, 1)  # [G, out, m]
    _, idx = lax.top_k(groups, n)  # [G, out, n]
    mask = jnp.zeros(groups.shape, bool)
    mask = jnp.put_along_axis(mask, idx, True, axis=-1, inplace=False)
    return mask.transpose(0, 2, 1).reshape(d_in, d_out)


def global_threshold(scores: list[Array], k: int, iters: int = 64) -> Array:
    """The largest ``t`` with ``#{score ≥ t} ≥ k`` over all ``scores``, by bisection on counts.

    After ``iters`` halvings of ``[0, max score]`` the bracket is below float32 resolution for
    any practical range, so ``#{score > t} ≤ k ≤ #{score ≥ t}`` up to ties at ``t``.
    """
    hi = jnp.max(jnp.stack([s.max() for s in scores])).astype(jnp.float32)
    lo = jnp.zeros((), jnp.float32)

    def count_ge(t):
        return sum(jnp.sum(s >= t, dtype=jnp.int32) for s in scores)

    def body(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        enough = count_ge(mid) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, hi = lax.fori_loop(0, iters, body, (lo, hi))
    return jnp.where(count_ge(hi) >= k, hi, lo)


def global_topk_masks(scores: list[Array], k: int, iters: int = 64) -> list[Array]:
    """Masks keeping exactly ``k`` entries across ``scores`` (largest first; ties at the
    threshold by position: list order, then row-major)."""
    total = sum(s.size for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}], got {k}")
    if k == 0:
        return [jnp.zeros(s.shape, bool) for s in scores]
    t = global_threshold(scores, k, iters)
    above = [s > t for s in scores]
    remaining = k - sum(jnp.sum(a, dtype=jnp.int32) for a in above)
    masks, taken = [], jnp.zeros((), jnp.int32)
    for s, a in zip(scores, above):
        tie = (s == t).reshape(-1)
        rank = jnp.cumsum(tie, dtype=jnp.int32) + taken  # 1-based global position among ties
        masks.append(a | (tie & (rank <= remaining)).reshape(s.shape))
        taken = taken + jnp.sum(tie, dtype=jnp.int32)
    return masks


def scores_of(v: Array, curvature: Array | None = None) -> Array:
    """``v²`` or, with a diagonal Hessian estimate ``h``, ``h·v²``."""
    v2 = jnp.square(v.astype(jnp.float32))
    return v2 if curvature is None else curvature.astype(jnp.float32) * v2
