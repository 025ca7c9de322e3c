"""SpaRC compressors: Eckart–Young for SVD_r, exact top-k, SpaRC never worse than either pure
compressor, planted-rank recovery, the unimodality fallback against brute force, the batched
paths, the quality metric M(C) and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax.sparc import (
    CompressorQuality,
    compressor,
    compressor_quality,
    exact_parts,
    is_unimodal,
    low_rank_dense,
    reconstruct,
    sparc_budget,
    sparc_compress,
    sparc_compress_dict,
    sparc_compress_stack,
    sparse_dense,
    svd_compress,
    topk_compress,
)

M, N = 48, 80


def gaussian(seed, m=M, n=N):
    return np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)


def gradient_like(seed):
    """Heavy-tailed product of random factors with a decaying spectrum, noise and outliers."""
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal((M, 8)) * np.exp(-np.arange(8) / 2)) @ rng.standard_t(2, (8, N))
    g += 0.1 * rng.standard_normal((M, N))
    g.ravel()[rng.choice(M * N, 30, replace=False)] += 5 * rng.standard_t(1, 30)
    return g.astype(np.float32)


def planted(seed, rank=3, nnz=60):
    """Dense rank-``rank`` plus ``nnz`` spikes of magnitude 5–10 on a random support."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((M, rank)) @ rng.standard_normal((rank, N))
    sparse = np.zeros(M * N)
    support = rng.choice(M * N, nnz, replace=False)
    sparse[support] = rng.choice([-1, 1], nnz) * rng.uniform(5, 10, nnz)
    return (low + sparse.reshape(M, N)).astype(np.float32), np.sort(support)


def non_unimodal():
    """Blocks on disjoint rows and columns, so the spectrum is their union: a dense rank-1 block
    (σ ≈ 15.5, worth one rank), three single spikes (σ = 12, 11, 10: ranks 2–4 wasted on what
    one sparse entry holds), a weaker dense block (rank 5) and ±0.5 noise that sparse entries
    fit. The one-step error over r = 0..8 is then low at 1, peaks at 4, dips at 6."""
    rng = np.random.default_rng(0)
    g = np.zeros((M, N))
    g[0:10, 0:24] = 1.0
    g[10:20, 24:48] = 0.6
    g[[20, 21, 22], [48, 49, 50]] = [12.0, 11.0, 10.0]
    g[23:, 51:] = 0.5 * rng.choice([-1, 1], (25, 29)) * (1 + 0.02 * rng.random((25, 29)))
    return g.astype(np.float32)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def svd_error(g, rank):
    s = np.linalg.svd(np.float64(g), compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)))


def topk_error(g, k):
    a = np.sort(np.abs(np.float64(g)).ravel())[::-1]
    return float(np.sqrt(np.sum(a[k:] ** 2) / np.sum(a**2)))


def reference_curve(g, p):
    """One-step alternating-projection relative error for every r (float64 NumPy)."""
    g = np.float64(g)
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    errors = []
    for r in range(p // sum(g.shape) + 1):
        resid = np.abs(g - (u[:, :r] * s[:r]) @ vt[:r]).ravel()
        errors.append(np.sqrt(np.sum(np.sort(resid)[::-1][p - r * sum(g.shape):] ** 2)))
    return np.array(errors) / np.linalg.norm(g)


def alg1_ranks(curve):
    """Alg. 1's bisection on a given curve: (its rank, the ranks it evaluates, endpoints too)."""
    left, right = 0, len(curve) - 1
    seen = {left, right}
    while left < right:
        m1 = left + (right - left) // 2
        seen |= {m1, m1 + 1}
        left, right = (left, m1) if curve[m1] < curve[m1 + 1] else (m1 + 1, right)
    return left, sorted(seen)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rank", [1, 5, 20])
def test_svd_compress_is_the_eckart_young_optimum(seed, rank):
    g = gradient_like(seed) if seed else gaussian(seed)
    f = svd_compress(g, rank)
    assert f.u.shape == (M, rank) and f.v.shape == (rank, N)
    assert rel(low_rank_dense(f), g) == pytest.approx(svd_error(g, rank), rel=1e-4)
    u, s, vt = np.linalg.svd(np.float64(g), full_matrices=False)
    truncated = (u[:, :rank] * s[:rank]) @ vt[:rank]
    assert rel(low_rank_dense(f), truncated) < 1e-5
    # Σ split evenly: squared column norms of u and row norms of v are both σ
    np.testing.assert_allclose(np.sum(np.asarray(f.u) ** 2, 0), s[:rank], rtol=1e-4)
    np.testing.assert_allclose(np.sum(np.asarray(f.v) ** 2, 1), s[:rank], rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 37, 500])
def test_topk_keeps_exactly_the_k_largest(seed, k):
    g = gaussian(seed)
    e = topk_compress(g, k)
    flat = np.asarray(e.rows) * N + np.asarray(e.cols)
    assert e.values.shape == (k,) and e.rows.dtype == jnp.int32 and len(set(flat)) == k
    np.testing.assert_array_equal(np.asarray(e.values), g[e.rows, e.cols])
    np.testing.assert_array_equal(np.sort(flat), np.sort(np.argsort(-np.abs(g).ravel())[:k]))
    assert rel(sparse_dense(e, g.shape), g) == pytest.approx(topk_error(g, k), rel=1e-5)


def test_topk_breaks_ties_by_lowest_row_major_index():
    g = np.array([[1.0, -2.0, 2.0], [2.0, -2.0, 0.5]], np.float32)
    e = topk_compress(g, 3)
    np.testing.assert_array_equal(np.asarray(e.rows), [0, 0, 1])
    np.testing.assert_array_equal(np.asarray(e.cols), [1, 2, 0])


@pytest.mark.parametrize("kind", ["gaussian", "gradient_like"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [{"r_max": 4}, {"density": 0.1}])
def test_sparc_is_never_worse_than_svd_or_topk(kind, seed, budget):
    g = {"gaussian": gaussian, "gradient_like": gradient_like}[kind](seed)
    p = sparc_budget(g.shape, **budget)
    res = sparc_compress(g, p)
    best_pure = min(svd_error(g, p // (M + N)), topk_error(g, p))
    assert float(res.rel_error) <= best_pure + 1e-6
    assert rel(reconstruct(res), g) == pytest.approx(float(res.rel_error), rel=1e-4)
    assert int(res.rank) * (M + N) + int(res.nnz) == p
    assert float(res.rel_error) == pytest.approx(float(np.nanmin(res.error_curve)), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_low_rank_plus_sparse_beats_both_and_finds_the_rank(seed):
    g, support = planted(seed)
    p = 3 * (M + N) + 60
    res = sparc_compress(g, p)
    assert int(res.rank) == 3 and int(res.nnz) == 60
    assert float(res.rel_error) < 0.5 * min(svd_error(g, 3), topk_error(g, p))
    refined = sparc_compress(g, p, n_iter=10)
    assert int(refined.rank) == 3 and float(refined.rel_error) < 1e-4
    low, sparse = exact_parts(refined)
    assert low.u.shape == (M, 3) and low.v.shape == (3, N) and sparse.values.shape == (60,)
    np.testing.assert_array_equal(np.sort(np.asarray(sparse.rows) * N + sparse.cols), support)


@pytest.mark.parametrize("make", [lambda: gaussian(3), lambda: gradient_like(4), non_unimodal])
def test_scan_and_bisect_match_brute_force(make):
    g = make()
    p = sparc_budget(g.shape, r_max=8)
    curve = reference_curve(g, p)
    scanned = sparc_compress(g, p, search="scan")
    np.testing.assert_allclose(np.asarray(scanned.error_curve), curve, rtol=1e-4, atol=1e-6)
    assert int(scanned.rank) == int(np.argmin(curve))
    bisected = sparc_compress(g, p)
    assert int(bisected.rank) == int(np.argmin(curve))
    seen = ~np.isnan(np.asarray(bisected.error_curve))
    np.testing.assert_allclose(np.asarray(bisected.error_curve)[seen], curve[seen], rtol=1e-4)
    # the flag judges the evaluated points only: a unimodal curve is never flagged, while a
    # flagged one has a second mode among the ranks evaluated
    assert bool(bisected.unimodal) or not bool(is_unimodal(curve))
    assert bool(bisected.unimodal) or seen.all()


def test_non_unimodal_curve_is_flagged_and_falls_back_to_the_full_scan():
    g = non_unimodal()
    p = sparc_budget(g.shape, r_max=8)
    curve = reference_curve(g, p)
    alg1_rank, seen = alg1_ranks(curve)
    assert (alg1_rank, int(np.argmin(curve))) == (6, 1)
    assert int(np.argmin(curve[seen])) == 0  # the best rank Alg. 1 sees is not the best either
    res = sparc_compress(g, p)
    assert not bool(res.unimodal)
    assert not np.any(np.isnan(res.error_curve))  # every rank was evaluated
    assert int(res.rank) == 1
    assert float(res.rel_error) < 0.7 * curve[seen].min()


def test_unimodal_curve_is_flagged_without_a_full_scan():
    res = sparc_compress(gaussian(5), sparc_budget((M, N), r_max=16))
    assert bool(res.unimodal) and int(np.sum(np.isnan(res.error_curve))) > 0


@pytest.mark.parametrize("curve, expected", [
    ([3.0, 2.0, 1.0, 2.0, 3.0], True),
    ([1.0, 1.0, 1.0], True),
    ([5.0, 4.0, 4.0, 4.0, 6.0], True),
    ([1.0, 2.0, 1.0], False),
    ([1.0, np.nan, 2.0, np.nan, 1.0], False),
    ([1.0, np.nan, 2.0, np.nan, 3.0], True),
    ([np.nan, 0.3, np.nan], True),
    ([0.5, 0.5 + 1e-6, 0.5], True),  # within the float-noise slack
    ([0.5, 0.4, 0.45, 0.3, 0.6], False),
])
def test_is_unimodal_on_given_sequences(curve, expected):
    assert bool(is_unimodal(np.array(curve))) is expected
    assert bool(jax.jit(is_unimodal)(np.array(curve))) is expected


def assert_results_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stack_path_equals_the_per_matrix_path():
    gs = np.stack([gaussian(6), gradient_like(7), non_unimodal(), planted(8)[0]])
    p = sparc_budget((M, N), r_max=8)
    stacked = sparc_compress_stack(gs, p)
    assert stacked.error_curve.shape == (4, 9) and stacked.sparse.values.shape == (4, p)
    for i, g in enumerate(gs):
        assert_results_equal(jax.tree.map(lambda a, i=i: a[i], stacked), sparc_compress(g, p))


def test_dict_path_groups_by_shape_and_keeps_order():
    mats = {"q": gaussian(9), "up": gaussian(10, 32, 48), "k": gradient_like(11),
            "down": gaussian(12, 32, 48)}
    out = sparc_compress_dict(mats, r_max=3)
    assert list(out) == list(mats)
    for name, g in mats.items():
        assert_results_equal(out[name], sparc_compress(g, sparc_budget(g.shape, r_max=3)))


def test_compression_runs_under_an_outer_jit():
    g = gradient_like(13)
    p = sparc_budget(g.shape, r_max=4)
    traced = jax.jit(lambda x: sparc_compress(x, p).rel_error)(g)
    assert float(traced) == pytest.approx(float(sparc_compress(g, p).rel_error), rel=1e-6)


def test_refinement_never_increases_the_error():
    g = gradient_like(14)
    p = sparc_budget(g.shape, r_max=6)
    errors = [float(sparc_compress(g, p, n_iter=t).rel_error) for t in (1, 2, 5)]
    assert errors[0] >= errors[1] - 1e-6 >= errors[2] - 2e-6
    assert errors[2] < errors[0]


def test_quality_metric_on_a_hand_computable_case():
    # Top_1: g1 keeps 4 (‖C‖² = 16, error² = 9); g2 keeps 2 (‖C‖² = 4, error² = 1)
    samples = np.array([[[3.0, 0.0], [0.0, 4.0]], [[1.0, 2.0], [0.0, 0.0]]], np.float32)
    top1 = lambda x: sparse_dense(topk_compress(x, 1), x.shape)
    q = compressor_quality(samples, top1)
    assert isinstance(q, CompressorQuality)
    assert float(q.metric) == pytest.approx(((16 - 2 * 9) + (4 - 2 * 1)) / 2)
    assert float(compressor_quality(list(samples), top1, mu=0.5).metric) == pytest.approx(2.5)
    assert float(q.rel_sq_error) == pytest.approx((9 / 25 + 1 / 5) / 2)
    assert float(q.rel_error) == pytest.approx((3 / 5 + 1 / np.sqrt(5)) / 2)
    # a two-layer sample: norms add over layers
    layered = compressor_quality([{"a": samples[0], "b": samples[1]}], top1)
    assert float(layered.metric) == pytest.approx((16 + 4) - 2 * (9 + 1))
    assert float(layered.rel_sq_error) == pytest.approx(10 / 30)


def test_quality_metric_of_svd_matches_the_spectrum():
    gs = np.stack([gradient_like(s) for s in (15, 16, 17)])
    q = compressor_quality(gs, compressor("svd", r_max=4), mu=2.0)
    spectra = [np.linalg.svd(np.float64(g), compute_uv=False) ** 2 for g in gs]
    # rank ⌊p/(m+n)⌋ = 4: M = Σ_{i≤4} σ² − (1 + μ)Σ_{i>4} σ²
    expected = np.mean([s[:4].sum() - 3 * s[4:].sum() for s in spectra])
    assert float(q.metric) == pytest.approx(expected, rel=1e-4)


def test_sparc_has_the_best_quality_at_a_shared_budget():
    gs = np.stack([gradient_like(s) for s in (18, 19)])
    q = {k: compressor_quality(gs, compressor(k, r_max=4)) for k in ("sparc", "svd", "topk")}
    assert float(q["sparc"].metric) >= max(float(q["svd"].metric), float(q["topk"].metric))
    assert float(q["sparc"].rel_error) <= min(float(q["svd"].rel_error),
                                              float(q["topk"].rel_error)) + 1e-6


def test_budget_helper():
    assert sparc_budget((M, N), r_max=8) == 8 * (M + N)
    assert sparc_budget((M, N), density=0.1) == 384
    assert sparc_budget((M, N), density=1.0) == M * N
    assert sparc_budget((10, 10), density=0.205) == 21  # nearest integer, not truncation


@pytest.mark.parametrize("kwargs, match", [
    ({"r_max": 0}, r"r_max must be an integer in \[1"),
    ({"r_max": 31}, r"budget must be in \[m \+ n, m·n\] = \[128, 3840\]"),
    ({"density": 0.0}, r"density must be in \(0.0, 1.0\]"),
    ({"density": 1.5}, r"density must be in \(0.0, 1.0\]"),
    ({"density": 0.01}, r"budget must be in .* got 38"),
    ({}, "exactly one of r_max or density"),
    ({"r_max": 2, "density": 0.1}, "exactly one of r_max or density"),
])
def test_budget_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparc_budget((M, N), **kwargs)


def test_bad_input_errors():
    g = gaussian(20)
    with pytest.raises(ValueError, match=r"budget must be in .* got 127"):
        sparc_compress(g, M + N - 1)
    with pytest.raises(ValueError, match=r"budget must be in .* got 3841"):
        sparc_compress(g, M * N + 1)
    with pytest.raises(ValueError, match="g must have 2 dims, got shape"):
        sparc_compress(g[0], 200)
    with pytest.raises(ValueError, match="gs must have 3 dims, got shape"):
        sparc_compress_stack(g, 200)
    for bad in (np.nan, np.inf):
        g_bad = g.copy()
        g_bad[3, 4] = bad
        with pytest.raises(ValueError, match="g must be finite"):
            sparc_compress(g_bad, 200)
        with pytest.raises(ValueError, match="g must be finite"):
            svd_compress(g_bad, 2)
    with pytest.raises(ValueError, match="search must be one of"):
        sparc_compress(g, 200, search="golden")
    with pytest.raises(ValueError, match=r"n_iter must be an integer in \[1"):
        sparc_compress(g, 200, n_iter=0)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 48\]"):
        svd_compress(g, 49)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 3840\]"):
        topk_compress(g, 0)
    with pytest.raises(ValueError, match="matrix 'x' must have 2 dims"):
        sparc_compress_dict({"x": g[None]}, r_max=2)
    with pytest.raises(ValueError, match=r"mu must be in \(0.0, inf\)"):
        compressor_quality([g], compressor("svd", r_max=2), mu=0.0)
    with pytest.raises(ValueError, match="samples must be non-empty"):
        compressor_quality([], compressor("svd", r_max=2))
    with pytest.raises(ValueError, match="kind must be one of"):
        compressor("rosa", r_max=2)
