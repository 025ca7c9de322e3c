"""Sparsity projections against sort-based references: per tensor, N:M, global bisection."""

import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax.ops import projection
from admm_jax.ops.projection import (
    global_threshold,
    global_topk_masks,
    keep_count,
    nm_mask,
    prune_count,
    scores_of,
    topk_mask,
)

REPO = Path(__file__).resolve().parents[1]


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
    ints = rng.integers(0, 3, size=(16, 5)).astype(np.float32)  # ties inside groups
    for n, m in [(2, 4), (3, 8)]:
        mask = np.asarray(nm_mask(jnp.asarray(ints), n, m))
        for g in range(16 // m):
            for c in range(5):
                np.testing.assert_array_equal(mask[g * m:(g + 1) * m, c],
                                              sort_reference(ints[g * m:(g + 1) * m, c], n))
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
    # products that fall just below an integer in floating point: truncation would prune one
    # entry too few (0.29·100 = 28.999999999999996)
    for size, sparsity, pruned in ((100, 0.29, 29), (100, 0.57, 57), (1000, 0.58, 580),
                                   (10, 0.7, 7), (384, 0.9, 346), (3, 0.5, 2), (7, 0.0, 0)):
        assert prune_count(size, sparsity) == pruned, (size, sparsity)
        assert keep_count(size, sparsity) == size - pruned
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0\.0, 1\.0\)"):
            keep_count(10, bad)


def global_reference(scores, k):
    return sort_reference(np.concatenate([np.asarray(s, np.float32).reshape(-1)
                                          for s in scores]), k)


def flat(masks):
    return np.concatenate([np.asarray(m).reshape(-1) for m in masks])


@pytest.mark.parametrize("seed", [0, 1])
def test_global_many_ties_every_k(seed):
    """Three score levels over arrays of several ranks (a scalar included): nearly every k cuts
    through a block of ties, in the middle of an array or at an array boundary."""
    rng = np.random.default_rng(seed)
    shapes = [(6, 4), (), (10,), (0, 3), (3, 2, 4), (5, 5)]
    scores = [rng.integers(0, 3, size=s).astype(np.float32) for s in shapes]
    total = sum(s.size for s in scores)
    for k in range(total + 1):
        masks = global_topk_masks([jnp.asarray(s) for s in scores], k)
        assert [m.shape for m in masks] == [s.shape for s in scores]
        np.testing.assert_array_equal(flat(masks), global_reference(scores, k), err_msg=f"k={k}")


def test_global_all_equal_and_signed_scores():
    ones = [np.ones((4, 8), np.float32), np.ones(5, np.float32)]
    for k in (1, 13, 36, 37):
        np.testing.assert_array_equal(flat(global_topk_masks(ones, k)), global_reference(ones, k))
    rng = np.random.default_rng(3)
    signed = [rng.normal(size=(7, 3)).astype(np.float32) * 1e30,
              np.array([0.0, -0.0, np.inf, -np.inf, 2e-38, -2e-38, 3.0, np.inf], np.float32),
              rng.normal(size=(9,)).astype(np.float32) * 1e-30]
    signed[2][:3] = -0.0
    values = np.sort(np.concatenate([s.reshape(-1) for s in signed]))[::-1]
    for k in range(1, values.size + 1):
        np.testing.assert_array_equal(flat(global_topk_masks(signed, k)),
                                      global_reference(signed, k), err_msg=f"k={k}")
        assert float(global_threshold(signed, k)) == values[k - 1]


def test_score_fn_matches_precomputed_scores():
    rng = np.random.default_rng(4)
    vs = [rng.normal(size=s).astype(np.float32) for s in [(8, 6), (12,), (2, 3, 4)]]
    hs = [rng.uniform(size=v.shape).astype(np.float32) for v in vs]
    vs[1][:5] = vs[0][0, 0]
    hs[1][:5] = hs[0][0, 0]  # equal h·v² across arrays
    pairs = list(zip(vs, hs))

    def weighted(pair):
        return scores_of(*pair)

    for k in (1, 20, 40, 71, 72):
        want = global_topk_masks([scores_of(v, h) for v, h in pairs], k)
        got = global_topk_masks(pairs, k, score_fn=weighted)
        np.testing.assert_array_equal(flat(got), flat(want))
        got_sq = global_topk_masks(vs, k, score_fn=jnp.square)
        np.testing.assert_array_equal(flat(got_sq), global_reference([v ** 2 for v in vs], k))


def test_few_iterations_still_keep_exactly_k():
    rng = np.random.default_rng(5)
    scores = [rng.normal(size=(30, 20)).astype(np.float32) ** 2, rng.uniform(size=50)]
    exact = flat(global_topk_masks(scores, 123))
    np.testing.assert_array_equal(flat(global_topk_masks(scores, 123, iters=32)), exact)
    np.testing.assert_array_equal(exact, global_reference(scores, 123))
    for iters in (1, 4, 12):
        assert flat(global_topk_masks(scores, 123, iters=iters)).sum() == 123


def test_topk_mask_is_sharding_friendly_bisection():
    rng = np.random.default_rng(6)
    score = rng.integers(0, 5, size=(3, 4, 5)).astype(np.float32)
    for k in (0, 1, 17, 59, 60):
        np.testing.assert_array_equal(np.asarray(topk_mask(jnp.asarray(score), k)).reshape(-1),
                                      sort_reference(score.reshape(-1), k))
    assert bool(topk_mask(jnp.float32(2.0), 1))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 12\]"):
        global_topk_masks([jnp.ones((3, 4))], 13)
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 12\]"):
        topk_mask(jnp.ones((3, 4)), -1)
    assert int(global_topk_masks([jnp.ones((3, 4))], np.int64(5))[0].sum()) == 5
    with pytest.raises(TypeError, match="k must be an integer"):
        global_topk_masks([jnp.ones((3, 4))], 2.0)
    with pytest.raises(ValueError, match="iters must be"):
        global_topk_masks([jnp.ones(3)], 1, iters=0)
    with pytest.raises(ValueError, match="k must be ≥ 1"):
        global_threshold([jnp.ones(3)], 0)
    with pytest.raises(TypeError, match="list of arrays"):
        global_topk_masks(jnp.ones(3), 1)
    with pytest.raises(TypeError, match="real array"):
        global_topk_masks([jnp.ones(3, jnp.complex64)], 1)


def test_wide_counts_beyond_int32():
    """Totals are (high, low) int32 pairs: exact far beyond 2³¹ (e.g. a 7 B-parameter model)."""
    def value(w):
        return int(w[0]) * 2**16 + int(w[1])

    big = [7_000_000_000, 2**31 + 5, 123_456, 0, 65_535, 65_536]
    for a in big:
        assert value(projection._wide_const(a)) == a
        for b in big:
            wa, wb = projection._wide_const(a), projection._wide_const(b)
            assert value(projection._wadd(wa, wb)) == a + b
            assert value(projection._wsub(wa, wb)) == a - b
            assert bool(projection._wge(wa, wb)) == (a >= b)
            bound = jnp.int32(min(b, 2**31 - 1))
            assert int(projection._wclip(projection._wsub(wa, wb), bound)) == \
                min(max(a - b, 0), int(bound))
    counts = [jnp.int32(2**31 - 1)] * 4
    assert value(projection._wsum(counts)) == 4 * (2**31 - 1)


def test_global_projection_stores_no_scores():
    """With ``score_fn`` the compiled program's temporary memory stays far below the size of
    the scores (the count passes fuse the score into the compare; the tie-break builds no
    per-entry rank)."""
    shapes = [(512, 256), (256, 512), (1024,), (128, 3, 64)]
    leaves = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    k = keep_count(sum(int(np.prod(s)) for s in shapes), 0.9)
    compiled = jax.jit(lambda ls: global_topk_masks(ls, k, score_fn=jnp.square)).lower(
        leaves).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("backend reports no memory analysis")
    scores_bytes = 4 * sum(int(np.prod(s)) for s in shapes)
    assert analysis.temp_size_in_bytes < scores_bytes / 8, analysis.temp_size_in_bytes


def test_sharded_projections_match_unsharded(run_on_cpu_devices):
    """On 8 CPU devices, scores sharded in several ways (2-D mesh, either axis, replicated):
    global (with and without ``score_fn``, with ties), per-tensor and N:M masks equal the
    unsharded ones, come out sharded like their inputs, and the compiled global projection
    gathers nothing (only scalar all-reduces)."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from admm_jax.ops.projection import global_topk_masks, nm_mask, scores_of, topk_mask
        assert jax.device_count() == 8, jax.devices()
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
        specs = [P("a", "b"), P(None, ("a", "b")), P("b"), P(), P("a", None, "b")]
        shapes = [(64, 32), (16, 64), (32,), (5, 3), (4, 6, 8)]
        rng = np.random.default_rng(0)
        vs = [rng.normal(size=s).astype(np.float32) for s in shapes]
        hs = [rng.uniform(size=s).astype(np.float32) for s in shapes]
        tied = [np.round(v * 2) for v in vs]  # few levels: exercises the tie-break

        def put(xs, specs=specs):
            return [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(xs, specs)]

        def check(got, want, specs=specs):
            for g, w, s in zip(got, want, specs):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
                assert g.sharding.is_equivalent_to(NamedSharding(mesh, s), g.ndim), (
                    g.sharding, s)

        def weighted(p):
            return scores_of(*p)

        k = sum(v.size for v in vs) // 10
        for vals in (vs, tied):
            want = global_topk_masks(list(zip(vals, hs)), k, score_fn=weighted)
            f = jax.jit(lambda v, h: global_topk_masks(list(zip(v, h)), k, score_fn=weighted))
            check(f(put(vals), put(hs)), want)
            hlo = f.lower(put(vals), put(hs)).compile().as_text()
            assert "all-reduce" in hlo and "all-gather" not in hlo and "all-to-all" not in hlo
            scores = [v * v for v in vals]
            check(jax.jit(lambda s: global_topk_masks(s, k))(put(scores)),
                  global_topk_masks(scores, k))
        for v, s in zip(put(tied[:2]), specs[:2]):
            check([jax.jit(lambda x: topk_mask(x, 100))(v)], [topk_mask(np.asarray(v), 100)], [s])
        x = jax.device_put(tied[0], NamedSharding(mesh, specs[0]))
        check([jax.jit(lambda x: nm_mask(x, 2, 4))(x)], [nm_mask(tied[0], 2, 4)], specs[:1])
        print("ok")
    """)
    stdout = run_on_cpu_devices(script, 8, timeout=600)
    assert stdout.strip().endswith("ok")
