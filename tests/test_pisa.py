"""PISA / SISA / NSISA: convergence to the global minimiser of heterogeneous clients, the
iteration's identities, Newton–Schulz, 8 devices = 1 device, optax composition and contract,
and every bad input."""

import json
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_optax_contract import leaves

from admm_jax.pisa import (
    NS_BAND,
    check_clients,
    check_mesh,
    client_mesh,
    client_value_and_grad,
    consensus_params,
    newton_schulz,
    nsisa,
    pisa,
    sigma_interval_for,
    sigma_schedule,
    sisa,
    soft_orthogonalize,
    stack_clients,
    unstack_clients,
)

REPO = Path(__file__).resolve().parents[1]


# --- heterogeneous quadratic clients -------------------------------------------------------

def quadratic_clients(m=4, n=3, seed=0):
    """``f_i(W) = ½ tr((W − C_i)ᵀ A_i (W − C_i))`` over ``n × 2`` matrices, with different SPD
    ``A_i`` (eigenvalues scaled by ``i + 1``) and centres ``C_i``; the global minimiser
    ``(Σ A_i)^{-1} Σ A_i C_i``."""
    rng = np.random.default_rng(seed)
    a = []
    for i in range(m):
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        a.append(q @ np.diag(rng.uniform(0.2, 3.0, n) * (i + 1)) @ q.T)
    a, c = np.stack(a), 3.0 * rng.normal(size=(m, n, 2))
    w_star = np.linalg.solve(a.sum(0), np.einsum("ijk,ikl->jl", a, c))
    return jnp.asarray(a, jnp.float32), jnp.asarray(c, jnp.float32), w_star


def quadratic_loss(params, client):
    a, c = client
    d = params["w"] - c
    return 0.5 * jnp.sum(d * (a @ d))


def run_clients(tx, params, batch, steps):
    value_and_grad = client_value_and_grad(quadratic_loss)

    @jax.jit
    def run(params, state):
        def step(carry, _):
            params, state = carry
            _, grads = value_and_grad(params, batch)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), length=steps)[0]

    return run(params, tx.init(params))


@pytest.mark.parametrize("make", [
    lambda: pisa(sigma=20.0, rho=1.0),
    lambda: sisa(sigma=[15.0, 20.0, 25.0, 30.0], rho=5.0, momentum=0.5),
    lambda: nsisa(sigma=20.0, rho=5.0),
], ids=["pisa", "sisa_per_client_sigma", "nsisa"])
def test_reaches_the_global_minimiser_not_the_average_of_local_ones(make):
    a, c, w_star = quadratic_clients()
    local_average = np.asarray(c).mean(0)
    assert np.linalg.norm(w_star - local_average) > 0.5  # 5000× the tolerance below
    params, state = run_clients(make(), stack_clients({"w": jnp.zeros((3, 2))}, 4), (a, c),
                                1500)
    rows = np.asarray(params["w"])
    np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape))  # consensus
    w = np.asarray(consensus_params(params)["w"])
    np.testing.assert_allclose(w, w_star, atol=1e-4)
    # the fixed point: π_i = −∇f_i(w*) and Σ π_i = 0 (so Σ ∇f_i(w*) = 0)
    local_grads = np.einsum("ijk,ikl->ijl", np.asarray(a), w_star - np.asarray(c))
    np.testing.assert_allclose(np.asarray(state.dual["w"]), -local_grads, atol=1e-3)
    np.testing.assert_allclose(np.asarray(state.dual["w"]).sum(0), 0.0, atol=1e-4)


# --- the iteration's identities --------------------------------------------------------------

SIGMA, RHO, GROWTH, INTERVAL, B1, B2 = [0.5, 1.0, 2.0], 0.7, 2.0, 2, 0.9, 0.99


@pytest.mark.parametrize("variant", ["pisa", "sisa_momentum"])
def test_stationarity_and_aggregation_identities(variant):
    """For every step ℓ with σ^ℓ = σ γ^{⌊ℓ/k₀⌋} (it doubles within the run), from the duals:
    ``Δ_i = (π_i − π_i') / σ_i`` satisfies the local step's stationarity
    ``ĝ_i + π_i = (σ_i + ρ Q_i) Δ_i`` and the aggregation gives
    ``w' − w = Σ (2π_i' − π_i) / Σ σ_i`` on every row."""
    kw = dict(sigma_growth=GROWTH, sigma_interval=INTERVAL)
    tx = (pisa(SIGMA, RHO, **kw) if variant == "pisa"
          else sisa(SIGMA, RHO, b2=B2, momentum=B1, **kw))
    key = jax.random.key(1)
    params = stack_clients({"w": jax.random.normal(key, (4, 5)), "b": jnp.ones(5)}, 3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(6):
        grads = jax.tree_util.tree_map(
            lambda x, k: jax.random.normal(k, x.shape), params,
            {"w": jax.random.key(10 + t), "b": jax.random.key(20 + t)})
        updates, new = update(grads, state, params)
        sigma = np.asarray(sigma_schedule(SIGMA, GROWTH, INTERVAL)(t))
        assert sigma[0] == SIGMA[0] * GROWTH ** (t // INTERVAL)
        for k in params:
            s = sigma.reshape((3,) + (1,) * (params[k].ndim - 1))
            old_pi, new_pi = np.asarray(state.dual[k]), np.asarray(new.dual[k])
            delta = (old_pi - new_pi) / s
            if variant == "pisa":
                estimate, q = np.asarray(grads[k]), 1.0
            else:
                estimate = np.asarray(new.momentum[k]) / (1 - B1 ** (t + 1))
                q = np.sqrt(np.asarray(new.preconditioner[k]) / (1 - B2 ** (t + 1)))
            np.testing.assert_allclose(estimate + old_pi, (s + RHO * q) * delta,
                                       rtol=1e-4, atol=1e-4)
            step = (2 * new_pi - old_pi).sum(0) / sigma.sum()
            np.testing.assert_allclose(np.asarray(updates[k]),
                                       np.broadcast_to(step, params[k].shape),
                                       rtol=1e-4, atol=1e-5)
        params, state = optax.apply_updates(params, updates), new
    assert int(state.count) == 6


def test_sigma_interval_heuristic():
    assert sigma_interval_for(1000, 2.0, 16.0) == 250  # 2^(1000/250) = 16
    assert sigma_interval_for(10, 10.0, 2.0) == 33 and sigma_interval_for(10, 1.01, 1e6) == 1
    np.testing.assert_allclose(np.asarray(sigma_schedule(3.0, 1.5, 4)(jnp.arange(9))),
                               3.0 * 1.5 ** (np.arange(9) // 4), rtol=1e-6)


# --- Newton–Schulz ---------------------------------------------------------------------------

def _ill_conditioned(rows, cols, condition, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    r = min(rows, cols)
    s = np.geomspace(1.0, 1.0 / condition, r)
    return jnp.asarray(u[:, :r] @ np.diag(s) @ v[:, :r].T, jnp.float32)


@pytest.mark.parametrize("x, steps", [
    (jax.random.normal(jax.random.key(0), (32, 64)), 5),
    (jax.random.normal(jax.random.key(1), (64, 32)), 5),
    (_ill_conditioned(48, 24, 1e4), 14),
], ids=["wide", "tall", "condition_1e4"])
def test_newton_schulz_is_near_orthogonal(x, steps):
    """Singular values land in Muon's band, singular vectors are kept: ``Uᵀ NS(x) V`` is
    diagonal (a random Gaussian needs Muon's 5 steps; condition 1e4 about log(1e4·√24)/log a)."""
    out = np.asarray(newton_schulz(x, steps))
    u, _, vt = np.linalg.svd(np.asarray(x), full_matrices=False)
    core = u.T @ out @ vt.T
    diag = np.diag(core)
    assert NS_BAND[0] <= diag.min() and diag.max() <= NS_BAND[1], (diag.min(), diag.max())
    np.testing.assert_allclose(core - np.diag(diag), 0.0, atol=1e-3)
    assert newton_schulz(x, 0).shape == x.shape
    np.testing.assert_array_equal(np.asarray(newton_schulz(jnp.zeros((3, 4)))), 0.0)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_soft_orthogonalize_is_the_softened_polar_factor(shape):
    """``(ddᵀ + τ²I)^{-1/2} d = U diag(s/√(s² + τ²)) Vᵀ`` up to the NS band; τ = 0 is plain NS."""
    d = jax.random.normal(jax.random.key(2), shape)
    np.testing.assert_allclose(np.asarray(soft_orthogonalize(d, 0.0)),
                               np.asarray(newton_schulz(d)), atol=1e-5)
    u, s, vt = np.linalg.svd(np.asarray(d), full_matrices=False)
    tau = float(np.median(s))  # half the directions are softened, half orthogonalised
    core = u.T @ np.asarray(soft_orthogonalize(d, tau, steps=8)) @ vt.T
    ratio = np.diag(core) / (s / np.sqrt(s ** 2 + tau ** 2))
    assert NS_BAND[0] <= ratio.min() and ratio.max() <= NS_BAND[1], ratio
    np.testing.assert_allclose(core - np.diag(np.diag(core)), 0.0, atol=1e-3)


def test_nsisa_orthogonalises_matrix_leaves_and_falls_back_to_sisa():
    """First step from π = 0 with tiny σ: the matrix leaf moves by ≈ U Vᵀ / ρ (Muon's step,
    singular values of ρΔ in the NS band), the bias by SISA's ``g/(σ + ρ|g|)`` ≈ sign(g)/ρ."""
    rho, m = 4.0, 2
    tx = nsisa(1e-6, rho, momentum=0.0)
    params = stack_clients({"w": jnp.zeros((6, 10)), "b": jnp.zeros(10)}, m)
    grads = {"w": jax.random.normal(jax.random.key(3), (m, 6, 10)),
             "b": jax.random.normal(jax.random.key(4), (m, 10))}
    state = tx.init(params)
    assert isinstance(state.preconditioner["w"], optax.MaskedNode)
    _, new = jax.jit(tx.update)(grads, state, params)
    for i in range(m):
        delta = -np.asarray(new.dual["w"][i]) / 1e-6  # Δ = (π − π')/σ with π = 0
        singular = np.linalg.svd(rho * delta, compute_uv=False)
        assert NS_BAND[0] <= singular.min() and singular.max() <= NS_BAND[1], singular
        np.testing.assert_allclose(-np.asarray(new.dual["b"][i]) / 1e-6,
                                   np.sign(np.asarray(grads["b"][i])) / rho, rtol=1e-4)


# --- helpers, jit and optax.chain ------------------------------------------------------------

def test_stack_unstack_and_consensus():
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    stacked = stack_clients(tree, 4)
    assert stacked["w"].shape == (4, 2, 3) and check_clients(params=stacked) == 4
    rows = unstack_clients(stacked)
    assert len(rows) == 4
    for row in [*rows, consensus_params(stacked)]:
        for a, b in zip(leaves(row), leaves(tree)):
            np.testing.assert_array_equal(a, b)


def test_inside_optax_chain_under_jit():
    """``chain(clip(0.5), sisa)`` is sisa on the clipped per-client gradients."""
    a, c, _ = quadratic_clients()
    params = stack_clients({"w": jnp.ones((3, 2))}, 4)
    _, grads = client_value_and_grad(quadratic_loss)(params, (a, c))
    chained = optax.chain(optax.clip(0.5), sisa(2.0, 3.0))
    plain = sisa(2.0, 3.0)
    u1, s1 = jax.jit(chained.update)(grads, chained.init(params), params)
    u2, s2 = jax.jit(plain.update)(jax.tree_util.tree_map(lambda g: jnp.clip(g, -0.5, 0.5),
                                                          grads), plain.init(params), params)
    np.testing.assert_allclose(np.asarray(u1["w"]), np.asarray(u2["w"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s1[1].dual["w"]), np.asarray(s2.dual["w"]),
                               rtol=1e-6)


# --- 8 devices = 1 device, and the mesh's bad input ------------------------------------------

def test_eight_devices_equal_one(run_on_cpu_devices):
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        import jax, jax.numpy as jnp, numpy as np, optax
        from admm_jax.pisa import (client_mesh, client_value_and_grad, nsisa, shard_clients,
                                   sisa, stack_clients)
        assert jax.device_count() == 8, jax.devices()
        m, rng = 16, np.random.default_rng(0)
        batch = (jnp.asarray(rng.normal(size=(m, 10, 6)), jnp.float32),
                 jnp.asarray(rng.normal(size=(m, 10, 4)), jnp.float32))
        def loss(p, b):
            return 0.5 * jnp.mean((b[0] @ p["w"] + p["b"] - b[1]) ** 2)
        value_and_grad = client_value_and_grad(loss)
        base = {{"w": jnp.full((6, 4), 0.1), "b": jnp.zeros(4)}}
        makers = {{"sisa": lambda mesh: sisa(list(np.linspace(0.5, 2.0, m)), 2.0,
                                              momentum=0.9, mesh=mesh),
                  "nsisa": lambda mesh: nsisa(1.0, 2.0, mesh=mesh)}}
        out = {{}}
        for name, make in makers.items():
            for n in (1, 8):
                mesh = client_mesh() if n == 8 else None
                tx, params, data = make(mesh), stack_clients(base, m), batch
                if mesh is not None:
                    params, data = shard_clients(params, mesh), shard_clients(batch, mesh)
                state = tx.init(params)
                @jax.jit
                def step(params, state, tx=tx, data=data):
                    _, grads = value_and_grad(params, data)
                    updates, state = tx.update(grads, state, params)
                    return optax.apply_updates(params, updates), state
                for _ in range(5):
                    params, state = step(params, state)
                devices = len(state.dual["w"].sharding.device_set)
                out[f"{{name}}-{{n}}"] = dict(
                    devices=devices, values=[np.asarray(x).ravel().tolist()
                                             for x in jax.tree_util.tree_leaves((params, state))])
        try:
            sisa(1.0, 1.0, mesh=client_mesh()).init(stack_clients(base, 12))
            out["indivisible"] = "no error"
        except ValueError as e:
            out["indivisible"] = str(e)
        print(json.dumps(out))
    """)
    out = json.loads(run_on_cpu_devices(script, 8, timeout=300).strip().splitlines()[-1])
    assert "12 clients do not divide over the 8 devices" in out["indivisible"]
    for name in ("sisa", "nsisa"):
        one, eight = out[f"{name}-1"], out[f"{name}-8"]
        assert one["devices"] == 1 and eight["devices"] == 8
        assert len(one["values"]) == len(eight["values"])
        for a, b in zip(one["values"], eight["values"]):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.0, -1.0, [1.0, 0.0, 2.0], float("nan"), [[1.0]]])
def test_non_positive_sigma_is_refused(sigma):
    with pytest.raises(ValueError, match="sigma"):
        sisa(sigma, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rho=0.0), "rho"), (dict(sigma_growth=0.5), "sigma_growth"),
    (dict(momentum=1.0), "momentum"), (dict(sigma_interval=0), "sigma_interval"),
])
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pisa(**{"sigma": 1.0, "rho": 1.0, **kwargs})


def test_client_counts_must_agree():
    params = stack_clients({"w": jnp.zeros(3)}, 4)
    tx = pisa(1.0, 1.0)
    state = tx.init(params)
    with pytest.raises(ValueError, match="client counts differ"):
        tx.update(stack_clients({"w": jnp.zeros(3)}, 3), state, params)
    with pytest.raises(ValueError, match="sigma has 3 values but the params have 4 clients"):
        pisa([1.0, 2.0, 3.0], 1.0).init(params)
    with pytest.raises(ValueError, match="disagree on the client count"):
        tx.init({"w": jnp.zeros((4, 3)), "b": jnp.zeros((5,))})
    with pytest.raises(ValueError, match="0-d"):
        tx.init({"w": jnp.zeros(())})
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, state)
    a, c, _ = quadratic_clients()
    with pytest.raises(ValueError, match=r"client counts differ \(params: 4, batch: 3\)"):
        client_value_and_grad(quadratic_loss)(params, (a[:3], c[:3]))


def test_mesh_axis_must_exist_and_divide():
    mesh = client_mesh(jax.devices()[:1])
    assert check_mesh(5, mesh) == 1
    with pytest.raises(ValueError, match="'data' is not an axis"):
        pisa(1.0, 1.0, mesh=mesh, axis_name="data")
    with pytest.raises(ValueError, match="newton_schulz needs a 2-D array"):
        newton_schulz(jnp.zeros((2, 3, 4)))
