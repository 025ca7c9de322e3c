"""Proximal operators: optimality conditions, closed forms, batching, fast-vs-exact accuracy, jit,
input validation."""

import re
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax.ops import prox

REPO = Path(__file__).resolve().parents[1]


def decaying(m, n, seed, noise=0.05, batch=()):
    """Trained-weight-like matrix: σ_i ∝ i^-½ with random singular vectors, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    u = np.linalg.qr(rng.standard_normal((*batch, m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((*batch, n, r)))[0]
    x = (u * np.arange(1, r + 1) ** -0.5) @ np.swapaxes(v, -1, -2)
    return jnp.asarray(x + noise * rng.standard_normal(x.shape) / np.sqrt(max(m, n)), jnp.float32)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                 / np.linalg.norm(np.asarray(b, np.float64)))


def sv(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


# --- soft-threshold --------------------------------------------------------------------------


def test_soft_threshold_closed_form_and_optimality():
    v = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32)
    v[0, :5] = [0.5, -0.5, 0.0, 0.49, -0.51]  # entries at and around the threshold
    tau = 0.5
    p = np.asarray(prox.soft_threshold(v, tau))
    np.testing.assert_allclose(p, np.sign(v) * np.maximum(np.abs(v) - tau, 0), atol=1e-7)
    # 0 ∈ p − v + τ·∂‖p‖₁: on the support p − v + τ·sign(p) = 0, off it |v| ≤ τ.
    support = p != 0
    np.testing.assert_allclose((p - v + tau * np.sign(p))[support], 0, atol=1e-6)
    assert np.all(np.abs(v[~support]) <= tau)
    assert np.all(np.abs(v[support]) > tau)


def test_soft_threshold_broadcast_tau_and_dtypes():
    x = jnp.ones((3, 4, 5))
    out = prox.soft_threshold(x, jnp.array([0.0, 0.5, 2.0])[:, None, None])
    np.testing.assert_allclose(out[:, 0, 0], [1.0, 0.5, 0.0])
    assert prox.soft_threshold(jnp.ones(3, jnp.bfloat16), 0.5).dtype == jnp.bfloat16
    assert prox.soft_threshold(jnp.arange(3), 1).dtype == jnp.float32


# --- exact SVT and hard truncation -----------------------------------------------------------


def test_svt_matches_numpy_closed_form():
    x = decaying(40, 30, 0)
    tau = 0.2
    p, lr = prox.svt(x, tau)
    u, s, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    np.testing.assert_allclose(p, (u * np.maximum(s - tau, 0)) @ vt, atol=2e-6)
    assert lr.u.shape == (40, 30) and lr.s.shape == (30,) and lr.v.shape == (30, 30)
    np.testing.assert_allclose(lr.s, np.maximum(s - tau, 0), atol=2e-6)
    np.testing.assert_allclose(lr.matrix(), p, atol=1e-6)
    np.testing.assert_allclose(prox.low_rank_matrix(lr), p, atol=1e-6)


def test_svt_is_the_minimiser():
    x = np.asarray(decaying(20, 16, 1), np.float64)
    tau = 0.15
    p = np.asarray(prox.svt(jnp.asarray(x, jnp.float32), tau)[0], np.float64)

    def objective(q):
        return 0.5 * np.sum((q - x) ** 2) + tau * np.sum(sv(q))

    best = objective(p)
    rng = np.random.default_rng(2)
    u, _, vt = np.linalg.svd(p)
    for scale in (1e-1, 1e-2):
        for _ in range(10):
            dense = rng.standard_normal(x.shape)
            rank_one = np.outer(u[:, rng.integers(16)], vt[rng.integers(16)])  # along P's factors
            for delta in (dense, rank_one):
                assert objective(p + scale * delta / np.linalg.norm(delta)) >= best - 1e-9


def test_svt_and_truncation_are_batched():
    x = decaying(12, 9, 3, batch=(2, 3))
    tau = jnp.array([[0.0, 0.1, 0.3], [0.2, 0.5, 10.0]])
    p, lr = prox.svt(x, tau)
    h, lh = prox.hard_rank_truncation(x, 4)
    assert p.shape == x.shape and lr.s.shape == (2, 3, 9) and lh.u.shape == (2, 3, 12, 4)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(p[i, j], prox.svt(x[i, j], tau[i, j])[0], atol=1e-6)
            np.testing.assert_allclose(h[i, j], prox.hard_rank_truncation(x[i, j], 4)[0],
                                       atol=1e-6)
    np.testing.assert_allclose(p[1, 2], 0)  # τ above σ_1


def test_hard_truncation_is_eckart_young():
    x = decaying(30, 20, 4)
    s = sv(x)
    for r in (1, 5, 20):
        p, lr = prox.hard_rank_truncation(x, r)
        assert lr.s.shape == (r,)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(p, np.float64) - np.asarray(x)),
                                   np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-4, atol=1e-5)
        assert np.sum(sv(p) > 1e-5 * s[0]) == r


# --- structure measures ----------------------------------------------------------------------


def test_effective_rank_constructed_spectra():
    s = jnp.array([4.0, 3.0, 2.0, 1.0])
    # share of σ: cumulative 0.4, 0.7, 0.9, 1.0
    for energy, expected in [(0.4, 1), (0.5, 2), (0.7, 2), (0.71, 3), (0.9, 3), (0.999, 4),
                             (1.0, 4)]:
        assert int(prox.effective_rank(s, energy, share="sigma")) == expected, energy
    # share of σ² (the default, SALAAD's controller): 16, 25, 29, 30 of 30
    for energy, expected in [(0.5, 1), (0.54, 2), (0.83, 2), (0.84, 3), (0.96, 3), (0.97, 4)]:
        assert int(prox.effective_rank(s, energy)) == expected, energy
    assert int(prox.effective_rank(jnp.array([1.0, 4.0, 2.0, 3.0]), 0.7, share="sigma")) == 2
    assert int(prox.effective_rank(jnp.array([4.0, 3.0, 2.0, 1.0, 0.0, 0.0]), 1.0)) == 4
    assert int(prox.effective_rank(jnp.zeros(5))) == 0
    # [2, 1, 1] at γ = 0.6: σ needs 2 (2/4 < 0.6), σ² needs 1 (4/6 ≥ 0.6)
    assert int(prox.effective_rank(jnp.array([2.0, 1.0, 1.0]), 0.6, share="sigma")) == 2
    assert int(prox.effective_rank(jnp.array([2.0, 1.0, 1.0]), 0.6)) == 1


def test_effective_rank_harmonic_spectrum_matches_cumsum_reference():
    """σ_i = 1/i, n = 576, γ = 0.999: the σ² share needs about half the spectrum, the σ share
    nearly all of it (ratios 0.514 and 0.995), checked against a float64 cumsum reference."""
    n = 576
    sig = 1.0 / np.arange(1, n + 1)
    for share, w in (("energy", sig**2), ("sigma", sig)):
        cum = np.cumsum(w) / w.sum()
        expected = int(np.argmax(cum >= 0.999)) + 1
        got = float(prox.effective_rank_ratio(jnp.asarray(sig, jnp.float32), (n, n), 0.999,
                                              share=share))
        assert got == pytest.approx(expected / n, abs=1.5 / n), share
    assert float(prox.effective_rank_ratio(jnp.asarray(sig, jnp.float32), (n, n), 0.999)) == \
        pytest.approx(0.514, abs=0.002)
    assert float(prox.effective_rank_ratio(jnp.asarray(sig, jnp.float32), (n, n), 0.999,
                                           share="sigma")) == pytest.approx(0.995, abs=0.002)
    with pytest.raises(ValueError, match="share"):
        prox.effective_rank(jnp.ones(3), 0.9, share="squared")


def test_effective_rank_batched():
    s = jnp.array([4.0, 3.0, 2.0, 1.0])
    batched = prox.effective_rank(jnp.array([[[4.0, 3.0, 2.0, 1.0], [0.0] * 4, [1.0] * 4]] * 2),
                                  0.5, share="sigma")
    assert batched.dtype == jnp.int32
    np.testing.assert_array_equal(batched, [[2, 0, 2]] * 2)
    ratio = prox.effective_rank_ratio(s, (8, 5), 0.5, share="sigma")
    assert ratio.dtype == jnp.float32 and float(ratio) == pytest.approx(2 / 5)


def test_density():
    x = jnp.array([[0.0, 1e-3, -2.0], [0.5, 0.0, 0.0]])
    assert float(prox.density(x)) == pytest.approx(3 / 6)
    assert float(prox.density(x, tol=1e-2)) == pytest.approx(2 / 6)
    np.testing.assert_allclose(prox.density(jnp.stack([x, jnp.ones_like(x)])), [0.5, 1.0])


# --- fast subspace prox ----------------------------------------------------------------------

M, N, CAP = 200, 160, 40  # rank cap 25 % of min(m, n)


@pytest.fixture(scope="module")
def problem():
    """X, the threshold keeping ~60 % of the cap, the exact SVT, and a 1 %-perturbed previous X."""
    x = decaying(M, N, 5)
    tau = float(sv(x)[24])
    previous = x + 0.01 * jnp.linalg.norm(x) / np.sqrt(M * N) * jax.random.normal(
        jax.random.key(1), x.shape)
    return x, tau, prox.svt(x, tau)[0], previous


def test_svt_subspace_cold_and_warm_accuracy(problem):
    x, tau, exact, previous = problem
    key = jax.random.key(0)
    cold = {it: rel(prox.svt_subspace(x, tau, rank_cap=CAP, n_iter=it, key=key)[0], exact)
            for it in (2, 6)}
    assert cold[2] < 5e-2 and cold[6] < 2e-3
    # warm start from the previous stage: its (exact or fast) factors
    _, prev_exact = prox.svt(previous, tau)
    _, prev_fast = prox.svt_subspace(previous, tau, rank_cap=CAP, n_iter=6, key=key)
    for prev in (prev_exact, prev_fast):
        warm = {it: rel(prox.svt_subspace(x, tau, prev, rank_cap=CAP, n_iter=it, key=key)[0],
                        exact) for it in (1, 2)}
        assert warm[2] < 3e-4
        assert warm[1] <= cold[2]  # fewer iterations from a warm start beat a cold start
    p, lr = prox.svt_subspace(x, tau, prev_exact, rank_cap=CAP, n_iter=2, key=key)
    assert lr.u.shape == (M, CAP) and lr.s.shape == (CAP,) and lr.v.shape == (N, CAP)
    assert np.all(np.diff(np.asarray(lr.s)) <= 0) and np.all(np.asarray(lr.s) >= 0)
    np.testing.assert_allclose(lr.v.T @ lr.v, np.eye(CAP), atol=1e-5)
    np.testing.assert_allclose(lr.matrix(), p, atol=1e-6)


def test_svt_subspace_all_zero_prev_is_a_cold_start(problem):
    x, tau, _, _ = problem
    key = jax.random.key(3)
    zeros = prox.LowRank(u=jnp.zeros((M, CAP)), s=jnp.zeros(CAP), v=jnp.zeros((N, CAP)))
    np.testing.assert_array_equal(prox.svt_subspace(x, tau, zeros, rank_cap=CAP, key=key)[0],
                                  prox.svt_subspace(x, tau, None, rank_cap=CAP, key=key)[0])


def test_subspace_is_exact_on_low_rank_and_zero_input():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((300, 5)) @ rng.standard_normal((5, 120)), jnp.float32)
    key = jax.random.key(0)
    assert rel(prox.svt_subspace(x, 1.0, rank_cap=30, key=key)[0], prox.svt(x, 1.0)[0]) < 1e-5
    p, lr = prox.low_rank_subspace(x, rank_cap=30, n_iter=0, key=key)
    assert rel(p, x) < 1e-5 and np.all(np.asarray(lr.s[5:]) < 1e-4 * float(lr.s[0]))
    p, lr = prox.svt_subspace(jnp.zeros((40, 30)), 0.1, rank_cap=8, key=key)
    assert np.all(np.isfinite(lr.u)) and np.all(np.isfinite(lr.v))
    np.testing.assert_array_equal(p, 0)


def test_low_rank_subspace_near_eckart_young(problem):
    x, _, _, _ = problem
    optimal = np.linalg.norm(np.asarray(prox.hard_rank_truncation(x, CAP)[0]) - np.asarray(x))
    p, lr = prox.low_rank_subspace(x, rank_cap=CAP, n_iter=4, key=jax.random.key(0))
    assert lr.s.shape == (CAP,)
    assert np.linalg.norm(np.asarray(p) - np.asarray(x)) <= 1.01 * optimal


def test_subspace_batched():
    x = decaying(60, 40, 7, batch=(3,))
    tau = jnp.array([0.3, 0.4, 0.5])  # 8 to 12 singular values above τ
    p, lr = prox.svt_subspace(x, tau, rank_cap=20, n_iter=4, key=jax.random.key(0))
    assert p.shape == x.shape and lr.u.shape == (3, 60, 20) and lr.v.shape == (3, 40, 20)
    for i in range(3):
        assert rel(p[i], prox.svt(x[i], tau[i])[0]) < 2e-3
    warm, _ = prox.svt_subspace(x, tau, lr, rank_cap=20, n_iter=1, key=jax.random.key(1))
    assert warm.shape == x.shape


# --- jit -------------------------------------------------------------------------------------


def test_everything_jits(problem):
    x, tau, _, _ = problem
    key = jax.random.key(0)
    cases = [
        (prox.soft_threshold, (x, tau), {}),
        (prox.svt, (x, tau), {}),
        (prox.hard_rank_truncation, (x,), {"rank": 7}),
        (prox.svt_subspace, (x, tau, None), {"rank_cap": CAP, "n_iter": 1, "key": key}),
        (prox.low_rank_subspace, (x, None), {"rank_cap": CAP, "n_iter": 1, "key": key}),
        (prox.effective_rank, (sv(x), 0.9), {}),
        (prox.effective_rank_ratio, (sv(x),), {"shape": x.shape}),
        (prox.density, (x, 0.01), {}),
        (prox.low_rank_matrix, (prox.svt(x, tau)[1],), {}),
    ]
    for fn, args, kwargs in cases:
        static = [k for k in kwargs if k != "key"]
        eager, compiled = fn(*args, **kwargs), jax.jit(fn, static_argnames=static)(*args, **kwargs)
        if isinstance(eager, tuple):  # (matrix, LowRank): singular vectors are sign-ambiguous
            eager, compiled = (eager[0], eager[1].s), (compiled[0], compiled[1].s)
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(compiled)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=fn.__name__)


# --- validation ------------------------------------------------------------------------------


def test_bad_inputs_raise_naming_the_argument():
    x = jnp.ones((6, 4))
    key = jax.random.key(0)
    lr = prox.svt(x, 0.0)[1]
    bad = [
        ("tau", lambda: prox.soft_threshold(x, -0.1)),
        ("tau", lambda: prox.soft_threshold(x, jnp.array([0.1, np.nan]))),
        ("tau", lambda: prox.svt(x, -1.0)),
        ("tau", lambda: prox.svt_subspace(x, -1.0, rank_cap=2, key=key)),
        ("x", lambda: prox.svt(jnp.ones(5), 0.1)),
        ("x", lambda: prox.hard_rank_truncation(jnp.ones(5), 1)),
        ("x", lambda: prox.svt_subspace(jnp.ones(5), 0.1, rank_cap=1, key=key)),
        ("x", lambda: prox.density(jnp.ones(5))),
        ("rank", lambda: prox.hard_rank_truncation(x, 0)),
        ("rank", lambda: prox.hard_rank_truncation(x, 5)),
        ("rank_cap", lambda: prox.svt_subspace(x, 0.1, rank_cap=0, key=key)),
        ("rank_cap", lambda: prox.low_rank_subspace(x, rank_cap=5, key=key)),
        ("n_iter", lambda: prox.svt_subspace(x, 0.1, rank_cap=2, n_iter=-1, key=key)),
        ("oversample", lambda: prox.svt_subspace(x, 0.1, rank_cap=2, oversample=-1, key=key)),
        ("prev.v", lambda: prox.svt_subspace(jnp.ones((6, 5)), 0.1, lr, rank_cap=2, key=key)),
        ("energy", lambda: prox.effective_rank(jnp.ones(3), 0.0)),
        ("energy", lambda: prox.effective_rank(jnp.ones(3), 1.5)),
        ("energy", lambda: prox.effective_rank_ratio(jnp.ones(3), (3, 3), -0.5)),
        ("shape", lambda: prox.effective_rank_ratio(jnp.ones(3), (3,))),
        ("tol", lambda: prox.density(x, -1.0)),
    ]
    for name, call in bad:
        with pytest.raises(ValueError, match=rf"\b{re.escape(name)}\b"):
            call()
    with pytest.raises(TypeError, match="rank_cap"):
        prox.svt_subspace(x, 0.1, rank_cap=2.0, key=key)


def test_traced_arguments_skip_validation():
    x = jnp.ones((6, 4))
    out = jax.jit(lambda t, e: (prox.svt(x, t)[0], prox.effective_rank(jnp.ones(3), e),
                                prox.soft_threshold(x, t)))(0.5, 0.5)
    assert out[0].shape == (6, 4) and int(out[1]) == 2


# --- sharded weights -------------------------------------------------------------------------


def test_svt_subspace_on_sharded_weights(run_on_cpu_devices):
    """The matmul-only path runs on a weight sharded over rows (4 CPU devices) and keeps its
    sharding; the result matches the unsharded one."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from admm_jax.ops import prox
        assert jax.device_count() == 4, jax.devices()
        mesh = Mesh(np.array(jax.devices()), ("rows",))
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((128, 64)) * np.arange(1, 65) ** -1.0, jnp.float32)
        f = jax.jit(lambda x: prox.svt_subspace(x, 0.05, rank_cap=16, key=jax.random.key(0)))
        ref = f(x)[0]
        out, lr = f(jax.device_put(x, NamedSharding(mesh, P("rows", None))))
        assert out.sharding.spec == P("rows", None), out.sharding
        assert float(jnp.abs(out - ref).max()) < 1e-4
        print("ok")
    """)
    stdout = run_on_cpu_devices(script, 4, timeout=300)
    assert stdout.strip().endswith("ok")
