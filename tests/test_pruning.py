"""Tests of the layer-by-layer capture and the one-shot pruning baselines (magnitude, Wanda,
SparseGPT).

Capture is checked against the model's own forward pass (linear inputs recorded by wrapping the
linears of an eager model); SparseGPT against a literal float64 NumPy port of Alg. 1 of Frantar &
Alistarh (2023) in the paper's ``[out, in]`` layout (with our per-block tile selection for block
structures); the methods' ordering on reconstruction error on random and on real SmolLM2
activations (shared, module-scoped model load).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from admm_jax.data import calibration_samples, prepare_corpus
from admm_jax.elsa import elsa, finalize
from admm_jax.models.llama import LlamaConfig, forward, init_params
from admm_jax.ops.projection import keep_count, topk_mask
from admm_jax.ops.structures import NM, Block, Unstructured, block_tiles, structure_mask
from admm_jax.pruning import (
    INPUT_SITES,
    LINEAR_INPUTS,
    PRUNERS,
    CapturedBlock,
    capture_blocks,
    get_pruner,
    gram_stats,
    magnitude_prune,
    per_kernel,
    prune,
    register_pruner,
    registered_methods,
    sparsegpt_prune,
    sqnorm_stats,
    unregister_pruner,
    wanda_prune,
)

# A nano model whose linears have every kind of input width (dim 64, attention 64, MLP 176, so
# 2:4 and 4:8 both apply) and weights large enough for non-trivial attention patterns.
NANO = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=176,
                   max_seq_len=32, init_std=0.1)
KERNEL_PATHS = [f"layers/{i}/{linear}/kernel" for i in range(NANO.n_layers)
                for linear in LINEAR_INPUTS]


@pytest.fixture(scope="module")
def nano():
    graphdef, params = init_params(NANO, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (5, 16), 0, NANO.vocab_size))
    return graphdef, params, tokens


def get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[int(key) if key.isdigit() else key]
    return tree


class Tap:
    """Wraps a linear layer and records its inputs."""

    def __init__(self, linear, log: list):
        self.linear, self.log = linear, log

    def __call__(self, x):
        self.log.append(x)
        return self.linear(x)


def reference_grams(graphdef, params, tokens) -> list[dict[str, np.ndarray]]:
    """``Σ x xᵀ`` of the input of every linear, recorded from the model's own forward."""

    @jax.jit
    def linear_inputs(params, tokens):
        model = nnx.merge(graphdef, params)
        logs = []
        for layer in model.layers:
            logs.append({})
            for linear in LINEAR_INPUTS:
                group, name = linear.split("/")
                module = getattr(layer, group)
                logs[-1][linear] = []
                setattr(module, name, Tap(getattr(module, name), logs[-1][linear]))
        model(tokens)
        return [{linear: x for linear, (x,) in log.items()} for log in logs]

    def gram(x):
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        return x.T @ x

    return [{linear: gram(x) for linear, x in log.items()}
            for log in linear_inputs(params, jnp.asarray(tokens))]


def batch_tile_counts(shape: tuple[int, int], tile: int, sparsity: float,
                      blocksize: int) -> np.ndarray:
    """Tiles SparseGPT keeps in each lazy batch of ``blocksize`` inputs of a ``[in, out]`` kernel:
    the differences of the per-tensor ``keep_count`` over the cumulative rows of tiles."""
    rows, cols = (-(-n // tile) for n in shape)
    ends = np.minimum(np.arange(0, rows + blocksize // tile, blocksize // tile), rows)
    ends = ends[:np.argmax(ends == rows) + 1]
    return np.diff([keep_count(cols * int(r), sparsity) for r in ends])


def recorder(store: dict):
    def callback(block: CapturedBlock) -> dict:
        store[block.index] = block
        return block.params
    return callback


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------

def test_capture_grams_match_model_forward(nano):
    graphdef, params, tokens = nano
    seen = {}
    new_params, hidden = capture_blocks(graphdef, params, tokens, recorder(seen), batch_size=2,
                                        verbose=False)  # 5 samples: batches of 2, 2, 1
    reference = reference_grams(graphdef, params, tokens)
    for i in (0, 1):
        block = seen[i]
        assert block.n_tokens == tokens.size
        for linear, site in LINEAR_INPUTS.items():
            np.testing.assert_allclose(block.stats[site], reference[i][linear], rtol=2e-4,
                                       atol=2e-4 * np.abs(reference[i][linear]).max())
    # identity callback: same params, and the final residual stream is the model's
    np.testing.assert_array_equal(new_params["layers"][1]["mlp"]["up_proj"]["kernel"],
                                  params["layers"][1]["mlp"]["up_proj"]["kernel"])
    logits = nnx.merge(graphdef, params).unembed(hidden)
    np.testing.assert_allclose(logits, forward(graphdef, params, jnp.asarray(tokens)),
                               rtol=1e-4, atol=1e-4)


def test_capture_is_sequential(nano):
    """Zeroing block 0 in the callback makes it the identity (zero norm scales): block 1 must then
    see the embedding, and the callback of block 1 still gets block 1's original params."""
    graphdef, params, tokens = nano
    seen = {}

    def zero_first(block: CapturedBlock) -> dict:
        seen[block.index] = block
        if block.index == 0:
            return jax.tree_util.tree_map(jnp.zeros_like, block.params)
        return block.params

    new_params, _ = capture_blocks(NANO, params, tokens, zero_first, num_blocks=2, verbose=False)
    assert set(seen) == {0, 1}
    assert all(not np.any(leaf) for leaf in jax.tree_util.tree_leaves(new_params["layers"][0]))
    np.testing.assert_array_equal(seen[1].params["attn"]["q_proj"]["kernel"],
                                  params["layers"][1]["attn"]["q_proj"]["kernel"])
    embedded = np.asarray(params["embed"]["embedding"])[tokens]
    np.testing.assert_allclose(seen[1].inputs, embedded, rtol=1e-6, atol=1e-7)
    zeroed = {**params, "layers": {**params["layers"], 0: new_params["layers"][0]}}
    reference = reference_grams(graphdef, zeroed, tokens)[1]
    for linear, site in LINEAR_INPUTS.items():
        np.testing.assert_allclose(seen[1].stats[site], reference[linear], rtol=2e-4,
                                   atol=2e-4 * np.abs(reference[linear]).max())


def test_capture_custom_stats_and_activations(nano):
    _, params, tokens = nano
    grams, sqnorms = {}, {}
    capture_blocks(NANO, params, tokens, recorder(grams), verbose=False)
    capture_blocks(NANO, params, tokens, recorder(sqnorms), stats=sqnorm_stats, verbose=False)
    block = grams[1]
    acts = block.activations()
    assert acts.mlp_hidden.shape == (*tokens.shape, NANO.mlp_dim)
    np.testing.assert_allclose(acts.x, block.inputs)
    for site in INPUT_SITES:
        x = np.asarray(getattr(acts, site), np.float64).reshape(-1, getattr(acts, site).shape[-1])
        np.testing.assert_allclose(block.stats[site], x.T @ x, rtol=2e-4,
                                   atol=2e-4 * np.abs(x.T @ x).max())
        np.testing.assert_allclose(sqnorms[1].stats[site], np.diag(block.stats[site]),
                                   rtol=1e-4)
    # activations with other params: zero down_proj leaves the MLP output at zero
    zero_down = {**block.params, "mlp": {**block.params["mlp"], "down_proj": {
        "kernel": jnp.zeros_like(block.params["mlp"]["down_proj"]["kernel"])}}}
    other = block.activations(zero_down)
    np.testing.assert_allclose(other.out, other.mid)


def test_capture_rejects_bad_input(nano):
    graphdef, params, tokens = nano
    keep = lambda block: block.params
    with pytest.raises(ValueError, match="empty"):
        capture_blocks(NANO, params, np.zeros((0, 16), np.int32), keep)
    with pytest.raises(ValueError, match="2-D"):
        capture_blocks(NANO, params, tokens[0], keep)
    with pytest.raises(ValueError, match="integer"):
        capture_blocks(NANO, params, tokens.astype(np.float32), keep)
    with pytest.raises(ValueError, match="max_seq_len"):
        capture_blocks(NANO, params, np.zeros((2, 33), np.int32), keep)
    with pytest.raises(ValueError, match="expected seq_len=8"):
        capture_blocks(NANO, params, tokens, keep, seq_len=8)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        capture_blocks(NANO, params, np.full((2, 4), 256), keep)
    with pytest.raises(ValueError, match="batch_size"):
        capture_blocks(NANO, params, tokens, keep, batch_size=0)
    with pytest.raises(ValueError, match="num_blocks"):
        capture_blocks(NANO, params, tokens, keep, num_blocks=3)
    with pytest.raises(ValueError, match="params do not match"):
        capture_blocks(dataclasses.replace(NANO, dim=32), params, tokens, keep)
    with pytest.raises(ValueError, match="callback must return"):
        capture_blocks(graphdef, params, tokens, lambda block: block.params["mlp"],
                       verbose=False)


# ---------------------------------------------------------------------------------------------
# Whole-model pruning: exact sparsity and mask consistency
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("structure", ["unstructured", "2:4", "block16", "block32"])
def test_prune_exact_sparsity(nano, method, structure):
    """Block 32 leaves partial tiles on the MLP width 176 = 5.5 · 32."""
    graphdef, params, tokens = nano
    sparsity = 0.6
    pruned, masks = prune(graphdef, params, tokens, method=method, sparsity=sparsity,
                          structure=structure, blocksize=32, verbose=False)
    assert list(masks) == KERNEL_PATHS
    for path, mask in masks.items():
        w, mask = np.asarray(get(pruned, path)), np.asarray(mask)
        assert mask.dtype == bool and mask.shape == w.shape
        assert not np.any(w[~mask]), path
        assert np.all(w[mask] != 0), path  # random weights: every kept entry is non-zero
        d_in, d_out = w.shape
        if structure.startswith("block"):
            tile = int(structure[5:])
            tiles = np.asarray(block_tiles(mask, tile))  # whole tiles only
            assert tiles.sum() == keep_count(tiles.size, sparsity), path  # per tensor
            if method == "sparsegpt":  # and per lazy batch of 32 inputs
                per_batch = 32 // tile
                kept = [tiles[r:r + per_batch].sum() for r in range(0, len(tiles), per_batch)]
                np.testing.assert_array_equal(
                    kept, batch_tile_counts(w.shape, tile, sparsity, 32), path)
        elif structure != "unstructured":
            n, m = map(int, structure.split(":"))
            np.testing.assert_array_equal(mask.reshape(d_in // m, m, d_out).sum(1), n)
        elif method == "wanda":  # per output
            np.testing.assert_array_equal(mask.sum(0), keep_count(d_in, sparsity))
        else:  # per tensor
            assert mask.sum() == keep_count(w.size, sparsity)
        if method != "sparsegpt":  # no weight update
            np.testing.assert_array_equal(w[mask], np.asarray(get(params, path))[mask])
    untouched = ["embed/embedding", "final_norm/scale", "lm_head/kernel",
                 "layers/0/attn_norm/scale", "layers/1/mlp_norm/scale"]
    for path in untouched:
        np.testing.assert_array_equal(get(pruned, path), get(params, path))


def test_prune_rejects_bad_arguments(nano):
    graphdef, params, tokens = nano
    with pytest.raises(ValueError, match="method must be one of"):
        prune(graphdef, params, tokens, method="obs")
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            prune(graphdef, params, method="magnitude", sparsity=bad)
    for bad in ("0.5", True):
        with pytest.raises(TypeError, match="sparsity"):
            prune(graphdef, params, method="magnitude", sparsity=bad)
    with pytest.raises(ValueError, match="structure"):
        prune(graphdef, params, structure="2-4")
    with pytest.raises(ValueError, match="N < M"):
        prune(graphdef, params, structure="4:2")
    with pytest.raises(ValueError, match=r"M = 32 must divide .* mlp/down_proj"):
        prune(NANO, params, structure="1:32")
    with pytest.raises(ValueError, match="needs calibration"):
        prune(graphdef, params, None, method="wanda")
    with pytest.raises(ValueError, match="empty"):
        prune(graphdef, params, np.zeros((0, 16), np.int32), method="sparsegpt")
    with pytest.raises(ValueError, match="max_seq_len"):
        prune(graphdef, params, np.zeros((1, 64), np.int32), method="wanda")
    with pytest.raises(ValueError, match="blocksize"):
        prune(graphdef, params, tokens, method="sparsegpt", blocksize=0)
    with pytest.raises(ValueError, match="multiple of M"):
        prune(graphdef, params, tokens, method="sparsegpt", structure="4:8", blocksize=12)
    with pytest.raises(ValueError, match=r"blocksize \(16\) must be a multiple of the block "
                                         r"size 32 for block32"):
        prune(graphdef, params, tokens, method="sparsegpt", structure="block32", blocksize=16)
    with pytest.raises(ValueError, match="block size must be an integer >= 1"):
        prune(graphdef, params, structure="block0")
    with pytest.raises(ValueError, match="percdamp"):
        prune(graphdef, params, tokens, method="sparsegpt", percdamp=-1.0)


# ---------------------------------------------------------------------------------------------
# The registry and structures
# ---------------------------------------------------------------------------------------------

def smallest_prune(w, *, sparsity, structure, power=1.0):
    """A toy method: keep the entries with the *smallest* ``|w|^power`` of the tensor."""
    assert isinstance(structure, Unstructured)
    keep = topk_mask(-jnp.abs(jnp.asarray(w)) ** power, keep_count(w.size, sparsity))
    return jnp.where(keep, w, 0), keep


@pytest.fixture
def smallest():
    record = register_pruner("smallest", per_kernel(smallest_prune), stats=None,
                             structures=(Unstructured,), defaults={"power": 1.0})
    yield record
    unregister_pruner("smallest")


def test_registered_toy_method_runs_through_prune(nano, smallest):
    graphdef, params, _ = nano
    assert get_pruner("smallest") is smallest is PRUNERS["smallest"]
    assert registered_methods()[-1] == "smallest"
    import admm_jax.pruning as pruning
    assert "smallest" in pruning.METHODS
    pruned, masks = prune(graphdef, params, method="smallest", sparsity=0.75, power=2.0,
                          blocksize=32, verbose=False)  # another method's option is ignored
    assert list(masks) == KERNEL_PATHS
    for path, mask in masks.items():
        w = np.abs(np.asarray(get(params, path)))
        mask = np.asarray(mask)
        assert mask.sum() == keep_count(w.size, 0.75)
        assert w[mask].max() <= w[~mask].min(), path  # kept exactly the smallest entries
        np.testing.assert_array_equal(np.asarray(get(pruned, path)),
                                      np.where(mask, get(params, path), 0))
    with pytest.raises(ValueError, match=r"does not support structure 2:4.*Unstructured$"):
        prune(graphdef, params, method="smallest", structure="2:4")
    with pytest.raises(TypeError, match=r"unknown pruning options \['powr'\].*\['power'\]"):
        prune(graphdef, params, method="smallest", powr=2.0)
    with pytest.raises(ValueError, match="already registered"):
        register_pruner("smallest", per_kernel(smallest_prune), stats=None,
                        structures=(Unstructured,))


def test_unknown_method_lists_registered_names(nano):
    graphdef, params, tokens = nano
    methods = registered_methods()
    assert methods[:3] == ("magnitude", "wanda", "sparsegpt")  # then SPAP's, importing admm_jax
    assert {"spap", "mag-neuron", "flap", "wanda-neuron"} <= set(methods)
    with pytest.raises(ValueError, match=re.escape(
            f"method must be one of {sorted(methods)}")):
        prune(graphdef, params, tokens, method="obs")
    with pytest.raises(ValueError, match="structures must be a non-empty subset"):
        register_pruner("bad", per_kernel(smallest_prune), stats=None, structures=(tuple,))


def test_magnitude_channel_keeps_whole_output_columns(nano):
    graphdef, params, _ = nano
    sparsity = 0.3
    pruned, masks = prune(graphdef, params, structure="channel", sparsity=sparsity,
                          verbose=False)
    for path, mask in masks.items():
        w, mask = np.asarray(get(params, path)), np.asarray(mask)
        kept = mask.all(axis=0)
        np.testing.assert_array_equal(mask, np.broadcast_to(kept, mask.shape))  # whole columns
        assert kept.sum() == keep_count(w.shape[1], sparsity), path
        norms = np.abs(w).sum(axis=0)
        assert norms[kept].min() >= norms[~kept].max(), path
        np.testing.assert_array_equal(np.asarray(get(pruned, path)), np.where(mask, w, 0))


def test_calibrated_methods_reject_channel(nano):
    graphdef, params, tokens = nano
    _, w, h = random_problem(0)
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ValueError, match=rf"method '{method}' does not support structure "
                                             r"channel .*it supports: Unstructured, NM"):
            prune(graphdef, params, tokens, method=method, structure="channel")
    with pytest.raises(ValueError, match="does not support structure channel"):
        wanda_prune(w, np.diag(h), structure="channel")
    with pytest.raises(ValueError, match="does not support structure channel"):
        sparsegpt_prune(w, h, structure="channel")


def test_structure_values_match_strings(nano):
    graphdef, params, tokens = nano
    x, w, h = random_problem(3)
    values = {"2:4": NM(2, 4), "unstructured": Unstructured(), "block16": Block(16)}
    for structure, value in values.items():
        for fn in (lambda s: magnitude_prune(w, structure=s),
                   lambda s: wanda_prune(w, np.sum(x ** 2, axis=0), structure=s),
                   lambda s: sparsegpt_prune(w, h, structure=s, blocksize=16)):
            for a, b in zip(fn(structure), fn(value)):
                np.testing.assert_array_equal(a, b)
    by_string = prune(graphdef, params, tokens, method="wanda", structure="2:4", verbose=False)
    by_value = prune(graphdef, params, tokens, method="wanda", structure=NM(2, 4),
                     verbose=False)
    for a, b in zip(*(jax.tree_util.tree_leaves(r) for r in (by_string, by_value))):
        np.testing.assert_array_equal(a, b)


def test_kernel_functions_reject_bad_shapes():
    w = np.ones((8, 4), np.float32)
    with pytest.raises(ValueError, match="2-D"):
        magnitude_prune(np.ones(8))
    with pytest.raises(ValueError, match="sqnorm"):
        wanda_prune(w, np.ones(4))
    with pytest.raises(ValueError, match="gram"):
        sparsegpt_prune(w, np.eye(4))
    with pytest.raises(ValueError, match="M = 3 must divide"):
        magnitude_prune(w, structure="1:3")
    with pytest.raises(ValueError, match="percdamp"):
        sparsegpt_prune(w, -np.eye(8), percdamp=0.0)


# ---------------------------------------------------------------------------------------------
# SparseGPT against Alg. 1; reconstruction error ordering
# ---------------------------------------------------------------------------------------------

def sparsegpt_reference(w: np.ndarray, h: np.ndarray, sparsity: float, nm, blocksize: int,
                        percdamp: float, tile: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Float64 port of SparseGPT Alg. 1 (reference ``SparseGPT.fasterprune``) on the ``[out, in]``
    weight ``W = wᵀ``, pruning exactly the per-block counts of :func:`sparsegpt_prune`; with
    ``tile = b``, at the start of every block its ``[b, b]`` tiles (those at the edges possibly
    narrower) with the smallest summed ``W² / [U]_ii²`` are pruned, as many as the cumulative
    tile count of the block says (ties: earliest tile of our ``[in, out]`` layout, row-major).
    Returns the pruned ``[in, out]`` kernel and its keep mask."""
    W, H = w.T.astype(np.float64), h.astype(np.float64)
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * np.mean(np.diag(H)) * np.eye(cols)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    done, pruned = 0, np.zeros(W.shape, bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].copy(), np.zeros((rows, i2 - i1)), Hinv[i1:i2, i1:i2]
        if tile is not None:
            grid = -(-rows // tile)
            count = int(np.floor(sparsity * (grid * -(-i2 // tile)) + 0.5)) - done
            done += count
            tmp = W1 ** 2 / np.diag(Hinv1)[None] ** 2
            starts = [(r, c) for r in range(0, i2 - i1, tile) for c in range(0, rows, tile)]
            sums = np.array([tmp[c:c + tile, r:r + tile].sum() for r, c in starts])
            mask1 = np.zeros(W1.shape, bool)
            for t in np.argsort(sums, kind="stable")[:count]:
                r, c = starts[t]
                mask1[c:c + tile, r:r + tile] = True
        elif nm is None:
            count = int(np.floor(sparsity * (rows * i2) + 0.5)) - done  # nearest count
            done += count
            tmp = (W1 ** 2 / np.diag(Hinv1)[None] ** 2).T.reshape(-1)  # our row-major order
            mask1 = np.zeros(tmp.size, bool)
            mask1[np.argsort(tmp, kind="stable")[:count]] = True
            mask1 = mask1.reshape(i2 - i1, rows).T
        else:
            mask1 = np.zeros(W1.shape, bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]] ** 2 / np.diag(Hinv1)[i:i + nm[1]][None] ** 2
                order = np.argsort(-tmp, axis=1, kind="stable")
                np.put_along_axis(mask1[:, i:i + nm[1]], order[:, nm[0]:], True, axis=1)
            q = np.where(mask1[:, i], 0.0, W1[:, i])
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.T, ~pruned.T


def random_problem(seed: int, n: int = 512, d_in: int = 48, d_out: int = 24):
    """Correlated inputs with feature scales spread over two orders of magnitude."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)
    x = rng.normal(size=(n, d_in)) @ mix * np.exp(rng.normal(size=d_in))
    w = rng.normal(size=(d_in, d_out)).astype(np.float32)
    return x, w, (x.T @ x).astype(np.float32)


def relative_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """``‖XW − XŴ‖_F / ‖XW‖_F`` from ``H = XᵀX``."""
    w, delta, h = (np.asarray(a, np.float64) for a in (w, np.asarray(w) - w_hat, h))
    return float(np.sqrt(np.sum(delta * (h @ delta)) / np.sum(w * (h @ w))))


@pytest.mark.parametrize("structure,sparsity,blocksize", [
    ("unstructured", 0.5, 20), ("unstructured", 0.7, 20), ("2:4", 0.5, 20), ("4:8", 0.5, 32),
    ("block16", 0.5, 32), ("block8", 0.6, 32), ("block16", 0.7, 16), ("block16", 0.6, 64)])
def test_sparsegpt_matches_algorithm_1(structure, sparsity, blocksize):
    """Inputs not a multiple of blocksize (48), a dead input, per-block counts, N:M and tiles
    chosen per block (24 outputs: a partial 8-wide tile per row of 16 × 16 tiles; rows of tiles
    of padding only in the last block of 8 × 8 tiles at blocksize 32 and of 16 × 16 at 64; one
    row of tiles per block at blocksize 16)."""
    _, w, h = random_problem(0)
    h[5, :], h[:, 5] = 0, 0
    nm = tile = None
    if structure.startswith("block"):
        tile = int(structure[5:])
    elif structure != "unstructured":
        nm = tuple(map(int, structure.split(":")))
    pruned, keep = sparsegpt_prune(w, h, sparsity=sparsity, structure=structure,
                                   blocksize=blocksize)
    expected, expected_keep = sparsegpt_reference(w, h, sparsity, nm, blocksize, 0.01, tile)
    np.testing.assert_array_equal(np.asarray(keep), expected_keep)
    # pruned entries are zero; kept ones too only on the dead input (a tile keeps it whole)
    alive = (np.arange(48) != 5)[:, None]
    np.testing.assert_array_equal(np.asarray(pruned) != 0, expected_keep & alive)
    np.testing.assert_allclose(pruned, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    assert not np.any(np.asarray(pruned)[5])


def test_kernel_functions_keep_n_of_every_m():
    x, w, h = random_problem(2)
    for _, keep in (magnitude_prune(w, structure="4:8"),
                    wanda_prune(w, np.sum(x ** 2, axis=0), structure="4:8"),
                    sparsegpt_prune(w, h, structure="4:8", blocksize=16)):
        np.testing.assert_array_equal(np.asarray(keep).reshape(6, 8, 24).sum(1), 4)


def test_kernel_functions_keep_whole_tiles():
    """37 × 70 with 16 × 16 tiles (3 × 5 tiles, partial ones on both edges): every method keeps
    the keep_count(15) tiles of the tensor, magnitude and Wanda those of largest summed score,
    SparseGPT (blocksize 32) keep_count(10) of the first two rows of tiles and the rest of the
    third; every kernel is zero exactly off its mask."""
    x, w, h = random_problem(2, d_in=37, d_out=70)
    sqnorm = np.sum(x ** 2, axis=0)
    for sparsity in (0.3, 0.6):
        scores = {"magnitude": np.abs(w), "wanda": np.abs(w) * np.sqrt(sqnorm)[:, None]}
        results = {"magnitude": magnitude_prune(w, sparsity=sparsity, structure="block16"),
                   "wanda": wanda_prune(w, sqnorm, sparsity=sparsity, structure="block16"),
                   "sparsegpt": sparsegpt_prune(w, h, sparsity=sparsity, structure="block16",
                                                blocksize=32)}
        for name, (pruned, keep) in results.items():
            tiles, keep = np.asarray(block_tiles(keep, 16)), np.asarray(keep)
            assert tiles.shape == (3, 5)
            np.testing.assert_array_equal(np.asarray(pruned) != 0, keep)
            assert tiles.sum() == keep_count(15, sparsity)
            if name == "sparsegpt":
                assert tiles[:2].sum() == keep_count(10, sparsity)
                continue
            np.testing.assert_array_equal(keep, structure_mask(jnp.asarray(scores[name]),
                                                               Block(16), sparsity))
            np.testing.assert_array_equal(np.asarray(pruned), np.where(keep, w, 0))
        assert not np.array_equal(results["magnitude"][1], results["wanda"][1])
    with pytest.raises(ValueError, match="multiple of the block size 16"):
        sparsegpt_prune(w, h, structure="block16", blocksize=24)


def correlated_problem(seed: int, n: int = 512, d_in: int = 96, d_out: int = 64,
                       factors: int = 8):
    """Inputs driven by a few shared factors (plus 30 % independent noise), all at one scale: an
    input's contribution is largely carried by the others, which the OBS updates exploit and
    magnitude pruning cannot."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, factors)) @ rng.normal(size=(factors, d_in))
         + 0.3 * rng.normal(size=(n, d_in)))
    w = rng.normal(size=(d_in, d_out)).astype(np.float32)
    return x, w, (x.T @ x).astype(np.float32)


def block_errors(x, w, h, sparsity, **options) -> dict[str, float]:
    """Relative reconstruction errors of the three methods at one block16 sparsity."""
    return {name: relative_error(w, np.asarray(pruned), h) for name, (pruned, _) in {
        "magnitude": magnitude_prune(w, sparsity=sparsity, structure="block16"),
        "wanda": wanda_prune(w, np.sum(x ** 2, axis=0), sparsity=sparsity, structure="block16"),
        "sparsegpt": sparsegpt_prune(w, h, sparsity=sparsity, structure="block16", **options),
    }.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_sparsegpt_reconstructs_better(seed):
    """At the same block sparsity (16 × 16 tiles dividing the kernel, so the same number of kept
    entries) SparseGPT's error is below magnitude's and Wanda's: far below on correlated inputs
    at one scale, below on inputs whose scales spread over two orders of magnitude, with the
    whole 96-input kernel in one lazy batch and with 384 inputs in three. There a row of tiles
    may be pruned whole; choosing per row of tiles (blocksize 16) cannot, and loses to Wanda."""
    x, w, h = correlated_problem(seed)
    for sparsity in (0.5, 0.75):
        errors = block_errors(x, w, h, sparsity)
        assert errors["sparsegpt"] < 0.5 * min(errors["magnitude"], errors["wanda"]), errors
    x, w, h = random_problem(seed, d_in=96, d_out=64)
    errors = block_errors(x, w, h, 0.5)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    tiles = np.asarray(block_tiles(sparsegpt_prune(w, h, structure="block16")[1], 16))
    assert tiles.sum() == keep_count(tiles.size, 0.5)
    assert not tiles.sum(1).all(), tiles.sum(1)  # a row of tiles pruned whole
    per_row = relative_error(w, np.asarray(
        sparsegpt_prune(w, h, structure="block16", blocksize=16)[0]), h)
    assert per_row > errors["wanda"], (per_row, errors)
    x, w, h = random_problem(seed, n=1024, d_in=384, d_out=64)
    errors = block_errors(x, w, h, 0.5)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_without_sparsity_is_identity():
    _, w, h = random_problem(1)
    pruned, keep = sparsegpt_prune(w, h, sparsity=0.0, percdamp=1e-8, blocksize=16)
    assert np.all(keep)
    np.testing.assert_allclose(pruned, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_reconstruction_error_ordering(seed, structure):
    x, w, h = random_problem(seed)
    errors = {name: relative_error(w, np.asarray(fn()[0]), h) for name, fn in {
        "magnitude": lambda: magnitude_prune(w, structure=structure),
        "wanda": lambda: wanda_prune(w, np.sum(x ** 2, axis=0), structure=structure),
        "sparsegpt": lambda: sparsegpt_prune(w, h, structure=structure, blocksize=16),
    }.items()}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M: real activations
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_block3(smollm2) -> CapturedBlock:
    """Block 3 of SmolLM2 with Gram matrices of 16 × 128 Shakespeare calibration tokens."""
    corpus = prepare_corpus("shakespeare", tokenizer=smollm2.tokenizer)
    tokens = calibration_samples(corpus, 16, 128, seed=0)
    seen = {}
    capture_blocks(smollm2.config, smollm2.params, tokens, recorder(seen), stats=gram_stats,
                   num_blocks=4, verbose=False)
    return seen[3]


@pytest.mark.parametrize("linear", ["attn/q_proj", "mlp/down_proj"])
@pytest.mark.parametrize("structure", ["unstructured", "2:4", "block16"])
def test_smollm2_calibrated_methods_beat_magnitude(smollm2_block3, linear, structure):
    block = smollm2_block3
    group, name = linear.split("/")
    w = np.asarray(block.params[group][name]["kernel"])
    h = np.asarray(block.stats[LINEAR_INPUTS[linear]])
    errors = {
        "magnitude": magnitude_prune(w, sparsity=0.5, structure=structure),
        "wanda": wanda_prune(w, np.diag(h), sparsity=0.5, structure=structure),
        "sparsegpt": sparsegpt_prune(w, h, sparsity=0.5, structure=structure),
    }
    errors = {k: relative_error(w, np.asarray(v[0]), h) for k, v in errors.items()}
    print(f"SmolLM2 block 3 {linear} {structure}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
    assert errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["magnitude"], errors


def test_every_method_counts_with_the_nearest_integer():
    """0.29·100 and 0.29·800 fall just below 29 and 232 in floating point; every count (per
    tensor, per output, SparseGPT's cumulative block counts, ELSA's final projection) must
    prune exactly those numbers, not one fewer."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(100, 8)), jnp.float32)
    x = rng.normal(size=(400, 100)).astype(np.float32)
    gram = jnp.asarray(x.T @ x)
    _, mask = magnitude_prune(w, sparsity=0.29)
    assert int((~np.asarray(mask)).sum()) == 232
    _, mask = wanda_prune(w, jnp.asarray((x ** 2).sum(0)), sparsity=0.29)
    np.testing.assert_array_equal((~np.asarray(mask)).sum(0), 29)
    for blocksize in (32, 100):  # several blocks, and one
        _, mask = sparsegpt_prune(w, gram, sparsity=0.29, blocksize=blocksize)
        assert int((~np.asarray(mask)).sum()) == 232, blocksize
    state = elsa(0.29, mask=lambda p: {"w": True}).init({"w": w})
    pruned, _ = finalize({"w": w}, state, 0.29)
    assert int((np.asarray(pruned["w"]) == 0).sum()) == 232
