"""ELSA split: planted sparse support recovery on least squares, N:M, finalize exactness."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admm_jax.admm import admm_metrics, rho_ramp
from admm_jax.elsa import elsa, finalize, masked_updates, sparsity_metrics, sparsity_split
from admm_jax.projection import topk_mask


def planted_problem(seed=0, d_in=64, d_out=8, n=40, sparsity=0.9):
    rng = np.random.default_rng(seed)
    magnitudes = 0.5 + np.abs(rng.normal(size=(d_in, d_out)))  # bounded away from the noise
    w_true = (rng.choice([-1.0, 1.0], size=(d_in, d_out)) * magnitudes
              * (rng.random((d_in, d_out)) >= sparsity))
    a = rng.normal(size=(n, d_in))
    y = a @ w_true + 0.01 * rng.normal(size=(n, d_out))
    return jnp.asarray(a, jnp.float32), jnp.asarray(y, jnp.float32), w_true


def fit(tx, a, y, steps):
    params = {"w": jnp.zeros((a.shape[1], y.shape[1]), jnp.float32)}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: 0.5 * jnp.mean(jnp.sum((a @ p["w"] - y) ** 2, -1)))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize("weighted", [False, True])
def test_recovers_planted_sparse_support(weighted):
    """Underdetermined least squares (40 samples, 64 inputs): unconstrained training followed by
    magnitude pruning misses the support; ELSA's ADMM recovers it exactly."""
    a, y, w_true = planted_problem()
    dense, _ = fit(optax.sgd(0.05), a, y, 600)
    pruned = np.asarray(topk_mask(jnp.square(dense["w"]), int((w_true != 0).sum())))
    assert (pruned != (w_true != 0)).sum() > 0
    sparsity = 1 - np.mean(w_true != 0)
    tx = optax.chain(elsa(sparsity, rho=0.5, interval=5, weighted=weighted, mask={"w": True}),
                     optax.sgd(0.05))
    params, state = fit(tx, a, y, 600)
    final, masks = finalize(params, state, sparsity, weighted=weighted)
    np.testing.assert_array_equal(np.asarray(masks["w"]), w_true != 0)
    assert float(jnp.mean(final["w"] == 0)) == pytest.approx(sparsity)
    np.testing.assert_allclose(final["w"], w_true, atol=0.05)
    flips = float(admm_metrics(state, sparsity_metrics)["w/flip_rate"])
    assert flips <= 0.01  # the mask has settled (at most a boundary swap per projection)


def test_two_four_structure_and_exact_finalize():
    a, y, _ = planted_problem(seed=1, sparsity=0.5)
    tx = optax.chain(elsa(0.0, rho=0.5, structure="2:4", interval=5, mask={"w": True}),
                     optax.sgd(0.05))
    params, state = fit(tx, a, y, 100)
    final, masks = finalize(params, state, 0.0, structure="2:4")
    groups = np.asarray(masks["w"]).reshape(16, 4, 8)
    assert (groups.sum(axis=1) == 2).all()
    assert float(jnp.mean(final["w"] == 0)) == pytest.approx(0.5)


def test_fine_tuning_keeps_the_final_mask_and_schedules():
    a, y, w_true = planted_problem(seed=2)
    sparsity = 1 - np.mean(w_true != 0)
    ramp = rho_ramp("cosine", 200, 4.0)
    tx = optax.chain(elsa(sparsity, rho=0.5, interval=5, mask={"w": True}, rho_schedule=ramp),
                     optax.sgd(0.05))
    params, state = fit(tx, a, y, 200)
    final, masks = finalize(params, state, sparsity)
    tuner = optax.chain(optax.adamw(1e-2, weight_decay=0.1), masked_updates(masks))
    opt = tuner.init(final)
    for _ in range(20):
        grads = jax.grad(lambda p: jnp.sum((a @ p["w"] - y) ** 2))(final)
        updates, opt = tuner.update(grads, opt, final)
        final = optax.apply_updates(final, updates)
    np.testing.assert_array_equal(np.asarray(final["w"] != 0), np.asarray(masks["w"]))
    assert float(ramp(0)) == 1.0 and float(ramp(100)) == pytest.approx(2.5)
    assert float(ramp(500)) == pytest.approx(4.0)
    lin, exp_ = rho_ramp("linear", 10, 3.0), rho_ramp("exponential", 10, 4.0)
    assert float(lin(5)) == pytest.approx(2.0) and float(exp_(5)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="kind"):
        rho_ramp("step", 10, 2.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        sparsity_split(1.0)
    with pytest.raises(ValueError, match="structure"):
        sparsity_split(0.5, structure="2-4")
    with pytest.raises(ValueError, match="0 < N < M"):
        sparsity_split(0.5, structure="4:4")
    with pytest.raises(ValueError, match="must divide the input dimension"):
        elsa(0.5, structure="2:4", mask={"w": True}).init({"w": jnp.zeros((6, 3))})
    with pytest.raises(ValueError, match="interval"):
        elsa(0.5, interval=0)
