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
from admm_jax.ops.structures import Block, block_tiles
from admm_jax.salaad.controller import ControllerConfig, Rates, controller_step
from admm_jax.salaad.split import (
    slr_admm,
    slr_components,
    slr_split,
    tile_density,
    tile_soft_threshold,
)


def _step(alpha, beta, rho, rates, previous=(0.0, 0.0), step=0, cfg=None):
    cfg = cfg or ControllerConfig(target_rank_ratio=0.15, target_density=0.05)
    arr = jnp.asarray
    return controller_step(arr(alpha), arr(beta), arr(rho), Rates(*map(arr, rates)),
                           Rates(*map(arr, previous)), arr(step, jnp.int32), cfg)


def test_controller_moves_weights_toward_targets():
    rho = 1e-3
    a, b = _step(0.0, 0.0, rho, (0.5, 0.5))
    assert float(a) > 0 and float(b) > 0  # too rich and too dense: thresholds rise
    np.testing.assert_allclose(float(a), 1e-3 * (0.5 - 0.15) * 0.2, rtol=1e-5)
    np.testing.assert_allclose(float(b), 1e-3 * (0.5 - 0.05) * 0.002, rtol=1e-5)
    a2, b2 = _step(a, b, rho, (0.05, 0.01))
    assert float(a2) < float(a) and float(b2) < float(b)  # below target: thresholds fall
    zero = _step(0.0, 0.0, rho, (0.0, 0.0))
    assert float(zero[0]) == 0.0 and float(zero[1]) == 0.0  # clamped at zero


def test_controller_p_term_sign_and_onset():
    """The P term adds ρ·max(0, rate − previous)·gain from update ``proportional_after`` on: it
    raises a weight while its rate grows and never lowers one; off by default."""
    cfg = ControllerConfig(alpha_p_step=3.0, beta_p_step=0.7, proportional_after=100)
    rho, rates, prev = 0.01, (0.30, 0.10), (0.20, 0.04)
    i_only = _step(1.0, 1.0, rho, rates, prev, step=50, cfg=cfg)  # before the onset
    np.testing.assert_allclose(i_only, _step(1.0, 1.0, rho, rates, prev, step=50), rtol=1e-6)
    with_p = _step(1.0, 1.0, rho, rates, prev, step=100, cfg=cfg)
    np.testing.assert_allclose(float(with_p[0] - i_only[0]), rho * 0.10 * 3.0, rtol=1e-3)
    np.testing.assert_allclose(float(with_p[1] - i_only[1]), rho * 0.06 * 0.7, rtol=1e-3)
    falling = _step(1.0, 1.0, rho, prev, rates, step=200, cfg=cfg)  # rates fell: no P term
    np.testing.assert_allclose(falling, _step(1.0, 1.0, rho, prev, rates, step=200), rtol=1e-6)
    off = _step(1.0, 1.0, rho, rates, prev, step=5000)  # default gains 0: paper's I-controller
    np.testing.assert_allclose(off, i_only, rtol=1e-6)


def test_split_init_is_rank_fifteen_percent_svd():
    """L₀ = best rank-⌊0.15·min(m, n)⌋ approximation of X (Eckart–Young error), S₀ = 0,
    Z₀ = L₀; ``init_rank_ratio`` overrides the rank."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(70, 41)), jnp.float32)
    u, sig, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    r = 6  # floor(0.15 * 41)
    for svd in ("exact", "subspace"):
        z0, state = slr_split(svd=svd).init(x)
        np.testing.assert_allclose(state.low_rank, (u[:, :r] * sig[:r]) @ vt[:r], atol=1e-4)
        np.testing.assert_array_equal(z0, state.low_rank)
        assert not np.any(state.sparse)
        err = float(jnp.sum((x - state.low_rank) ** 2))
        assert err == pytest.approx(float(np.sum(sig[r:] ** 2)), rel=1e-4)
        assert np.linalg.matrix_rank(np.asarray(state.low_rank), tol=1e-3) == r
    _, st = slr_split(init_rank_ratio=0.5).init(x)
    assert np.linalg.matrix_rank(np.asarray(st.low_rank), tol=1e-3) == 20
    _, st = slr_split(ControllerConfig(target_rank_ratio=0.3)).init(x)
    assert np.linalg.matrix_rank(np.asarray(st.low_rank), tol=1e-3) == 12
    with pytest.raises(ValueError, match="init_rank_ratio"):
        slr_split(init_rank_ratio=0.0)


def test_controller_measures_energy_share():
    """The split reports Γ from the σ² share: a planted spectrum σ_i = 1/i gives the energy
    ratio, not the σ ratio (0.999 covers 22 of 40 values by energy, 39 by σ)."""
    n = 40
    rng = np.random.default_rng(4)
    q1, _ = np.linalg.qr(rng.normal(size=(n, n)))
    q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
    sig = 1.0 / np.arange(1, n + 1)
    v = jnp.asarray((q1 * sig) @ q2.T, jnp.float32)
    split = slr_split(init_rank_ratio=1.0)
    _, state = split.init(v)
    ctx = ProxContext(rho=jnp.asarray(1.0), step=jnp.asarray(2, jnp.int32))
    _, (new,) = split.prox([v], [state], [ctx])  # α = β = 0: L = V exactly
    energy = np.cumsum(sig**2) / np.sum(sig**2)
    expected = (int(np.argmax(energy >= 0.999)) + 1) / n
    assert float(new.rank_ratio) == pytest.approx(expected, abs=1e-6)
    share = np.cumsum(sig) / np.sum(sig)
    assert expected < (int(np.argmax(share >= 0.999)) + 1) / n


@pytest.mark.parametrize("bad", [dict(target_rank_ratio=0.0), dict(target_density=1.0),
                                 dict(target_rank_ratio=1.5), dict(alpha_step=-1.0),
                                 dict(beta_p_step=-0.1), dict(proportional_after=-1)])
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
    (energy) rank at the planted 4 and the density near its target, and the split recovers the
    planted L and S. Γ̂ = 0.1 (4.8 of 48) sits just above the planted rank, so α settles where one
    more direction would enter; the soft-threshold bias of that α bounds the recovery error."""
    rng = np.random.default_rng(1)
    m, n, r = 64, 48, 4
    low = rng.normal(size=(m, r)) @ rng.normal(size=(r, n)) / np.sqrt(r)
    sparse = (rng.random((m, n)) < 0.04) * rng.normal(scale=3.0, size=(m, n))
    target = jnp.asarray(low + sparse + 0.01 * rng.normal(size=(m, n)), jnp.float32)
    cfg = ControllerConfig(target_rank_ratio=0.1, target_density=0.05, alpha_step=1.0,
                           beta_step=2.0)
    tx = optax.chain(slr_admm(rho=1.0, interval=2, mask={"w": True}, controller=cfg, svd=svd,
                              rank_cap_ratio=0.25), optax.sgd(0.3))
    step, params, state = _denoising(tx, target)
    for _ in range(400):
        params, state = step(params, state)
    (block,) = block_states(state).values()
    assert round(float(block.split.rank_ratio) * n) == r
    assert abs(float(block.split.density) - 0.05) <= 0.005
    assert float(block.residual) < 0.01
    ((L, S),) = slr_components(state).values()
    assert float(jnp.linalg.norm(L - low) / np.linalg.norm(low)) < 0.06
    assert float(jnp.linalg.norm(S - sparse) / np.linalg.norm(sparse)) < 0.06


def _denoising(tx, target):
    """``(step, params, state)`` of ``tx`` on ``½‖W − target‖²`` from ``W = 0`` (``step``
    jitted)."""
    params = {"w": jnp.zeros(target.shape, jnp.float32)}

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: 0.5 * jnp.sum((p["w"] - target) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step, params, tx.init(params)


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


def _tile_prox_reference(y, tau, b):
    """Loop-over-tiles NumPy group soft-threshold on the kernel zero-padded to multiples of b."""
    m, n = y.shape
    out = np.zeros_like(y)
    for i in range(0, m, b):
        for j in range(0, n, b):
            tile = y[i:i + b, j:j + b]
            norm = np.sqrt(np.sum(tile.astype(np.float64) ** 2))
            scale = max(0.0, 1.0 - b * tau / norm) if norm > 0 else 0.0
            out[i:i + b, j:j + b] = scale * tile
    return out


def test_tile_soft_threshold_matches_reference_and_zeroes_whole_tiles():
    """S_t = max(0, 1 − b·τ/‖Y_t‖_F)·Y_t on a 37 × 20 kernel (partial edge tiles with b = 8):
    tiles of small norm vanish whole, the others shrink by one common factor."""
    rng = np.random.default_rng(4)
    y = rng.normal(size=(37, 20)).astype(np.float32)
    y[8:16, 0:8] *= 5.0  # one loud tile survives a threshold the others do not
    y[32:37, 16:20] = 0.0  # an all-zero partial tile stays zero (no division by zero)
    tau = 0.9
    out = np.asarray(tile_soft_threshold(jnp.asarray(y), jnp.asarray(tau), 8))
    np.testing.assert_allclose(out, _tile_prox_reference(y, tau, 8), rtol=1e-5, atol=1e-6)
    tiles = np.asarray(block_tiles(out != 0, 8))  # raises if some tile is partly zeroed
    assert tiles[1, 0] and 0 < tiles.sum() < tiles.size and not tiles[4, 2]
    assert float(tile_density(jnp.asarray(out), 8)) == pytest.approx(tiles.mean())
    # τ = 0 is the identity; one tile at exactly its threshold vanishes
    np.testing.assert_array_equal(np.asarray(tile_soft_threshold(jnp.asarray(y), 0.0, 8)), y)
    flat = np.full((8, 8), 0.5, np.float32)  # ‖Y_t‖_F = 8·0.5 = b·τ at τ = 0.5
    assert not np.asarray(tile_soft_threshold(jnp.asarray(flat), 0.5, 8)).any()
    assert np.asarray(tile_soft_threshold(jnp.asarray(flat), 0.49, 8)).all()


def test_block_prox_pass_uses_the_tile_threshold_and_tile_density():
    rng = np.random.default_rng(5)
    v = rng.normal(size=(40, 24))
    v[16:32, 0:16] *= 4.0  # the one tile above the threshold 16·1.2
    v = jnp.asarray(v, jnp.float32)
    split = slr_split(sparse_structure=Block(16))
    _, state = split.init(v * 0.5)
    state = state._replace(alpha=jnp.asarray(2e-3), beta=jnp.asarray(1.2e-3))
    ctx = ProxContext(rho=jnp.asarray(1e-3), step=jnp.asarray(2, jnp.int32))
    _, (new,) = split.prox([v], [state], [ctx])
    sparse = tile_soft_threshold(v - state.low_rank, 1.2, 16)
    np.testing.assert_allclose(new.sparse, sparse, atol=1e-5)
    np.testing.assert_allclose(new.low_rank, prox.svt(v - sparse, 2.0)[0], atol=1e-4)
    tiles = np.asarray(block_tiles(np.asarray(new.sparse) != 0, 16))
    assert tiles.sum() == 1 and tiles[1, 0]  # a 3 × 2 grid, all but the loud tile pruned
    assert float(new.density) == pytest.approx(tiles.mean())
    assert float(new.density) != pytest.approx(float(jnp.mean(new.sparse != 0)))


def test_block_salaad_steps_give_whole_tile_sparse_part():
    """SALAAD steps with ``sparse_structure="block16"`` on a 48 × 40 problem (3 × 3 tiles, the
    last column partial) with one planted 16 × 16 sparse tile: after every stage 2, S is a union
    of whole tiles and the controller's density is their fraction (a multiple of 1/9); the
    controller settles S on the planted tile."""
    rng = np.random.default_rng(6)
    m, n = 48, 40
    low = rng.normal(size=(m, 2)) @ rng.normal(size=(2, n)) / np.sqrt(2)
    planted = np.zeros((m, n))
    planted[16:32, 0:16] = rng.normal(scale=3.0, size=(16, 16))
    target = jnp.asarray(low + planted + 0.1 * rng.normal(size=(m, n)), jnp.float32)
    cfg = ControllerConfig(target_rank_ratio=0.1, target_density=0.2, alpha_step=1.0,
                           beta_step=2.0)
    tx = optax.chain(slr_admm(rho=1.0, interval=2, mask={"w": True}, controller=cfg,
                              sparse_structure="block16"), optax.sgd(0.3))
    step, params, state = _denoising(tx, target)
    counts = []
    for _ in range(30):
        for _ in range(2):  # one stage 2 per interval
            params, state = step(params, state)
        (block,) = block_states(state).values()
        ((_, S),) = slr_components(state).values()
        tiles = np.asarray(block_tiles(np.asarray(S) != 0, 16))  # raises on a split tile
        assert tiles.shape == (3, 3)
        assert float(block.split.density) == pytest.approx(tiles.sum() / 9)
        counts.append(int(tiles.sum()))
    assert tiles[1, 0] and counts[-4:] == [1] * 4  # settled on exactly the planted tile
    assert max(counts) > 1  # the tile count did move with β (all 9 while β sat at 0)


@pytest.mark.parametrize("bad", ["2:4", "channel", "block0", "tiles", 16, Block(-2)])
def test_bad_sparse_structure(bad):
    with pytest.raises(ValueError, match="sparse_structure"):
        slr_split(sparse_structure=bad)
    with pytest.raises(ValueError, match="sparse_structure"):
        slr_admm(sparse_structure=bad)
