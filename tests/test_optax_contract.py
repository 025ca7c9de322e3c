"""The optax contract, for every transform and optimizer of the library (after optax's
``contrib/_common_test.py``): extra update arguments, no recompilation, ``optax.tree.map_params``,
dtype preservation and ``lax.cond`` stability for bf16 / f32 params, ``optax.MultiSteps``
micro-steps, ``optax.inject_hyperparams`` and convergence on a small matrix problem.

A transform joins with one line in :data:`CASES`: its constructor, the arguments for the nano
problem below (``"w"`` is the constrained matrix, ``"b"`` a free bias), the arguments that
``inject_hyperparams`` must keep static, what "converged" means for it and the couplings it
runs in: ``"gradient"`` is ``chain(transform, adam)``, ``"decoupled"`` is
``transform(coupling="decoupled", base=adam)`` and ``"decoupled_chained"`` is
``chain(adam, transform(coupling="decoupled"))`` (only for splits without a curvature).

The consensus optimizers (PISA / SISA / NSISA) carry a client axis; they join through
:data:`CONSENSUS_CASES`, each run on ``M`` identical clients of the same problem.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admm_jax.core import admm_metrics, admm_state, block_states
from admm_jax.elsa import elsa
from admm_jax.pisa import nsisa, pisa, sisa, stack_clients
from admm_jax.salaad import ControllerConfig, slr_admm

LR = 0.05
MASK = {"w": True, "b": False}
RNG = np.random.default_rng(0)
#: the target: a 16 × 12 matrix with exactly 48 nonzeros of magnitude ≥ 0.5 (met exactly by
#: ELSA at sparsity 0.75) and a bias
TARGET = {"w": jnp.asarray((np.arange(192) < 48)[RNG.permutation(192)].reshape(16, 12)
                           * RNG.choice([-1.0, 1.0], (16, 12)) * (0.5 + RNG.random((16, 12))),
                           jnp.float32),
          "b": jnp.asarray(RNG.normal(size=(12,)), jnp.float32)}
STEPS = 300  # convergence run
SHORT = 6  # contract runs: every case's interval (2 or 5) has a stage 2 within them


def loss_fn(params):
    return 0.5 * sum(jnp.sum(jnp.square(params[k].astype(jnp.float32) - TARGET[k]))
                     for k in params)


def _elsa_converged(state, params) -> None:
    metrics = admm_metrics(state)
    assert float(metrics["w/sparsity"]) == pytest.approx(0.75)
    assert float(metrics["w/residual"]) < 0.02
    assert float(metrics["w/flip_rate"]) == 0.0  # the mask has settled


def _slr_converged(state, params) -> None:
    (block,) = block_states(state).values()
    assert float(block.residual) < 0.02
    assert 0 < float(block.split.density) < 1 and float(block.split.alpha) >= 0


class Case(NamedTuple):
    name: str
    factory: Callable[..., optax.GradientTransformationExtraArgs]
    kwargs: dict[str, Any]  # arguments for the nano problem
    static_args: tuple[str, ...]  # what inject_hyperparams must not trace
    converged: Callable[[Any, Any], None]  # asserts the constraint is met (state, params)
    couplings: tuple[str, ...] = ("gradient", "decoupled", "decoupled_chained")


SLR_STATIC = ("interval", "energy", "rank_cap_ratio", "n_iter", "seed")
ELSA_STATIC = ("sparsity", "interval", "curvature_decay")
#: targets the controller can settle at on TARGET (its energy-share rank moves in steps of 1/12;
#: at Γ̂ = 0.25 the exact back-end's decoupled run ends at Γ = 4/12 with residual 0.053)
SLR_CONTROLLER = ControllerConfig(target_rank_ratio=0.35, target_density=0.3, alpha_step=0.2,
                                  beta_step=0.05)
CASES = [
    Case("slr_admm", slr_admm, dict(rho=0.5, interval=2, mask=MASK, controller=SLR_CONTROLLER),
         SLR_STATIC, _slr_converged),
    Case("slr_admm_subspace", slr_admm, dict(rho=0.5, interval=2, mask=MASK, svd="subspace",
                                             controller=SLR_CONTROLLER),
         SLR_STATIC, _slr_converged),
    # weighted ELSA needs the raw gradients: decoupled only around the base optimizer
    Case("elsa", elsa, dict(sparsity=0.75, rho=0.5, interval=5, mask=MASK),
         ELSA_STATIC, _elsa_converged, ("gradient", "decoupled")),
    Case("elsa_global_bf16_state", elsa, dict(sparsity=0.75, rho=0.5, interval=5, mask=MASK,
                                              scope="global", state_dtype="bf16"),
         ELSA_STATIC, _elsa_converged, ("gradient", "decoupled")),
]


def make_optimizer(case: Case, coupling: str, factory=None,
                   lr: optax.ScalarOrSchedule = LR) -> optax.GradientTransformation:
    """The optimizer of a coupling (module docstring); the decoupled pull ``η_t ρ(X − Z + U)``
    uses Adam's learning rate ``η_t``."""
    factory = case.factory if factory is None else factory
    if coupling == "gradient":
        return optax.chain(factory(**case.kwargs), optax.adam(lr))
    decoupled = dict(case.kwargs, coupling="decoupled", decoupled_lr=lr)
    if coupling == "decoupled":
        return factory(**decoupled, base=optax.adam(lr))
    return optax.chain(optax.adam(lr), factory(**decoupled))


def transform_state(state, coupling: str):
    """The transform's own entry of the optimizer state of :func:`make_optimizer`."""
    return {"gradient": lambda: state[0], "decoupled": lambda: state,
            "decoupled_chained": lambda: state[1]}[coupling]()


def train_steps(opt, params, state, steps=STEPS):
    """``steps`` steps of ``opt`` on :func:`loss_fn` under one jitted ``lax.scan``."""
    @jax.jit
    def run(params, state):
        def step(carry, _):
            params, state = carry
            updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), length=steps)[0]

    return run(params, state)


def init_params(dtype=jnp.float32):
    return {"w": jnp.full((16, 12), 0.1, dtype), "b": jnp.zeros((12,), dtype)}


def leaves(tree) -> list[np.ndarray]:
    """Leaves as numpy arrays (PRNG keys as their key data)."""
    def plain(x):
        return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    return [np.asarray(plain(x)) for x in jax.tree_util.tree_leaves(tree)]


contract = pytest.mark.parametrize(
    "case, coupling", [(c, coupling) for c in CASES for coupling in c.couplings],
    ids=[f"{c.name}-{coupling}" for c in CASES for coupling in c.couplings])


@contract
def test_extra_args_and_no_recompilation(case, coupling):
    opt = make_optimizer(case, coupling)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        grads = jax.grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params,
                                    unexpected_extra_args_your_optimizer_doesnt_expect=1)
        return optax.apply_updates(params, updates), state

    params, state = init_params(), opt.init(init_params())
    for _ in range(SHORT):
        params, state = step(params, state)
    assert len(traces) == 1, "the update recompiles on a later call"
    assert int(admm_state(state).count) == SHORT


@contract
def test_map_params_over_the_state(case, coupling):
    """``optax.tree.map_params`` (how optimizer-state shardings are derived from the params')
    calls ``init`` on a placeholder without leaves."""
    opt = make_optimizer(case, coupling)
    state = opt.init(init_params())
    same = optax.tree.map_params(opt, lambda v: v, state)
    assert jax.tree_util.tree_structure(same) == jax.tree_util.tree_structure(state)
    for a, b in zip(leaves(same), leaves(state)):
        np.testing.assert_array_equal(a, b)
    specs = optax.tree.map_params(opt, lambda v: "spec", state,
                                  transform_non_params=lambda _: None)
    mapped = admm_state(specs)
    assert mapped.count is None and mapped.nonfinite is None
    assert set(jax.tree_util.tree_leaves(mapped.blocks)) == {"spec"}


@contract
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_dtypes_are_preserved_and_stable_under_cond(case, coupling, dtype):
    opt = make_optimizer(case, coupling)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        take = jax.random.randint(jax.random.key(0), (), 0, 2) == 0  # opaque to the compiler
        updates, new_state = jax.lax.cond(take, lambda: opt.update(grads, state, params),
                                          lambda: (jax.tree_util.tree_map(jnp.zeros_like,
                                                                          params), state))
        return optax.apply_updates(params, updates), updates, new_state

    params = init_params(dtype)
    state = jax.jit(opt.init)(params)
    dtypes = [x.dtype for x in jax.tree_util.tree_leaves(state)]
    for _ in range(SHORT):
        params, updates, state = step(params, state)
        assert {k: u.dtype for k, u in updates.items()} == {"w": dtype, "b": dtype}
        assert {k: p.dtype for k, p in params.items()} == {"w": dtype, "b": dtype}
        assert [x.dtype for x in jax.tree_util.tree_leaves(state)] == dtypes


@contract
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_multisteps_micro_steps_give_zero_updates(case, coupling, dtype):
    opt = optax.MultiSteps(make_optimizer(case, coupling), every_k_schedule=4)
    params = init_params(dtype)
    grads = jax.grad(loss_fn)(params)
    state = jax.jit(opt.init)(params)
    updates, state = jax.jit(opt.update)(grads, state, params)
    for k in params:
        assert updates[k].dtype == dtype
        np.testing.assert_array_equal(np.asarray(updates[k], np.float32), 0.0)


@contract
def test_inject_hyperparams_gives_the_same_updates(case, coupling):
    plain = make_optimizer(case, coupling)
    injected = make_optimizer(
        case, coupling, optax.inject_hyperparams(case.factory, static_args=case.static_args))
    runs = []
    for opt in (plain, injected):
        params, state = init_params(), jax.jit(opt.init)(init_params())
        step = jax.jit(lambda p, s, opt=opt: opt.update(jax.grad(loss_fn)(p), s, p))
        history = []
        for _ in range(SHORT):
            updates, state = step(params, state)
            params = optax.apply_updates(params, updates)
            history.append(updates)
        runs.append((history, state))
    (plain_updates, plain_state), (inj_updates, inj_state) = runs
    assert "rho" in transform_state(inj_state, coupling).hyperparams
    for a, b in zip(leaves(plain_updates), leaves(inj_updates)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the states agree up to rounding (singular vectors are compared through Z = L + S and the
    # metrics: their signs are arbitrary)
    plain_blocks, inj_blocks = block_states(plain_state), block_states(inj_state)
    for path, block in plain_blocks.items():
        for a, b in zip(leaves((block.z, block.u, block.rho, block.metrics)),
                        leaves((inj_blocks[path].z, inj_blocks[path].u, inj_blocks[path].rho,
                                inj_blocks[path].metrics))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@contract
def test_converges_on_a_small_matrix_problem(case, coupling):
    """With a decaying learning rate (Adam's normalised steps otherwise keep X jittering by
    ~lr around Z), the loss falls by 20× and the constraint is met."""
    opt = make_optimizer(case, coupling, lr=optax.cosine_decay_schedule(LR, STEPS))
    params, state = init_params(), opt.init(init_params())

    first = float(loss_fn(params))
    params, state = train_steps(opt, params, state)
    assert float(loss_fn(params)) < 0.05 * first
    assert int(admm_state(state).nonfinite) == 0
    case.converged(state, params)


# --- the optax contract, with a fixed client count -------------------------------------------
# The contract problem has params without a client axis; each case runs the optimizer on
# ``M`` identical clients (every client sees the same gradient) and returns row 0.

M = 2
#: (name, constructor, arguments for the contract problem, what inject_hyperparams keeps static)
CONSENSUS_CASES = [
    ("pisa", pisa, dict(sigma=2.0, rho=1.0), ("sigma_interval",)),
    ("sisa", sisa, dict(sigma=2.0, rho=10.0), ("sigma_interval",)),
    ("sisa_momentum", sisa, dict(sigma=5.0, rho=10.0, momentum=0.9), ("sigma_interval",)),
    ("nsisa", nsisa, dict(sigma=2.0, rho=10.0), ("sigma_interval", "ns_steps")),
]
consensus_contract = pytest.mark.parametrize(
    "factory, kwargs, static", [c[1:] for c in CONSENSUS_CASES],
    ids=[c[0] for c in CONSENSUS_CASES])


def fixed_clients(tx, m=M):
    """``tx`` over ``m`` identical clients, as a transform of unstacked params."""
    def init(params):
        return tx.init(stack_clients(params, m))

    def update(grads, state, params=None, **extra):
        updates, state = tx.update(stack_clients(grads, m), state, stack_clients(params, m),
                                   **extra)
        return jax.tree_util.tree_map(lambda u: u[0], updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def _count(state):
    found = [x for x in jax.tree_util.tree_leaves(
        state, is_leaf=lambda x: hasattr(x, "dual")) if hasattr(x, "dual")]
    assert len(found) == 1
    return found[0].count


@consensus_contract
def test_contract_extra_args_and_no_recompilation(factory, kwargs, static):
    opt, traces = fixed_clients(factory(**kwargs)), []

    @jax.jit
    def step(params, state):
        traces.append(1)
        updates, state = opt.update(jax.grad(loss_fn)(params), state, params,
                                    unexpected_extra_args_your_optimizer_doesnt_expect=1)
        return optax.apply_updates(params, updates), state

    params, state = init_params(), opt.init(init_params())
    for _ in range(SHORT):
        params, state = step(params, state)
    assert len(traces) == 1 and int(_count(state)) == SHORT


@consensus_contract
def test_contract_map_params(factory, kwargs, static):
    opt = fixed_clients(factory(**kwargs))
    state = opt.init(init_params())
    same = optax.tree.map_params(opt, lambda v: v, state)
    assert jax.tree_util.tree_structure(same) == jax.tree_util.tree_structure(state)
    specs = optax.tree.map_params(opt, lambda v: "spec", state,
                                  transform_non_params=lambda _: None)
    assert specs.count is None and set(jax.tree_util.tree_leaves(specs.dual)) == {"spec"}


@consensus_contract
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_contract_dtypes_under_cond_and_multisteps(factory, kwargs, static, dtype):
    opt = fixed_clients(factory(**kwargs))

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        take = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        return jax.lax.cond(take, lambda: opt.update(grads, state, params),
                            lambda: (jax.tree_util.tree_map(jnp.zeros_like, params), state))

    params = init_params(dtype)
    state = jax.jit(opt.init)(params)
    dtypes = [x.dtype for x in jax.tree_util.tree_leaves(state)]
    for _ in range(SHORT):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        assert {u.dtype for u in jax.tree_util.tree_leaves((updates, params))} == {jnp.dtype(dtype)}
        assert [x.dtype for x in jax.tree_util.tree_leaves(state)] == dtypes
    multi = optax.MultiSteps(opt, every_k_schedule=4)
    updates, _ = jax.jit(multi.update)(jax.grad(loss_fn)(params), multi.init(params), params)
    for u in jax.tree_util.tree_leaves(updates):
        assert u.dtype == dtype
        np.testing.assert_array_equal(np.asarray(u, np.float32), 0.0)


@consensus_contract
def test_contract_inject_hyperparams(factory, kwargs, static):
    plain = fixed_clients(factory(**kwargs))
    injected = fixed_clients(optax.inject_hyperparams(factory, static_args=static)(**kwargs))
    runs = []
    for opt in (plain, injected):
        params, state = init_params(), jax.jit(opt.init)(init_params())
        step = jax.jit(lambda p, s, opt=opt: opt.update(jax.grad(loss_fn)(p), s, p))
        for _ in range(SHORT):
            updates, state = step(params, state)
            params = optax.apply_updates(params, updates)
        runs.append((params, state))
    assert "sigma" in runs[1][1].hyperparams and "rho" in runs[1][1].hyperparams
    for a, b in zip(leaves(runs[0]), leaves((runs[1][0], runs[1][1].inner_state))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@consensus_contract
def test_contract_converges(factory, kwargs, static):
    opt = fixed_clients(factory(**kwargs))

    params = init_params()
    first = float(loss_fn(params))
    params, state = train_steps(opt, params, opt.init(params))
    assert float(loss_fn(params)) < 0.05 * first
    assert all(np.isfinite(x).all() for x in leaves(state))
