"""The generic ADMM transform: convergence on convex problems with known solutions, stage-2
timing, ρ handling, leaf selection, optax compositions and non-finite detection."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admm_jax.core import (
    ADMMState,
    ProxContext,
    Split,
    admm,
    admm_metrics,
    admm_state,
    block_states,
    blockwise,
    sigmoid_ramp,
)
from admm_jax.core.tree import select, selected_paths
from admm_jax.models.llama import LlamaConfig, abstract_params

A = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), jnp.float32)

nonneg = Split(init=lambda x: (jnp.maximum(x, 0), None),
               prox=blockwise(lambda v, st, ctx: (jnp.maximum(v, 0), st)))


def l1_split(lam: float) -> Split:
    """Z-prox of λ‖Z‖₁: the ADMM then solves min ½‖X − A‖² + λ‖X‖₁, solved by soft(A, λ)."""
    return Split(init=lambda x: (x, None),
                 prox=blockwise(lambda v, st, ctx: (
                     jnp.sign(v) * jnp.maximum(jnp.abs(v) - lam / ctx.rho, 0), st)))


def run(tx, steps: int, params=None, loss=lambda p: 0.5 * jnp.sum((p["w"] - A) ** 2)):
    params = {"w": jnp.zeros_like(A)} if params is None else params
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


ALL = {"w": True}


@pytest.mark.parametrize("interval", [1, 3])
def test_converges_to_projection_onto_nonnegative_orthant(interval):
    tx = optax.chain(admm(nonneg, rho=1.0, interval=interval, mask=ALL), optax.sgd(0.3))
    params, state = run(tx, 400)
    (block,) = block_states(state).values()
    np.testing.assert_allclose(params["w"], jnp.maximum(A, 0), atol=1e-4)
    np.testing.assert_allclose(block.z, jnp.maximum(A, 0), atol=1e-4)
    # at the solution the scaled dual is the multiplier of the active constraints: ρU = −∇f
    np.testing.assert_allclose(block.rho * block.u, -(params["w"] - A), atol=1e-3)


def test_converges_to_l1_solution():
    lam = 0.4
    tx = optax.chain(admm(l1_split(lam), rho=2.0, interval=1, mask=ALL), optax.sgd(0.2))
    params, _ = run(tx, 400)
    expected = jnp.sign(A) * jnp.maximum(jnp.abs(A) - lam, 0)
    np.testing.assert_allclose(params["w"], expected, atol=1e-4)


@pytest.mark.parametrize("form", ["chained", "wrapped"])
def test_decoupled_coupling_reaches_same_solution(form):
    lr = 0.3
    kwargs = dict(rho=1.0, interval=1, mask=ALL, coupling="decoupled", decoupled_lr=lr)
    tx = (optax.chain(optax.sgd(lr), admm(nonneg, **kwargs)) if form == "chained"
          else admm(nonneg, **kwargs, base=optax.sgd(lr)))
    params, _ = run(tx, 400)
    np.testing.assert_allclose(params["w"], jnp.maximum(A, 0), atol=1e-4)


def test_wrapping_the_base_equals_chaining_after_it():
    """Without a curvature both decoupled forms are the same update, bit for bit: stage 2 reads
    only the params, so it does not matter whether it runs before or after the base step."""
    kwargs = dict(rho=0.3, interval=2, mask={"w": True, "v": False}, coupling="decoupled",
                  decoupled_lr=0.05)
    chained = optax.chain(optax.adamw(0.05), admm(nonneg, **kwargs))
    wrapped = admm(nonneg, **kwargs, base=optax.adamw(0.05))
    (p1, s1), (p2, s2) = (run(tx, 9, params=TWO, loss=two_loss) for tx in (chained, wrapped))
    for a, b in zip(jax.tree_util.tree_leaves((p1, s1[1], s1[0])),
                    jax.tree_util.tree_leaves((p2, s2.admm, s2.base))):
        np.testing.assert_array_equal(a, b)
    assert admm_state(s2) is s2.admm


def test_wrapped_base_gets_raw_gradients_and_its_step_is_pulled():
    """``admm(coupling="decoupled", base=tx)``: the curvature EMA sees the raw gradients (not
    the base step), the base sees them too, and the update is base step − η ρ(X − Z + U)."""
    decay, lr, eta = 0.5, 0.1, 0.3
    split = Split(init=lambda x: (jnp.maximum(x, 0), None),
                  prox=blockwise(lambda v, st, ctx: (jnp.maximum(v, 0), st)),
                  curvature_decay=decay)
    tx = admm(split, rho=2.0, interval=2, mask=ALL, coupling="decoupled", decoupled_lr=eta,
              base=optax.sgd(lr))
    params = {"w": A}
    state = tx.init(params)
    grads = [A * g for g in (1.0, -2.0, 3.0)]
    h = jnp.zeros_like(A)
    for g in grads:  # a stage 2 at the third update: the pull uses the new Z and U
        updates, state = tx.update({"w": g}, state, params)
        h = decay * h + (1 - decay) * g * g
        (b,) = block_states(state).values()
        np.testing.assert_allclose(b.curvature, h, rtol=1e-6)
        pull = eta * b.rho * (params["w"] - b.z + b.u)
        np.testing.assert_allclose(updates["w"], -lr * g - pull, rtol=1e-6, atol=1e-6)
    assert int(admm_state(state).count) == 3


def test_base_goes_with_decoupled_coupling_only():
    curved = nonneg._replace(curvature_decay=0.9)
    with pytest.raises(ValueError, match="sees the base optimizer's steps, not gradients"):
        admm(curved, rho=1.0, coupling="decoupled")
    with pytest.raises(ValueError, match="base is for coupling='decoupled'"):
        admm(nonneg, rho=1.0, base=optax.sgd(0.1))
    with pytest.raises(TypeError, match="base must be"):
        admm(nonneg, rho=1.0, coupling="decoupled", base=optax.sgd)
    admm(curved, rho=1.0, coupling="decoupled", base=optax.sgd(0.1))
    admm(nonneg, rho=1.0, coupling="decoupled")  # no curvature: may be chained after the base


def test_stage2_runs_every_k_steps_and_metrics_travel_with_the_state():
    """The prox sees the update count of its stage 2, and the split's metrics are kept in the
    block state, so admm_metrics needs nothing but the optimizer state."""
    def record(v, st, ctx):
        return v, {"calls": st["calls"] + 1, "step": ctx.step}

    calls = Split(init=lambda x: (x, {"calls": jnp.zeros((), jnp.int32),
                                      "step": jnp.zeros((), jnp.int32)}),
                  prox=blockwise(record), metrics=lambda st: {"calls": st["calls"]})
    tx = optax.chain(admm(calls, rho=1.0, interval=4, mask=ALL), optax.sgd(0.1))
    _, state = run(tx, 13)
    (block,) = block_states(state).values()
    assert int(block.split["calls"]) == 3  # stage 2 at counts 4, 8, 12
    assert int(block.split["step"]) == 12
    assert int(admm_state(state).count) == 13
    metrics = admm_metrics(state)
    assert int(metrics["w/calls"]) == 3 and int(metrics["admm/calls_mean"]) == 3
    assert set(metrics) == {"admm/nonfinite", "w/residual", "w/rho", "w/calls",
                            "admm/residual_mean", "admm/rho_mean", "admm/calls_mean"}


def test_curvature_reaches_the_prox_only_when_the_split_asks():
    """With ``curvature_decay`` the prox gets the EMA of squared gradients, h ← d·h + (1−d)·g²,
    as of the previous step (stage 2 runs before this step's EMA update); without, ``None``."""
    seen = []

    def spy(v, st, ctx):
        seen.append(ctx.curvature)
        return v, ctx.curvature if ctx.curvature is not None else st

    decay = 0.5
    split = Split(init=lambda x: (x, jnp.zeros_like(x)), prox=blockwise(spy),
                  curvature_decay=decay)
    tx = admm(split, rho=1.0, interval=2, mask=ALL)
    params = {"w": A}
    state = tx.init(params)
    grads = [jnp.full_like(A, g) for g in (1.0, 2.0, 3.0)]
    for g in grads:
        _, state = tx.update({"w": g}, state, params)
    (block,) = block_states(state).values()
    h = jnp.zeros_like(A)
    for g in grads[:2]:
        h = decay * h + (1 - decay) * g * g
    np.testing.assert_allclose(block.split, h, rtol=1e-6)  # the curvature the stage 2 saw
    np.testing.assert_allclose(block.curvature, decay * h + (1 - decay) * grads[2] ** 2,
                               rtol=1e-6)
    plain = admm(split._replace(curvature_decay=None), rho=1.0, interval=1, mask=ALL)
    state = plain.init(params)
    for _ in range(2):
        _, state = plain.update({"w": A}, state, params)
    assert seen[-1] is None and block_states(state)["w"].curvature is None


def test_blockwise_lift_matches_calling_each_block():
    split = Split(init=lambda x: (x, None), prox=blockwise(
        lambda v, st, ctx: (jnp.maximum(v - ctx.rho, 0), st)))
    vs = [A, 2 * A]
    contexts = [ProxContext(rho=jnp.asarray(r), step=jnp.asarray(4)) for r in (0.1, 0.7)]
    zs, states = split.prox(vs, [None, None], contexts)
    assert isinstance(zs, list) and states == [None, None]
    for z, v, c in zip(zs, vs, contexts):
        np.testing.assert_array_equal(z, jnp.maximum(v - c.rho, 0))


def test_admm_state_lookup_has_one_error():
    tx = optax.chain(admm(nonneg, rho=1.0, mask=ALL), optax.sgd(0.1))
    state = tx.init({"w": A})
    assert admm_state(state) is state[0]
    assert admm_state(state[0]) is state[0]
    for bad in (optax.sgd(0.1).init({"w": A}), (state, state)):
        with pytest.raises(ValueError, match="expected exactly one ADMMState"):
            admm_state(bad)
        with pytest.raises(ValueError, match="expected exactly one ADMMState"):
            admm_metrics(bad)


def test_rho_change_keeps_unscaled_dual():
    """With a ramp, ρ changes at each stage 2 and U is rescaled so that Y = ρU carries over."""
    ramp = sigmoid_ramp(center=4.0, width=2.0, factor=10.0)
    tx = optax.chain(admm(nonneg, rho=0.5, interval=2, mask=ALL, rho_schedule=ramp),
                     optax.sgd(0.2))
    params, state = run(tx, 6)
    b = next(iter(block_states(state).values()))
    np.testing.assert_allclose(float(b.rho), 0.5 * float(ramp(6 - 2)), rtol=1e-6)
    # one more stage 2 by hand: the prox input uses U rescaled by ρ_old/ρ_new
    tx2 = admm(nonneg, rho=0.5, interval=2, mask=ALL, rho_schedule=ramp)
    _, state2 = tx2.update({"w": jnp.zeros_like(A)}, admm_state(state)._replace(
        count=jnp.asarray(6, jnp.int32)), params)
    b2 = next(iter(block_states(state2).values()))
    rho_new = 0.5 * float(ramp(6))
    u_scaled = b.u * float(b.rho) / rho_new
    z = jnp.maximum(params["w"] + u_scaled, 0)
    np.testing.assert_allclose(b2.z, z, atol=1e-6)
    np.testing.assert_allclose(b2.u, u_scaled + params["w"] - z, atol=1e-6)
    assert float(b2.rho) == pytest.approx(rho_new, rel=1e-6)


def test_residual_balancing_raises_rho_when_primal_residual_dominates():
    tx = admm(nonneg, rho=1e-3, interval=1, mask=ALL, residual_balancing=(1.5, 2.0))
    params = {"w": A}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.zeros_like(A)}, state, params)
    _, state = tx.update({"w": jnp.zeros_like(A)}, state, params)  # stage 2: Z = max(A,0) ≠ X
    b = next(iter(block_states(state).values()))
    assert float(b.balance) == 2.0 and float(b.rho) == pytest.approx(2e-3)


def test_shape_scaled_and_per_block_rho():
    _, params = abstract_params(LlamaConfig.preset("nano"))
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    tx = admm(nonneg, rho=2.0, rho_scaling="shape", n_layers=2)
    blocks = block_states(tx.init(params))
    b = blocks["layers/0/mlp/up_proj/kernel"]
    assert float(b.rho) == pytest.approx(2.0 / (2 * np.sqrt(64 * 172)))
    per_block = admm(nonneg, rho=lambda path, shape: 3e-7 if path.startswith("embed") else 1e-6)
    blocks = block_states(per_block.init(params))
    assert float(blocks["embed/embedding"].rho) == pytest.approx(3e-7)
    assert float(blocks["layers/1/attn/q_proj/kernel"].rho) == pytest.approx(1e-6)


def test_default_selection_on_llama():
    _, params = abstract_params(LlamaConfig.preset("nano"))
    paths = selected_paths(params, select(params))
    assert "embed/embedding" in paths
    assert len(paths) == 1 + 2 * 7
    assert not any("lm_head" in p or "norm" in p for p in paths)


def test_bad_inputs():
    params = {"w": jnp.zeros((3, 3)), "b": jnp.zeros((3,))}
    with pytest.raises(ValueError, match="selects no parameter"):
        admm(nonneg, rho=1.0, mask=r"^nothing$").init(params)
    with pytest.raises(ValueError, match="non-2-D"):
        admm(nonneg, rho=1.0, mask=r".*").init(params)
    with pytest.raises(ValueError, match=r"rho must be in \(0.0, inf\)"):
        admm(nonneg, rho=0.0)
    with pytest.raises(ValueError, match=r"interval must be an integer in \[1, inf\]"):
        admm(nonneg, rho=1.0, interval=0)
    with pytest.raises(TypeError, match="interval"):
        admm(nonneg, rho=1.0, interval=1.5)
    with pytest.raises(ValueError, match="coupling"):
        admm(nonneg, rho=1.0, coupling="both")
    with pytest.raises(ValueError, match="n_layers"):
        admm(nonneg, rho=1.0, rho_scaling="shape")
    with pytest.raises(ValueError, match="rho_scaling"):
        admm(nonneg, rho=1.0, rho_scaling="layer")
    with pytest.raises(ValueError, match="residual_balancing mu"):
        admm(nonneg, rho=1.0, residual_balancing=(1.0, 2.0))
    with pytest.raises(ValueError, match="needs params"):
        tx = admm(nonneg, rho=1.0, mask=ALL)
        tx.update({"w": A}, tx.init({"w": A}))


def test_nonfinite_is_recorded_and_can_halt():
    params = {"w": A.at[0, 0].set(jnp.nan)}
    tx = admm(nonneg, rho=1.0, interval=1, mask=ALL)
    state = tx.init(params)
    _, state = tx.update({"w": A}, state, params)
    _, state = jax.jit(tx.update)({"w": A}, state, params)
    assert int(state.nonfinite) == 1
    assert int(admm_metrics(state)["admm/nonfinite"]) == 1
    halting = admm(nonneg, rho=1.0, interval=1, mask=ALL, halt_on_nonfinite=True)
    state = halting.init(params)
    _, state = halting.update({"w": A}, state, params)
    with pytest.raises(Exception, match="NaN/inf"):
        jax.block_until_ready(jax.jit(halting.update)({"w": A}, state, params))


TWO = {"w": jnp.zeros_like(A), "v": jnp.zeros((4,))}


def two_loss(p):
    return 0.5 * jnp.sum((p["w"] - A) ** 2) + 0.5 * jnp.sum((p["v"] - 1.0) ** 2)


@pytest.mark.parametrize("compose", ["chain", "multisteps", "inject", "masked"])
def test_compositions_run_under_jit_and_converge(compose):
    mask = {"w": True, "v": False}
    inner = admm(nonneg, rho=1.0, interval=2, mask=mask)
    if compose == "chain":
        # with Adam's normalised steps the primal solve is inexact: ADMM needs a smaller ρ
        inner = admm(nonneg, rho=0.1, interval=2, mask=mask)
        tx = optax.chain(optax.clip_by_global_norm(10.0), inner, optax.adamw(0.05, weight_decay=0))
        steps = 1500
    elif compose == "multisteps":
        tx = optax.MultiSteps(optax.chain(inner, optax.sgd(0.3)), every_k_schedule=2)
        steps = 800
    elif compose == "inject":
        tx = optax.chain(optax.inject_hyperparams(admm, static_args=("split", "interval", "mask"))(
            split=nonneg, rho=1.0, interval=2, mask=mask), optax.sgd(0.3))
        steps = 400
    else:
        tx = optax.chain(optax.masked(admm(nonneg, rho=1.0, interval=2, mask=".*"),
                                      {"w": True, "v": False}),
                         optax.sgd(0.3))
        steps = 400
    params, state = run(tx, steps, params=TWO, loss=two_loss)
    np.testing.assert_allclose(params["w"], jnp.maximum(A, 0), atol=2e-3)
    np.testing.assert_allclose(params["v"], 1.0, atol=2e-3)
    assert isinstance(admm_state(state), ADMMState)
    assert "w/residual" in admm_metrics(state)


def test_injected_rho_is_used():
    inj = optax.inject_hyperparams(admm, static_args=("split", "interval", "mask"))(
        split=nonneg, rho=1.0, interval=1, mask=ALL)
    params = {"w": A}
    state = inj.init(params)
    state.hyperparams["rho"] = jnp.asarray(5.0)
    _, state = inj.update({"w": jnp.zeros_like(A)}, state, params)
    _, state = inj.update({"w": jnp.zeros_like(A)}, state, params)
    assert float(next(iter(block_states(state).values())).rho) == 5.0


def test_sigmoid_ramp_midpoint_and_limits():
    """SALAAD's ramp 1 + (f − 1)·sigmoid((t − c)/w): (1 + f)/2 at the centre, → 1 before and
    → f after, monotone, and the official defaults (c = 2000, w = 100, f = 10)."""
    ramp = sigmoid_ramp(center=300.0, width=20.0, factor=5.0)
    assert float(ramp(300)) == pytest.approx(3.0, rel=1e-6)
    assert float(ramp(0)) == pytest.approx(1.0, abs=1e-5)
    assert float(ramp(1000)) == pytest.approx(5.0, rel=1e-6)
    assert float(ramp(320)) == pytest.approx(1 + 4 / (1 + np.exp(-1.0)), rel=1e-6)
    t = jnp.arange(0, 600, 7)
    assert bool(jnp.all(jnp.diff(ramp(t)) >= 0))
    default = sigmoid_ramp()
    assert float(default(2000)) == pytest.approx(5.5, rel=1e-6)
    assert float(default(0)) == pytest.approx(1.0, abs=1e-6)
    assert float(default(3000)) == pytest.approx(1 + 9 / (1 + np.exp(-10.0)), rel=1e-6)
    for bad in (dict(width=0.0), dict(factor=-1.0), dict(center=-5.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sigmoid_ramp(**bad)
