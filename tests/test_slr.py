"""SALAAD split and controller: controller direction, the L + S prox pass, induction of the target
structure on a planted problem, and the transform inside the training loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admm_jax.core import ProxContext, admm_metrics, block_states
from admm_jax.models.llama import LlamaConfig, init_params
from admm_jax.ops import prox
from admm_jax.salaad.controller import ControllerConfig, i_controller
from admm_jax.salaad.split import slr_admm, slr_components, slr_split


def test_controller_moves_weights_toward_targets():
    cfg = ControllerConfig(target_rank_ratio=0.15, target_density=0.05)
    rho = jnp.asarray(1e-3)
    a, b = i_controller(jnp.asarray(0.0), jnp.asarray(0.0), rho, jnp.asarray(0.5),
                        jnp.asarray(0.5), cfg)
    assert float(a) > 0 and float(b) > 0  # too rich and too dense: thresholds rise
    np.testing.assert_allclose(float(a), 1e-3 * (0.5 - 0.15) * 0.2, rtol=1e-5)
    np.testing.assert_allclose(float(b), 1e-3 * (0.5 - 0.05) * 0.002, rtol=1e-5)
    a2, b2 = i_controller(a, b, rho, jnp.asarray(0.05), jnp.asarray(0.01), cfg)
    assert float(a2) < float(a) and float(b2) < float(b)  # below target: thresholds fall
    zero = i_controller(jnp.asarray(0.0), jnp.asarray(0.0), rho, jnp.asarray(0.0),
                        jnp.asarray(0.0), cfg)
    assert float(zero[0]) == 0.0 and float(zero[1]) == 0.0  # clamped at zero


@pytest.mark.parametrize("bad", [dict(target_rank_ratio=0.0), dict(target_density=1.0),
                                 dict(target_rank_ratio=1.5), dict(alpha_step=-1.0)])
def test_controller_config_validation(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ControllerConfig(**bad)


def test_prox_pass_is_one_alternating_sweep():
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.normal(size=(20, 12)), jnp.float32)
    split = slr_split()
    _, state = split.init(v * 0.5)
    state = state._replace(alpha=jnp.asarray(2e-3), beta=jnp.asarray(5e-4))
    rho = jnp.asarray(1e-3)
    ctx = ProxContext(rho=rho, step=jnp.asarray(2, jnp.int32))
    (z,), (new,) = split.prox([v], [state], [ctx])
    sparse = prox.soft_threshold(v - state.low_rank, 0.5)
    low_rank, _ = prox.svt(v - sparse, 2.0)
    np.testing.assert_allclose(new.sparse, sparse, atol=1e-5)
    np.testing.assert_allclose(new.low_rank, low_rank, atol=1e-4)
    np.testing.assert_allclose(z, low_rank + sparse, atol=1e-4)
    assert float(new.density) == pytest.approx(float(jnp.mean(sparse != 0)))

    lr_first = slr_split(order="low_rank_first")
    _, st = lr_first.init(v * 0.5)
    st = st._replace(alpha=jnp.asarray(2e-3), beta=jnp.asarray(5e-4))
    _, (new2,) = lr_first.prox([v], [st], [ctx])
    low_rank2, _ = prox.svt(v - st.sparse, 2.0)
    np.testing.assert_allclose(new2.low_rank, low_rank2, atol=1e-4)
    np.testing.assert_allclose(new2.sparse, prox.soft_threshold(v - low_rank2, 0.5), atol=1e-4)


@pytest.mark.parametrize("svd", ["exact", "subspace"])
def test_recovers_planted_low_rank_plus_sparse(svd):
    """Fit X to a noisy planted rank-4 + 4 %-sparse matrix: the controller settles the effective
    rank ratio and density near the targets and the split recovers the planted L and S."""
    rng = np.random.default_rng(1)
    m, n, r = 64, 48, 4
    low = rng.normal(size=(m, r)) @ rng.normal(size=(r, n)) / np.sqrt(r)
    sparse = (rng.random((m, n)) < 0.04) * rng.normal(scale=3.0, size=(m, n))
    target = jnp.asarray(low + sparse + 0.01 * rng.normal(size=(m, n)), jnp.float32)
    cfg = ControllerConfig(target_rank_ratio=0.1, target_density=0.05, alpha_step=2.0,
                           beta_step=0.5)
    tx = optax.chain(slr_admm(rho=1.0, interval=2, mask={"w": True}, controller=cfg, svd=svd,
                              rank_cap_ratio=0.25), optax.sgd(0.3))
    params = {"w": jnp.zeros((m, n), jnp.float32)}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: 0.5 * jnp.sum((p["w"] - target) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(400):
        params, state = step(params, state)
    (block,) = block_states(state).values()
    assert abs(float(block.split.rank_ratio) - 0.1) <= 0.05
    assert abs(float(block.split.density) - 0.05) <= 0.03
    assert float(block.residual) < 0.02
    ((L, S),) = slr_components(state).values()
    assert float(jnp.linalg.norm(L - low) / np.linalg.norm(low)) < 0.05
    assert float(jnp.linalg.norm(S - sparse) / np.linalg.norm(sparse)) < 0.05


def test_slr_in_chain_on_llama_runs_and_reports_metrics():
    cfg = LlamaConfig.preset("nano")
    graphdef, params = init_params(cfg, jax.random.key(0))
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     slr_admm(rho=1e-3, interval=2, svd="subspace"), optax.adamw(3e-3))
    state = tx.init(params)
    from admm_jax.training.lm import next_token_loss

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(next_token_loss, argnums=1)(graphdef, params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17)), jnp.int32)
    for _ in range(6):
        params, state, loss = step(params, state, batch)
    metrics = admm_metrics(state)
    assert "layers/0/attn/q_proj/kernel/rank_ratio" in metrics
    assert "embed/embedding/density" in metrics
    assert not any("lm_head" in k for k in metrics)
    assert np.isfinite(float(loss))
    comps = slr_components(state)
    assert set(comps) == {k.rsplit("/", 1)[0] for k in metrics if k.endswith("/alpha")}


def test_slr_in_training_loop_with_donation(tmp_path):
    """The train step donates params and optimizer state: the SALAAD state must not alias them."""
    from admm_jax.data import prepare_corpus
    from admm_jax.training.loop import TrainConfig, train

    texts = tmp_path / "texts"
    texts.mkdir()
    rng = np.random.default_rng(0)
    words = "to be or not that is the question whether tis nobler in mind".split()
    for d in range(4):
        (texts / f"d{d}.txt").write_text(" ".join(rng.choice(words, 3000)))
    corpus = prepare_corpus(texts, vocab_size=300, cache_dir=tmp_path / "cache")
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, log_every=2, eval_every=4,
                      eval_batches=1, checkpoint_every=4)
    tx = optax.chain(slr_admm(rho=1e-3), optax.adamw(1e-3))
    result = train(LlamaConfig.preset("nano"), corpus, tmp_path / "run", cfg, tx,
                   state_metrics=lambda s: admm_metrics(s, per_block=False),
                   progress=False)
    assert "admm/rank_ratio_mean" in result.history[-1]
    assert np.isfinite(result.history[-1]["loss"])


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="order"):
        slr_split(order="both")
    with pytest.raises(ValueError, match="svd"):
        slr_split(svd="lanczos")
    with pytest.raises(ValueError, match="energy"):
        slr_split(energy=0.0)
    with pytest.raises(ValueError, match="rank_cap_ratio"):
        slr_split(rank_cap_ratio=1.5)
    with pytest.raises(ValueError, match="rho"):
        slr_admm(rho=-1.0)
    assert dataclasses.is_dataclass(ControllerConfig())
