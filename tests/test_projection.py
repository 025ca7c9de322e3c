"""Sparsity projections against sort-based references: per tensor, N:M, global bisection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax.projection import (
    global_topk_masks,
    keep_count,
    nm_mask,
    scores_of,
    topk_mask,
)


def sort_reference(flat: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest; ties by lowest index (stable sort on −score)."""
    order = np.argsort(-flat, kind="stable")[:k]
    mask = np.zeros(flat.shape, bool)
    mask[order] = True
    return mask


@pytest.mark.parametrize("k", [0, 1, 7, 30])
def test_topk_equals_sort_reference_with_ties(k):
    rng = np.random.default_rng(0)
    score = rng.integers(0, 4, size=(5, 6)).astype(np.float32)  # many ties
    got = np.asarray(topk_mask(jnp.asarray(score), k))
    np.testing.assert_array_equal(got.reshape(-1), sort_reference(score.reshape(-1), k))
    assert got.sum() == k


def test_nm_patterns():
    rng = np.random.default_rng(1)
    score = rng.normal(size=(8, 3)).astype(np.float32) ** 2
    for n, m in [(2, 4), (4, 8), (1, 2)]:
        mask = np.asarray(nm_mask(jnp.asarray(score), n, m))
        groups = mask.reshape(8 // m, m, 3)
        assert (groups.sum(axis=1) == n).all()
        for g in range(8 // m):
            for c in range(3):
                block = score[g * m:(g + 1) * m, c]
                np.testing.assert_array_equal(groups[g, :, c], sort_reference(block, n))
    tied = np.ones((4, 1), np.float32)
    np.testing.assert_array_equal(np.asarray(nm_mask(jnp.asarray(tied), 2, 4))[:, 0],
                                  [True, True, False, False])
    with pytest.raises(ValueError, match="must divide the input dimension"):
        nm_mask(jnp.ones((6, 2)), 2, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(jnp.ones((8, 2)), 4, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_bisection_equals_global_sort(seed):
    rng = np.random.default_rng(seed)
    shapes = [(7, 5), (13,), (4, 4, 3)]
    scores = [rng.normal(size=s).astype(np.float32) ** 2 for s in shapes]
    scores[1][:4] = scores[0].reshape(-1)[0]  # ties across leaves
    total = sum(s.size for s in scores)
    for k in (1, total // 3, total // 2, total - 1, total):
        masks = global_topk_masks([jnp.asarray(s) for s in scores], k)
        flat = np.concatenate([np.asarray(m).reshape(-1) for m in masks])
        ref = sort_reference(np.concatenate([s.reshape(-1) for s in scores]), k)
        np.testing.assert_array_equal(flat, ref)


def test_global_masks_jit_and_exact_count():
    leaves = [jax.random.normal(jax.random.key(i), (64, 32)) ** 2 for i in range(3)]
    masks = jax.jit(lambda ls: global_topk_masks(ls, 1000))(leaves)
    assert sum(int(m.sum()) for m in masks) == 1000


def test_weighted_scores_keep_largest_h_v2():
    v = jnp.asarray([3.0, -1.0, 2.0, 0.5])
    h = jnp.asarray([0.01, 10.0, 1.0, 100.0])
    # v² = [9, 1, 4, .25]; h·v² = [.09, 10, 4, 25]
    np.testing.assert_array_equal(np.asarray(topk_mask(scores_of(v), 2)),
                                  [True, False, True, False])
    np.testing.assert_array_equal(np.asarray(topk_mask(scores_of(v, h), 2)),
                                  [False, True, False, True])


def test_keep_count_and_bad_sparsity():
    assert keep_count(100, 0.9) == 10
    assert keep_count(10, 0.0) == 10
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            keep_count(10, bad)
