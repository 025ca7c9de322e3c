"""Robust PCA by inexact ALM: exact recovery of planted low-rank + sparse matrices, the pytree
helper, jit and input validation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax.ops import prox
from admm_jax.ops.rpca import RPCAResult, rpca, rpca_tree


def planted(m, n, rank, fraction, seed):
    """Candès et al. (2011) setup: L = A·Bᵀ with A, B entries N(0, 1/n); S on a random support
    of the given fraction with random signs and magnitudes uniform in [1, 5]·std(L)."""
    rng = np.random.default_rng(seed)
    low_rank = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) / n
    support = rng.random((m, n)) < fraction
    values = rng.choice([-1.0, 1.0], (m, n)) * rng.uniform(1, 5, (m, n)) * low_rank.std()
    return low_rank, np.where(support, values, 0.0)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_recovers_500x500_rank25_with_5_percent_corruption():
    low_rank, sparse = planted(500, 500, 25, 0.05, 0)
    res = rpca(jnp.asarray(low_rank + sparse, jnp.float32))
    assert isinstance(res, RPCAResult)
    assert bool(res.converged) and int(res.n_iter) <= 100
    assert rel(res.low_rank, low_rank) < 1e-5
    assert rel(res.sparse, sparse) < 1e-4
    np.testing.assert_array_equal(np.asarray(res.sparse) != 0, sparse != 0)


def test_small_case_exact_and_subspace_back_ends():
    low_rank, sparse = planted(80, 60, 3, 0.05, 1)
    m = jnp.asarray(low_rank + sparse, jnp.float32)
    exact = rpca(m)
    fast = rpca(m, svd="subspace", rank_cap=10, n_iter=1, key=jax.random.key(0))
    for res in (exact, fast):
        assert bool(res.converged) and float(res.residual) < 1e-5
        assert rel(res.low_rank, low_rank) < 1e-5
        assert np.linalg.matrix_rank(np.asarray(res.low_rank), tol=1e-4) == 3
        np.testing.assert_array_equal(np.asarray(res.sparse) != 0, sparse != 0)


def test_iteration_limit_and_zero_matrix():
    low_rank, sparse = planted(40, 30, 2, 0.05, 2)
    res = rpca(jnp.asarray(low_rank + sparse, jnp.float32), max_iter=3)
    assert int(res.n_iter) == 3 and not bool(res.converged)
    zero = rpca(jnp.zeros((20, 10)))
    assert bool(zero.converged) and int(zero.n_iter) == 1
    np.testing.assert_array_equal(zero.low_rank, 0)
    np.testing.assert_array_equal(zero.sparse, 0)


def test_jit_and_explicit_parameters():
    low_rank, sparse = planted(40, 30, 2, 0.05, 3)
    m = jnp.asarray(low_rank + sparse, jnp.float32)
    eager = rpca(m, lam=0.2, mu=5.0, rho=1.6, tol=1e-6)
    jitted = jax.jit(lambda m, lam: rpca(m, lam=lam, mu=5.0, rho=1.6, tol=1e-6))(m, 0.2)
    assert int(jitted.n_iter) == int(eager.n_iter)
    np.testing.assert_allclose(jitted.low_rank, eager.low_rank, atol=1e-5)


def test_rpca_tree_runs_on_2d_leaves_and_reports(capsys):
    low_rank, sparse = planted(80, 60, 3, 0.05, 4)
    m = jnp.asarray(low_rank + sparse, jnp.float32)
    tree = {"layer": {"kernel": m, "bias": jnp.ones(60)}, "embed": [m.T]}
    out = rpca_tree(tree, max_iter=200)
    assert out["layer"]["bias"] is None
    for res, target in [(out["layer"]["kernel"], low_rank), (out["embed"][0], low_rank.T)]:
        assert isinstance(res, RPCAResult) and rel(res.low_rank, target) < 1e-4
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and re.match(r"rpca \[1/2\] embed/0 \(60, 80\): \d+ it", lines[0])
    assert "layer/kernel (80, 60)" in lines[1] and "converged" in lines[1]
    keyed = rpca_tree({"w": m}, svd="subspace", rank_cap=5, key=jax.random.key(0),
                      verbose=False)
    assert rel(keyed["w"].low_rank, low_rank) < 1e-4
    assert float(prox.density(keyed["w"].sparse)) == pytest.approx(np.mean(sparse != 0))


def test_bad_inputs_raise_naming_the_argument():
    m = jnp.ones((6, 4))
    bad = [
        ("m", lambda: rpca(jnp.ones(5))),
        ("m", lambda: rpca(jnp.ones((2, 3, 4)))),
        ("lam", lambda: rpca(m, lam=0.0)),
        ("mu", lambda: rpca(m, mu=-1.0)),
        ("rho", lambda: rpca(m, rho=0.5)),
        ("tol", lambda: rpca(m, tol=0.0)),
        ("max_iter", lambda: rpca(m, max_iter=0)),
        ("svd", lambda: rpca(m, svd="randomized")),
        ("rank_cap", lambda: rpca(m, svd="subspace", key=jax.random.key(0))),
        ("rank_cap", lambda: rpca(m, svd="subspace", rank_cap=5, key=jax.random.key(0))),
    ]
    for name, call in bad:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            call()
