"""Tests of structured GLU pruning (SPAP, its baselines, global widths, physical shrinking).

The closed-form refit and FLAP's folded compensation are checked against NumPy ``lstsq`` on the
ridge-augmented systems; the selections for exact counts (per layer and global); pruning at 0 %
and shrinking against the dense / masked model's logits; SPAP against the magnitude baseline on
real SmolLM2 layers with real calibration text.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers

from admm_jax.data import calibration_samples, prepare_corpus
from admm_jax.models.llama import LlamaConfig, forward, init_params
from admm_jax.ops.projection import keep_count
from admm_jax.pruning import capture_blocks, prune
from admm_jax.spap import (
    GLUStats,
    allocate_widths,
    alternating_minimisation,
    baseline_prune_mlp,
    check_glu,
    flap_compensation,
    global_prune,
    glu_forward,
    glu_stats,
    hidden,
    kept_neurons,
    neuron_scores,
    penalty_select,
    prune_glu_block,
    refit_down,
    relaxed_to_binary,
    shrink_mlp,
    spap_prune_mlp,
)
from admm_jax.training.checkpoint import load_model, save_model

NANO = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=176,
                   max_seq_len=32, init_std=0.1)
#: SPAP with a short alternating minimisation, to keep the nano tests fast
FAST = {"am_rounds": 1, "am_steps": 3}
METHODS = ["spap", "mag-neuron", "flap", "wanda-neuron"]


@pytest.fixture(scope="module")
def nano():
    graphdef, params = init_params(NANO, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (16, 32), 0, NANO.vocab_size))
    return graphdef, params, tokens


def random_mlp(key, dim=6, n=10, scale=0.5):
    kg, ku, kd = jax.random.split(key, 3)
    return {"gate_proj": {"kernel": scale * jax.random.normal(kg, (dim, n))},
            "up_proj": {"kernel": scale * jax.random.normal(ku, (dim, n))},
            "down_proj": {"kernel": scale * jax.random.normal(kd, (n, dim))}}


def ridge_reference(h, y, keep, delta):
    """``argmin ‖Y − H_K W‖² + δ‖W‖²`` by float64 lstsq on ``[H_K; √δ I] W = [Y; 0]``."""
    hk = h[:, keep].astype(np.float64)
    a = np.vstack([hk, np.sqrt(delta) * np.eye(hk.shape[1])])
    b = np.vstack([y.astype(np.float64), np.zeros((hk.shape[1], y.shape[1]))])
    w = np.zeros((h.shape[1], y.shape[1]))
    w[keep] = np.linalg.lstsq(a, b, rcond=None)[0]
    return w


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ridge", [1e-3, 0.1])
def test_refit_down_equals_ridge_lstsq(ridge):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(60, 12)).astype(np.float32) * rng.uniform(0.2, 3, 12).astype(np.float32)
    y = rng.normal(size=(60, 5)).astype(np.float32)
    keep = rng.permutation(12) < 7
    gram = h.T @ h
    w = np.asarray(refit_down(gram, h.T @ y, keep, ridge=ridge))
    delta = ridge * np.mean(np.diag(gram))
    np.testing.assert_allclose(w, ridge_reference(h, y, keep, delta), rtol=1e-4, atol=1e-5)
    assert np.all(w[~keep] == 0)


def test_flap_compensation_is_the_least_squares_fit_of_the_removed_mean():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(80, 9)) + rng.uniform(-2, 2, 9)  # non-zero means
    w = rng.normal(size=(9, 4))
    keep = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1], bool)
    stats = GLUStats(jnp.asarray(h.T @ h, jnp.float32), jnp.asarray(h.sum(0), jnp.float32))
    got = np.asarray(flap_compensation(w, stats, 80, keep, ridge=1e-3))
    c = h.mean(0)[~keep] @ w[~keep]                                     # the bias FLAP would add
    delta = 1e-3 * np.mean(np.diag(h.T @ h))
    want = np.where(keep[:, None], w, 0) + ridge_reference(h, np.tile(c, (80, 1)), keep, delta)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    # the compensation lowers the output error of plain masking
    y = h @ w
    plain = np.linalg.norm(y - h @ np.where(keep[:, None], w, 0))
    assert np.linalg.norm(y - h @ got) < plain


def test_neuron_scores_match_their_definitions():
    rng = np.random.default_rng(2)
    h = rng.normal(size=(40, 7)) + 1.0
    w = rng.normal(size=(7, 3))
    stats = GLUStats(jnp.asarray(h.T @ h, jnp.float32), jnp.asarray(h.sum(0), jnp.float32))
    want = {"magnitude": np.linalg.norm(w, axis=1),
            "wanda": np.linalg.norm(h, axis=0) * np.abs(w).sum(1),
            "flap": h.var(0, ddof=1) * (w ** 2).sum(1)}
    for score, ref in want.items():
        np.testing.assert_allclose(np.asarray(neuron_scores(score, w, stats, 40)), ref,
                                   rtol=1e-4, err_msg=score)


def test_glu_stats_and_hidden_match_the_model_block(nano):
    graphdef, params, tokens = nano
    seen = {}

    def record(block):
        seen[block.index] = block
        return block.params

    capture_blocks(graphdef, params, tokens, record, stats=glu_stats, verbose=False)
    block = seen[1]
    acts = block.activations()
    x = acts.mlp_in.reshape(-1, NANO.dim)
    h = np.asarray(hidden(block.params["mlp"], x))
    np.testing.assert_allclose(h, np.asarray(acts.mlp_hidden).reshape(h.shape), atol=1e-5)
    np.testing.assert_allclose(np.asarray(block.stats.gram), h.T @ h, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(glu_forward(block.params["mlp"], x)),
                               np.asarray(acts.out - acts.mid).reshape(-1, NANO.dim), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Selection: exact counts
# ---------------------------------------------------------------------------------------------

def test_relaxed_to_binary_keeps_exactly_n_keep_with_ties():
    s = jnp.asarray([0.5, 0.5, 0.5, 1.0, 0.0, 0.5, 0.5, 0.0])
    score = jnp.asarray([1.0, 3.0, 2.0, 9.0, 0.0, 3.0, 2.0, 0.0])
    for n_keep in range(1, 9):
        keep = np.asarray(relaxed_to_binary(s, score, n_keep))
        assert keep.sum() == n_keep
    # smallest s first (4, 7), then the higher score among the ties (1 before 5, then 2 before 6)
    np.testing.assert_array_equal(np.flatnonzero(relaxed_to_binary(s, score, 5)), [1, 2, 4, 5, 7])


@pytest.mark.parametrize("n_keep", [1, 4, 9])
def test_penalty_select_keeps_exactly_n_keep(n_keep):
    mlp = random_mlp(jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (50, 6))
    h = hidden(mlp, x)
    keep, s = penalty_select(h.T @ h, mlp["down_proj"]["kernel"], n_keep)
    assert int(np.asarray(keep).sum()) == n_keep
    assert np.all((np.asarray(s) >= 0) & (np.asarray(s) <= 1))
    np.testing.assert_allclose(float(np.sum(s)), 10 - n_keep, rtol=1e-5)  # Σs = p throughout


@pytest.mark.parametrize("method", METHODS)
def test_prune_keeps_exactly_the_count_in_every_layer(nano, method):
    graphdef, params, tokens = nano
    pruned, masks = prune(graphdef, params, tokens, method=method, structure="channel",
                          sparsity=0.29, verbose=False, **FAST)
    kept = kept_neurons(masks, NANO.n_layers)
    assert [k.size for k in kept] == [keep_count(176, 0.29)] * 2 == [125, 125]
    for i, idx in enumerate(kept):
        mlp = pruned["layers"][i]["mlp"]
        drop = np.setdiff1d(np.arange(176), idx)
        assert np.all(np.asarray(mlp["gate_proj"]["kernel"])[:, drop] == 0)
        assert np.all(np.asarray(mlp["down_proj"]["kernel"])[drop] == 0)
        gate = np.asarray(masks[f"layers/{i}/mlp/gate_proj/kernel"])
        assert gate.shape == (64, 176) and np.all(gate[:, idx]) and not np.any(gate[:, drop])
    for a, b in zip(jax.tree.leaves(pruned["layers"][0]["attn"]),
                    jax.tree.leaves(params["layers"][0]["attn"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # attention untouched


def test_allocate_widths_global_count_is_exact_and_non_uniform():
    rng = np.random.default_rng(5)
    flat = rng.uniform(0.9, 1.1, 100)            # no neuron stands out: keep most
    peaked = np.r_[np.full(5, 50.0), rng.uniform(0, 0.1, 95)]  # five carry the layer
    for sparsity in (0.0, 0.3, 0.5, 0.77, 0.99):
        widths = allocate_widths([flat, peaked, flat[:40]], sparsity)
        assert sum(widths) == max(3, keep_count(240, sparsity)), sparsity
        assert all(1 <= w <= n for w, n in zip(widths, (100, 100, 40)))
    widths = allocate_widths([flat, peaked], 0.5)
    assert widths[0] > 90 and widths[1] < 10, widths
    widths = allocate_widths([flat, peaked], 0.5, normalise="zscore")
    assert sum(widths) == 100


def test_global_prune_hits_the_model_count(nano):
    graphdef, params, tokens = nano
    result = global_prune(graphdef, params, tokens, method="spap", sparsity=0.4, verbose=False,
                          **FAST)
    kept = kept_neurons(result.masks, NANO.n_layers)
    assert tuple(k.size for k in kept) == result.widths
    assert sum(result.widths) == keep_count(2 * 176, 0.4)


# ---------------------------------------------------------------------------------------------
# Whole models: 0 %, shrinking, checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_pruning_at_zero_returns_the_same_outputs(nano, method):
    graphdef, params, tokens = nano
    pruned, masks = prune(graphdef, params, tokens, method=method, structure="channel",
                          sparsity=0.0, verbose=False, refit=True, **FAST)
    assert all(bool(np.all(m)) for m in masks.values())
    np.testing.assert_array_equal(np.asarray(forward(graphdef, pruned, tokens)),
                                  np.asarray(forward(graphdef, params, tokens)))


def test_shrunk_model_equals_masked_model_and_round_trips(nano, tmp_path):
    graphdef, params, tokens = nano
    result = global_prune(graphdef, params, tokens, method="flap", sparsity=0.45, verbose=False)
    config, small = shrink_mlp(NANO, result.params, kept_neurons(result.masks, NANO.n_layers))
    assert config.mlp_dim == result.widths and config.dim == NANO.dim
    assert small["layers"][1]["mlp"]["down_proj"]["kernel"].shape == (result.widths[1], 64)
    small_def, _ = init_params(config, jax.random.key(9))
    masked = np.asarray(forward(graphdef, result.params, tokens))
    np.testing.assert_allclose(np.asarray(forward(small_def, small, tokens)), masked,
                               rtol=1e-5, atol=1e-5)

    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a"))
    save_model(tmp_path / "small", small, model_config=config, tokenizer=tokenizer)
    loaded = load_model(tmp_path / "small")
    assert loaded.config == config
    np.testing.assert_array_equal(np.asarray(forward(small_def, loaded.params, tokens)),
                                  np.asarray(forward(small_def, small, tokens)))


def test_alternating_minimisation_never_increases_the_calibration_loss():
    mlp = random_mlp(jax.random.key(6), dim=8, n=16)
    x = jax.random.normal(jax.random.key(7), (200, 8))
    y = glu_forward(mlp, x)
    keep = jnp.arange(16) < 9
    masked = {k: {"kernel": jnp.where(keep[None, :] if k != "down_proj" else keep[:, None],
                                      v["kernel"], 0.0)} for k, v in mlp.items()}
    for lr in (3e-3, 10.0):  # a useful step, and one so large that every round is rejected
        out = alternating_minimisation(masked, keep, x, y, rounds=3, steps=5, lr=lr)
        before = float(jnp.sum(jnp.square(glu_forward(masked, x) - y)))
        after = float(jnp.sum(jnp.square(glu_forward(out, x) - y)))
        assert after <= before, lr
        assert np.all(np.asarray(out["up_proj"]["kernel"])[:, 9:] == 0)
    assert after == before  # lr = 10: no round accepted


def masked_am_reference(mlp, keep, x, y, *, rounds, steps, lr, ridge):
    """The alternating minimisation at full width ``n``: Adam on gate/up with the pruned
    columns' gradients zeroed, then the masked ridge solve with ``δ = ridge · mean(diag A)``
    over all ``n`` neurons (float64 NumPy lstsq for the solve)."""
    opt = optax.adam(lr)
    wg, wu, wd = (mlp[k]["kernel"] for k in ("gate_proj", "up_proj", "down_proj"))

    def loss(p, wd):
        h = jax.nn.silu(x @ p[0]) * (x @ p[1])
        return 0.5 * jnp.mean(jnp.sum(jnp.square(y - h @ wd), axis=-1))

    best = loss((wg, wu), wd)
    for _ in range(rounds):
        params, state = (wg, wu), opt.init((wg, wu))
        for _ in range(steps):
            grads = [jnp.where(keep[None, :], g, 0.0) for g in jax.grad(loss)(params, wd)]
            updates, state = opt.update(tuple(grads), state)
            params = optax.apply_updates(params, updates)
        h = np.asarray(jax.nn.silu(x @ params[0]) * (x @ params[1]))
        delta = ridge * np.mean(np.sum(h * h, axis=0))
        new_wd = jnp.asarray(ridge_reference(h, np.asarray(y), np.asarray(keep), delta),
                             jnp.float32)
        if not loss(params, new_wd) < best:
            break
        (wg, wu), wd, best = params, new_wd, loss(params, new_wd)
    return {"gate_proj": {"kernel": wg}, "up_proj": {"kernel": wu}, "down_proj": {"kernel": wd}}


def test_alternating_minimisation_equals_the_full_width_masked_problem():
    """The rounds run on the gathered kept neurons; they must give the iterates of the masked
    full-width problem (scattered back, zeros outside ``keep``)."""
    mlp = random_mlp(jax.random.key(8), dim=8, n=24)
    x = jax.random.normal(jax.random.key(9), (300, 8))
    y = glu_forward(mlp, x)
    keep = jax.random.permutation(jax.random.key(10), jnp.arange(24) < 15)
    masked = {k: {"kernel": jnp.where(keep[None, :] if k != "down_proj" else keep[:, None],
                                      v["kernel"], 0.0)} for k, v in mlp.items()}
    options = {"rounds": 3, "steps": 6, "lr": 3e-3, "ridge": 0.05}
    out = alternating_minimisation(masked, keep, x, y, **options)
    ref = masked_am_reference(masked, keep, x, y, **options)
    assert float(jnp.sum(jnp.square(glu_forward(out, x) - y))) \
        < 0.9 * float(jnp.sum(jnp.square(glu_forward(masked, x) - y)))  # rounds were accepted
    for name in out:
        np.testing.assert_allclose(np.asarray(out[name]["kernel"]),
                                   np.asarray(ref[name]["kernel"]), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Real SmolLM2 layers
# ---------------------------------------------------------------------------------------------

def test_smollm2_spap_beats_magnitude_on_real_layers(smollm2):
    """SPAP's MLP output error on blocks 0–1 of SmolLM2 (24 × 128 Shakespeare calibration
    tokens, 40 % of the neurons pruned) is below the column-magnitude baseline's, with and
    without the closed-form refit."""
    corpus = prepare_corpus("shakespeare", tokenizer=smollm2.tokenizer)
    tokens = calibration_samples(corpus, 24, 128, seed=0)
    n_keep = keep_count(1536, 0.4)
    errors = {}

    def compare(block):
        x = block.activations().mlp_in.reshape(-1, smollm2.config.dim)
        y = glu_forward(block.params["mlp"], x)

        def error(method, **options):
            new, _ = prune_glu_block(block, n_keep, method, **options)
            return float(jnp.linalg.norm(glu_forward(new["mlp"], x) - y) / jnp.linalg.norm(y))

        errors[block.index] = {
            "spap": error("spap", am_rounds=2, am_steps=10),
            "magnitude": error("mag-neuron"),
            "magnitude+refit": error("mag-neuron", refit=True)}
        return block.params

    capture_blocks(smollm2.config, smollm2.params, tokens, compare, stats=glu_stats,
                   num_blocks=2, verbose=False)
    print(f"\nSmolLM2 MLP relative output errors at 40 %: {errors}")
    for layer, e in errors.items():
        assert e["spap"] < e["magnitude+refit"] < e["magnitude"], (layer, e)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_raises(nano, sparsity):
    graphdef, params, tokens = nano
    with pytest.raises(ValueError, match="sparsity"):
        prune(graphdef, params, tokens, method="spap", structure="channel", sparsity=sparsity)
    with pytest.raises(ValueError, match="sparsity"):
        global_prune(graphdef, params, tokens, sparsity=sparsity)
    with pytest.raises(ValueError, match="sparsity"):
        allocate_widths([np.ones(4)], sparsity)


def test_bad_options_and_structures_raise(nano):
    graphdef, params, tokens = nano
    with pytest.raises(ValueError, match="does not support structure"):
        prune(graphdef, params, tokens, method="spap", structure="unstructured")
    with pytest.raises(ValueError, match="balance"):
        prune(graphdef, params, tokens, method="spap", structure="channel", balance=1.5)
    with pytest.raises(TypeError, match="unknown options"):
        global_prune(graphdef, params, tokens, method="flap", momentum=0.5)
    with pytest.raises(ValueError, match="method"):
        global_prune(graphdef, params, tokens, method="sparsegpt")
    with pytest.raises(ValueError, match="calibration"):
        global_prune(graphdef, params, None)


def test_non_glu_mlp_raises_a_clear_error(nano):
    _, params, _ = nano
    dense = {"fc1": {"kernel": jnp.zeros((64, 128))}, "fc2": {"kernel": jnp.zeros((128, 64))}}
    with pytest.raises(ValueError, match="not a dense GLU MLP"):
        check_glu(dense)
    with pytest.raises(ValueError, match="not a dense GLU MLP"):
        spap_prune_mlp(dense, jnp.zeros((4, 64)), 8)
    biased = {k: {**v, "bias": jnp.zeros(3)} for k, v in params["layers"][0]["mlp"].items()}
    broken = {**params, "layers": {**params["layers"], 0: {**params["layers"][0], "mlp": biased}}}
    with pytest.raises(ValueError, match="layer 0 MLP is not a dense GLU MLP"):
        shrink_mlp(NANO, broken, [np.arange(4)] * 2)


def test_tiny_calibration_set_warns_and_stays_finite(nano):
    """3 calibration tokens for 64-wide blocks with 176 neurons: the refit is underdetermined,
    so every method warns and the ridge keeps every weight finite."""
    graphdef, params, tokens = nano
    for method in METHODS:
        with pytest.warns(RuntimeWarning, match="underdetermined"):
            pruned, _ = prune(graphdef, params, tokens[:1, :3], method=method, sparsity=0.5,
                              structure="channel", verbose=False, refit=True, **FAST)
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(pruned)), method
        assert bool(jnp.all(jnp.isfinite(forward(graphdef, pruned, tokens[:2]))))


def test_refit_down_never_nan_on_dead_activations():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = refit_down(jnp.zeros((5, 5)), jnp.zeros((5, 2)), jnp.ones(5, bool), n_tokens=10)
    assert np.all(np.asarray(w) == 0)
    with pytest.raises(ValueError, match="ridge"):
        refit_down(jnp.eye(3), jnp.zeros((3, 1)), jnp.ones(3, bool), ridge=0.0)
    with pytest.raises(ValueError, match="n_keep"):
        baseline_prune_mlp(random_mlp(jax.random.key(0)),
                           GLUStats(jnp.eye(10), jnp.zeros(10)), 10, 0, score="wanda")
