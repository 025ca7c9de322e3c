"""SLR surrogate export and Homomorphic Parameter Allocation: exact reconstruction, budgets hit to
±1 parameter, shared ratios, monotonicity, κ extremes, orbax round trip + deploy CLI, bad inputs."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax.data import Document, train_tokenizer
from admm_jax.models.compact import dense_params
from admm_jax.models.llama import LlamaConfig, count_params, forward, init_params
from admm_jax.salaad.hpa import (
    Allocation,
    allocate,
    block_cost,
    deploy,
    minimum_budget,
    param_count,
)
from admm_jax.salaad.sensitivity import unit_sensitivity
from admm_jax.salaad.surrogate import (
    SURROGATE_DIR,
    block_surrogate,
    block_surrogate_from_factors,
    load_surrogate,
    path_str,
    reconstruct,
    save_surrogate,
    surrogate_from_trees,
)
from admm_jax.training.checkpoint import load_model, save_model

NANO = LlamaConfig.preset("nano")
TEXT = ("the king and queen walk to the castle where a knight keeps watch over seven towers of "
        "stone while rivers run east toward the sea. ") * 12


def planted(rng, m, n, rank, density):
    low = (rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) * 0.02)
    sparse = rng.standard_normal((m, n)) * 0.05 * (rng.random((m, n)) < density)
    return low.astype(np.float32), sparse.astype(np.float32)


def is_block(path, x):
    return x.ndim == 2 and "lm_head" not in path_str(path)


@pytest.fixture(scope="module")
def model():
    """Nano params whose constrained blocks are exactly planted L + S, and their surrogate."""
    graphdef, params = init_params(NANO, jax.random.key(0))
    rng = np.random.default_rng(0)
    parts, ranks = {}, {}

    def make(path, x):
        if not is_block(path, x):
            return x
        m, n = x.shape
        rank = int(rng.integers(2, min(m, n) // 4 + 1))
        parts[path_str(path)] = planted(rng, m, n, rank, float(rng.uniform(0.02, 0.08)))
        ranks[path_str(path)] = rank
        low, sparse = parts[path_str(path)]
        return jnp.asarray(low + sparse)

    params = jax.tree_util.tree_map_with_path(make, params)
    lows = jax.tree_util.tree_map_with_path(
        lambda p, x: parts[path_str(p)][0] if is_block(p, x) else None, params)
    sparses = jax.tree_util.tree_map_with_path(
        lambda p, x: parts[path_str(p)][1] if is_block(p, x) else None, params)
    surrogate = surrogate_from_trees(lows, sparses)
    assert {p: b.rank for p, b in surrogate.items()} == ranks
    return graphdef, params, surrogate


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    _, params, surrogate = model
    base = tmp_path_factory.mktemp("hpa")
    tokenizer = train_tokenizer([Document("a", TEXT)], 300, cache_dir=base / "cache",
                                corpus_id="hpa")
    directory = save_model(base / "ckpt", params, model_config=NANO, tokenizer=tokenizer, step=3)
    save_surrogate(directory, surrogate, meta={"source_step": 3})
    (base / "text.txt").write_text(TEXT)
    return directory, base / "text.txt", tokenizer


def test_block_surrogate_exact_and_truncated():
    rng = np.random.default_rng(1)
    low, sparse = planted(rng, 24, 16, 5, 0.1)
    b = block_surrogate(low, sparse)
    assert (b.rank, b.nnz, b.shape) == (5, int(np.count_nonzero(sparse)), (24, 16))
    assert b.u.shape == (24, 5) and b.v.shape == (16, 5) and b.indices.dtype == np.int32
    assert np.all(np.diff(b.s) <= 0) and np.all(b.s > 0)
    assert np.all(np.diff(np.abs(b.values)) <= 0)
    np.testing.assert_allclose(reconstruct(b), low + sparse, atol=1e-6)
    # reduced: best rank-3 approximation of L plus the 7 largest-magnitude entries of S
    u, s, vt = np.linalg.svd(low.astype(np.float64))
    best = (u[:, :3] * s[:3]) @ vt[:3]
    top = np.zeros(sparse.size)
    order = np.argsort(-np.abs(sparse.ravel()), kind="stable")[:7]
    top[order] = sparse.ravel()[order]
    np.testing.assert_allclose(reconstruct(b, 3, 7), best + top.reshape(sparse.shape), atol=1e-6)
    empty = block_surrogate(np.zeros((4, 3)), np.zeros((4, 3)))
    assert (empty.rank, empty.nnz) == (0, 0) and not reconstruct(empty).any()
    with pytest.raises(ValueError, match="rank must be in"):
        reconstruct(b, 6, 0)


def test_surrogate_paths(model):
    surrogate = model[2]
    assert "embed/embedding" in surrogate and "layers/1/mlp/down_proj/kernel" in surrogate
    assert not any("lm_head" in p or "norm" in p for p in surrogate)
    assert len(surrogate) == 1 + 7 * NANO.n_layers


def test_budget_sweep_exact_shared_ratio_monotone(model):
    _, params, surrogate = model
    dense, full = count_params(params), param_count(params, surrogate)
    lo = minimum_budget(params, surrogate)
    total_k = sum(b.nnz for b in surrogate.values())
    step = sum(b.shape[0] + b.shape[1] + 1 for b in surrogate.values())  # ≥ any ϕL step's cost
    for kappa in (0.5, 0.8):
        prev = {}
        hi = full / dense
        for budget in [*np.linspace(lo + 0.002, hi, 20), hi + 0.01, 1.0]:
            target = math.floor(float(budget) * dense + 1e-6)
            for exact in (True, False):
                a = allocate(surrogate, float(budget), kappa, params=params, exact=exact)
                assert a.budget == target and a.dense_params == dense
                assert a.params == param_count(params, surrogate, a.ranks, a.n_sparse)
                if full < target:
                    assert a.params == full and a.phi_low_rank == a.phi_sparse == 1.0
                elif exact:
                    assert target - 1 <= a.params <= target, (budget, kappa)
                else:
                    assert target - step - 2 * len(surrogate) < a.params <= target
                for p, b in surrogate.items():  # one shared ratio per part, up to rounding
                    assert 0 <= a.phi_low_rank - a.ranks[p] / b.rank < 1 / b.rank
                    assert abs(a.n_sparse[p] / b.nnz - a.phi_sparse) <= 1 / b.nnz
                last = prev.get(exact)
                if last is not None:
                    assert a.params >= last.params and a.phi_low_rank >= last.phi_low_rank
                    assert all(a.ranks[p] >= last.ranks[p] for p in surrogate)
                    for p, b in surrogate.items():
                        slack = 0 if not exact else (step + 1) * b.nnz / total_k + 2
                        assert a.n_sparse[p] >= last.n_sparse[p] - slack, (budget, kappa, p)
                prev[exact] = a


def test_fine_sweep_exact_and_nested(model):
    """Budgets 1e-4 apart: exact mode stays within ±1 with monotone ranks; nested mode keeps
    every kept set nested (ranks and sparse counts monotone) while never exceeding the budget."""
    _, params, surrogate = model
    dense = count_params(params)
    lo = minimum_budget(params, surrogate)
    prev_exact = prev_nested = None
    for budget in np.arange(lo + 0.01, lo + 0.03, 1e-4):
        exact = allocate(surrogate, float(budget), params=params)
        nested = allocate(surrogate, float(budget), params=params, exact=False)
        target = math.floor(float(budget) * dense + 1e-6)
        assert target - 1 <= exact.params <= target
        assert nested.params <= target
        if prev_exact is not None:
            assert all(exact.ranks[p] >= prev_exact.ranks[p] for p in surrogate)
            assert exact.params >= prev_exact.params
            assert all(nested.ranks[p] >= prev_nested.ranks[p] for p in surrogate)
            assert all(nested.n_sparse[p] >= prev_nested.n_sparse[p] for p in surrogate)
        prev_exact, prev_nested = exact, nested


def test_kappa_extremes(model):
    _, params, surrogate = model
    dense = count_params(params)
    other = param_count(params, surrogate, {p: 0 for p in surrogate}, {p: 0 for p in surrogate})
    p_l = sum(block_cost(b.shape, b.rank, 0) for b in surrogate.values())
    p_s = sum(block_cost(b.shape, 0, b.nnz) for b in surrogate.values())
    step = sum(b.shape[0] + b.shape[1] + 1 for b in surrogate.values())  # ≥ one ϕL step
    for frac in (0.3, 0.6, 0.9):  # of the full surrogate's cost
        budget = (other + frac * (p_l + p_s)) / dense
        b_c = math.floor(budget * dense) - other
        for exact in (True, False):
            one = allocate(surrogate, budget, 1.0, params=params, exact=exact)
            zero = allocate(surrogate, budget, 0.0, params=params, exact=exact)
            half = allocate(surrogate, budget, 0.5, params=params, exact=exact)
            sp = {k: 2 * sum(a.n_sparse.values()) for k, a in
                  (("one", one), ("zero", zero), ("half", half))}
            # κ = 1: low rank first; sparse only beyond the full low-rank cost (or the slack)
            if b_c <= p_l:
                assert sp["one"] < (step if exact else 1)
            else:
                assert one.phi_low_rank == 1.0
            # κ = 0: sparse first; low rank only beyond the full sparse cost
            if b_c <= p_s:
                assert not any(zero.ranks.values())
            elif not exact:
                assert all(zero.n_sparse[p] == b.nnz for p, b in surrogate.items())
            else:
                assert p_s - sp["zero"] < step
            assert one.phi_low_rank >= half.phi_low_rank >= zero.phi_low_rank
            assert sp["one"] <= sp["half"] <= sp["zero"]


def test_budget_one_reproduces_the_model(model):
    graphdef, params, surrogate = model
    a = allocate(surrogate, 1.0, params=params)
    assert a.phi_low_rank == a.phi_sparse == 1.0 and a.params == param_count(params, surrogate)
    deployed = deploy(params, surrogate, a)
    assert deployed["final_norm"]["scale"] is params["final_norm"]["scale"]
    tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % NANO.vocab_size
    np.testing.assert_allclose(forward(graphdef, deployed, tokens),
                               forward(graphdef, params, tokens), atol=1e-5)
    # and truncation does change the constrained blocks only
    budget = (minimum_budget(params, surrogate)
              + param_count(params, surrogate) / a.dense_params) / 2
    small = deploy(params, surrogate, allocate(surrogate, budget, params=params))
    assert not np.allclose(small["embed"]["embedding"], params["embed"]["embedding"])
    assert small["lm_head"]["kernel"] is params["lm_head"]["kernel"]


def test_orbax_round_trip_and_cli(model, checkpoint, capsys, tmp_path):
    from experiments.deploy import main

    _, params, surrogate = model
    directory, text, _ = checkpoint
    loaded = load_model(directory)  # the surrogate/ folder does not disturb the dense steps
    restored = load_surrogate(directory)
    assert list(restored) == list(surrogate)
    for p, b in surrogate.items():
        r = restored[p]
        assert r.shape == b.shape
        for f in ("u", "s", "v", "values", "indices"):
            assert np.array_equal(getattr(r, f), getattr(b, f)) and \
                getattr(r, f).dtype == getattr(b, f).dtype
    budget = round((minimum_budget(params, surrogate)
                    + param_count(params, surrogate) / count_params(params)) / 2, 3)
    a = allocate(surrogate, budget, 0.5, params=params)
    assert 0 < a.phi_low_rank < 1 and 0 < a.phi_sparse < 1
    assert allocate(restored, budget, 0.5, params=loaded.params) == a
    ours, theirs = deploy(params, surrogate, a), deploy(loaded.params, restored, a)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        assert np.array_equal(x, y)

    out = tmp_path / "deployed"
    ppl = main(["--checkpoint", str(directory), "--budget", str(budget), "--text", str(text),
                "--seq_len", "32", "--batch_size", "4", "--max_batches", "2", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"params: {a.params}" in lines
    assert re.fullmatch(r"perplexity: [0-9.]+", lines[-1]) and math.isfinite(ppl) and ppl > 1
    redeployed = load_model(out)  # compact by default: factors + sparse entries per linear
    assert redeployed.meta["hpa"]["params"] == a.params
    assert redeployed.meta["hpa"]["ranks"] == a.ranks
    assert redeployed.layouts
    twin = dense_params(redeployed.config, redeployed.layouts, redeployed.params)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(twin)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_interrupted_and_repeated_saves(model, checkpoint, tmp_path):
    _, params, surrogate = model
    tokenizer = checkpoint[2]
    other = save_model(tmp_path / "plain", params, model_config=NANO, tokenizer=tokenizer)
    # leftovers of a killed save (orbax temp dir, our staging dir) never load as a surrogate
    (other / f".{SURROGATE_DIR}.incoming-123.orbax-checkpoint-tmp-1").mkdir()
    (other / f".{SURROGATE_DIR}.incoming-123").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no surrogate.*not trained with SALAAD"):
        load_surrogate(other)
    assert load_model(other).step == 0
    # saving over an existing surrogate replaces it whole
    first = next(iter(surrogate))
    save_surrogate(other, surrogate)
    save_surrogate(other, {first: surrogate[first]})
    assert list(load_surrogate(other)) == [first]
    assert [p.name for p in other.iterdir() if "surrogate" in p.name] == [SURROGATE_DIR]


def test_relative_checkpoint_paths(model, checkpoint, tmp_path, monkeypatch):
    _, params, surrogate = model
    monkeypatch.chdir(tmp_path)
    save_model("rel", params, model_config=NANO, tokenizer=checkpoint[2])
    save_surrogate("rel", surrogate)
    assert set(load_surrogate("rel")) == set(surrogate)
    assert load_model("rel").step == 0


def test_bad_inputs(model, checkpoint, tmp_path):
    from experiments.deploy import main

    _, params, surrogate = model
    _, text, tokenizer = checkpoint
    for budget in (0.0, -0.2, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"budget must be in \(0\.0, 1\.0\]"):
            allocate(surrogate, budget, params=params)
    with pytest.raises(TypeError, match="budget must be a real number"):
        allocate(surrogate, True, params=params)
    lo = minimum_budget(params, surrogate)
    with pytest.raises(ValueError, match=f"smallest representable.*{lo:.6g}"):
        allocate(surrogate, lo / 2, params=params)
    allocate(surrogate, lo, params=params)  # exactly the minimum: every block emptied
    for kappa in (-0.1, 1.1, float("inf")):
        with pytest.raises(ValueError, match="kappa"):
            allocate(surrogate, 0.5, kappa, params=params)
    wrong = {"embed/embedding": next(b for p, b in surrogate.items() if p != "embed/embedding")}
    with pytest.raises(ValueError, match="shape"):
        allocate(wrong, 0.5, params=params)
    with pytest.raises(ValueError, match="not leaves of params"):
        allocate({"nope/kernel": surrogate["embed/embedding"]}, 0.5, params=params)
    a = allocate(surrogate, 0.5, params=params)
    with pytest.raises(ValueError, match="different blocks"):
        deploy(params, {"embed/embedding": surrogate["embed/embedding"]}, a)
    assert isinstance(a, Allocation)

    plain = save_model(tmp_path / "plain", params, model_config=NANO, tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match=r"no surrogate.*RPCA"):
        load_surrogate(plain)
    with pytest.raises(FileNotFoundError, match="no surrogate"):
        main(["--checkpoint", str(plain), "--budget", "0.5", "--text", str(text)])
    with pytest.raises(FileNotFoundError):
        save_surrogate(tmp_path / "not-a-checkpoint", surrogate)
    b = surrogate["embed/embedding"]
    bad = {"embed/embedding": b._replace(s=b.s.copy())}
    bad["embed/embedding"].s[0] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite"):
        save_surrogate(plain, bad)
    assert not (plain / SURROGATE_DIR).exists()
    with pytest.raises(ValueError, match="same shape"):
        block_surrogate(np.zeros((3, 4)), np.zeros((4, 3)))


# --------------------------------------------------------------------------------------------------
# Block-structured sparse parts (b × b tiles)
# --------------------------------------------------------------------------------------------------

B = 16


def planted_tiles(rng, m, n, rank, n_tiles, b=B):
    """Planted L + S with S a union of ``n_tiles`` random whole b × b tiles (kernel zero-padded
    to multiples of b; edge tiles partial), each tile scaled apart so their norms are distinct."""
    low = (rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) * 0.02)
    rows, cols = -(-m // b), -(-n // b)
    padded = np.zeros((rows * b, cols * b))
    for k, t in enumerate(rng.choice(rows * cols, n_tiles, replace=False)):
        r, c = divmod(int(t), cols)
        padded[r * b:(r + 1) * b, c * b:(c + 1) * b] = (
            rng.standard_normal((b, b)) * 0.05 * (1 + k))
    return low.astype(np.float32), padded[:m, :n].astype(np.float32)


def tile_norm_order(sparse, b=B):
    """Reference: (tile index, tile) of the nonzero tiles, Frobenius norm descending."""
    m, n = sparse.shape
    rows, cols = -(-m // b), -(-n // b)
    padded = np.zeros((rows * b, cols * b), np.float32)
    padded[:m, :n] = sparse
    tiles = padded.reshape(rows, b, cols, b).transpose(0, 2, 1, 3).reshape(-1, b, b)
    norms = np.linalg.norm(tiles.reshape(len(tiles), -1), axis=1)
    order = [int(t) for t in np.argsort(-norms, kind="stable") if norms[t] > 0]
    return order, tiles


def test_block_surrogate_stores_whole_tiles_by_norm_and_truncates():
    rng = np.random.default_rng(7)
    low, sparse = planted_tiles(rng, 40, 37, 4, 5)  # 3 × 3 grid, partial right/bottom tiles
    b = block_surrogate(low, sparse, sparse_structure="block16")
    order, tiles = tile_norm_order(sparse)
    assert (b.sparse_block, b.nnz, b.values.shape) == (B, 5, (5, B, B))
    assert b.indices.tolist() == order and b.indices.dtype == np.int32
    np.testing.assert_array_equal(b.values, tiles[order])
    np.testing.assert_allclose(reconstruct(b), low + sparse, atol=1e-6)
    u, s, vt = np.linalg.svd(low.astype(np.float64))
    top = np.zeros((48, 48), np.float32)
    for t in order[:2]:  # the two largest tiles, whole
        r, c = divmod(t, 3)
        top[r * B:(r + 1) * B, c * B:(c + 1) * B] = tiles[t]
    np.testing.assert_allclose(reconstruct(b, 3, 2), (u[:, :3] * s[:3]) @ vt[:3] + top[:40, :37],
                               atol=1e-6)
    assert block_surrogate(low, sparse).sparse_block == 1  # default: entries, as before
    # canonicalisation: padding beyond the shape is dropped, all-zero tiles removed
    junk = np.ones((2, B, B), np.float32)
    junk[1, :, :] = 0.0
    junk[1, 8:, :] = 1.0  # tile 8 (rows 32:48 of a 40-row block): only padding rows set
    c = block_surrogate_from_factors(b.u, b.s, b.v, junk, [0, 8], (40, 37), sparse_block=B)
    assert c.indices.tolist() == [0] and c.nnz == 1
    with pytest.raises(ValueError, match="indices must lie in"):
        block_surrogate_from_factors(b.u, b.s, b.v, junk, [0, 9], (40, 37), sparse_block=B)
    with pytest.raises(ValueError, match="sparse_structure"):
        block_surrogate(low, sparse, sparse_structure="2:4")


@pytest.fixture(scope="module")
def tiled(model):
    """The nano params' constrained blocks as planted L + whole-tile S (b = 16), and their
    block-structured surrogate."""
    _, params, _ = model
    rng = np.random.default_rng(8)
    parts = {}

    def make(path, x):
        if not is_block(path, x):
            return x
        m, n = x.shape
        grid = -(-m // B) * -(-n // B)
        parts[path_str(path)] = planted_tiles(rng, m, n, 3, int(rng.integers(2, grid // 3 + 2)))
        return jnp.asarray(sum(parts[path_str(path)]))

    params = jax.tree_util.tree_map_with_path(make, params)
    lows, sparses = ({p: parts[p][i] for p in parts} for i in (0, 1))
    surrogate = {p: block_surrogate(lows[p], sparses[p], sparse_structure=f"block{B}")
                 for p in parts}
    return params, surrogate


def test_block_surrogate_round_trip(tiled, checkpoint, tmp_path):
    params, surrogate = tiled
    directory = save_model(tmp_path / "ckpt", params, model_config=NANO,
                           tokenizer=checkpoint[2])
    save_surrogate(directory, surrogate)
    restored = load_surrogate(directory)
    assert list(restored) == list(surrogate)
    for p, b in surrogate.items():
        r = restored[p]
        assert r.sparse_block == B and r.shape == b.shape
        for f in ("u", "s", "v", "values", "indices"):
            assert np.array_equal(getattr(r, f), getattr(b, f)) and \
                getattr(r, f).dtype == getattr(b, f).dtype
        np.testing.assert_array_equal(reconstruct(r, 1, 1), reconstruct(b, 1, 1))


def test_hpa_keeps_a_shared_fraction_of_tiles_at_tile_cost(tiled):
    """Every block keeps ⌊ϕS·k_b⌋ or ⌊ϕS·k_b⌋ + 1 of its largest tiles, a tile costs b² + 1,
    and the exact count lands within one tile's cost below the target."""
    params, surrogate = tiled
    cost = B * B + 1
    assert block_cost((64, 64), 2, 3, B) == 2 * 129 + 3 * cost
    assert block_cost((64, 64), 2, 3) == 2 * 129 + 6  # entries: unchanged
    dense, full = count_params(params), param_count(params, surrogate)
    assert full == dense - sum(m * n for m, n in (b.shape for b in surrogate.values())) + sum(
        b.rank * (b.shape[0] + b.shape[1] + 1) + cost * b.nnz for b in surrogate.values())
    lo = minimum_budget(params, surrogate)
    for budget in np.linspace(lo + 0.01, full / dense - 0.001, 6):
        for exact in (True, False):
            a = allocate(surrogate, float(budget), 0.5, params=params, exact=exact)
            assert a.params == param_count(params, surrogate, a.ranks, a.n_sparse) <= a.budget
            if exact:
                assert a.budget - a.params < cost or a.n_sparse == {
                    p: b.nnz for p, b in surrogate.items()}
            for p, b in surrogate.items():
                floor = math.floor(a.phi_sparse * b.nnz + 1e-9)
                assert a.n_sparse[p] in ((floor, floor + 1) if exact else (floor,))
            deployed = deploy(params, surrogate, a)
            flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(deployed)[0]}
            p = "layers/0/mlp/up_proj/kernel"
            b = surrogate[p]
            order, tiles = tile_norm_order(reconstruct(b, 0))
            kept = np.zeros_like(tiles)
            kept[order[:a.n_sparse[p]]] = tiles[order[:a.n_sparse[p]]]
            rows, cols = -(-b.shape[0] // B), -(-b.shape[1] // B)
            top = kept.reshape(rows, cols, B, B).transpose(0, 2, 1, 3).reshape(
                rows * B, cols * B)[:b.shape[0], :b.shape[1]]
            np.testing.assert_allclose(np.asarray(flat[p]),
                                       reconstruct(b, a.ranks[p], 0) + top, atol=1e-6)
    a = allocate(surrogate, 1.0, params=params)
    assert a.n_sparse == {p: b.nnz for p, b in surrogate.items()} and a.params == full


def test_hpa_refuses_mixed_sparse_units_and_sensitivity_prices_tiles(model, tiled):
    params, surrogate = tiled
    mixed = dict(surrogate)
    mixed["embed/embedding"] = block_surrogate(*planted(np.random.default_rng(9),
                                                        *surrogate["embed/embedding"].shape,
                                                        2, 0.05))
    with pytest.raises(ValueError, match="one sparse unit"):
        allocate(mixed, 0.5, params=params)
    fisher = {p: np.ones(b.shape, np.float32) for p, b in surrogate.items()}
    sens = unit_sensitivity(surrogate, fisher)
    for p, b in surrogate.items():  # a tile scores ½ Σ F·v² over its entries
        np.testing.assert_allclose(sens[p].sparse,
                                   0.5 * np.sum(b.values.astype(np.float64) ** 2, axis=(1, 2)),
                                   rtol=1e-5)
    budget = (minimum_budget(params, surrogate) + param_count(params, surrogate)
              / count_params(params)) / 2
    a = allocate(surrogate, budget, params=params, strategy="sensitivity", sensitivity=sens)
    assert 0 < sum(a.n_sparse.values()) < sum(b.nnz for b in surrogate.values())
    assert a.params == param_count(params, surrogate, a.ranks, a.n_sparse) <= a.budget
    assert a.budget - a.params < NANO.vocab_size + NANO.dim + 1  # < the costliest unit
