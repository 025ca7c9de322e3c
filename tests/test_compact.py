"""Compact checkpoints: pruned (unstructured, 2:4, 16 × 16 and 32 × 32 blocks) and SALAAD
(low-rank + sparse) models stored as compact layers compute their dense twins' logits, survive
save -> load exactly, are scored by the evaluate CLI with nothing else, take bytes in proportion
to what they keep, and a checkpoint missing a part is refused by name."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax.core import path_str
from admm_jax.data import prepare_corpus
from admm_jax.models.compact import (
    assemble_compact,
    compact_from_masks,
    dense_params,
    masks_from_nonzeros,
    resident_bytes,
)
from admm_jax.models.layouts import (
    BlockSparseLayout,
    LowRankLayout,
    NMLayout,
    SparseLayout,
    SumLayout,
    layouts_from_json,
    layouts_to_json,
    structured_factory,
)
from admm_jax.models.linears import (
    SumLinear,
    block_sparse_from_dense,
    low_rank_from_factors,
    materialize,
)
from admm_jax.models.llama import LlamaConfig, abstract_params, forward, init_params
from admm_jax.pruning import prune
from admm_jax.salaad.compact import compact_from_surrogate
from admm_jax.salaad.hpa import allocate
from admm_jax.salaad.hpa import deploy as hpa_deploy
from admm_jax.salaad.surrogate import block_surrogate, reconstruct, save_surrogate
from admm_jax.training.checkpoint import (
    COMPACT_FORMAT,
    MODEL_FILE,
    LoadedModel,
    checkpoint_bytes,
    load_model,
    model_graphdef,
    save_model,
)
from experiments import compact as compact_cli
from experiments import deploy, evaluate

CONFIG = LlamaConfig.preset("nano", vocab_size=300)
WORDS = "the king and queen walk to the castle where a knight keeps watch over towers".split()
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 300, (2, 24)), jnp.int32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """``(root, tokenizer, dense params, text file)``."""
    root = tmp_path_factory.mktemp("compact")
    rng = np.random.default_rng(0)
    (root / "texts").mkdir()
    for d in range(3):
        (root / "texts" / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS, 900)) + "\n")
    corpus = prepare_corpus(str(root / "texts"), vocab_size=300, cache_dir=root / "cache")
    _, params = init_params(CONFIG, jax.random.key(0))
    return root, corpus.tokenizer, params, root / "texts" / "doc0.txt"


def _logits(params, layouts=None):
    graphdef = model_graphdef(LoadedModel(CONFIG, params, None, {}, 0, layouts or {}))
    return np.asarray(forward(graphdef, params, TOKENS))


def _flat(params):
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _random_masks(params, density, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.random(m.shape) < density
            for k, m in masks_from_nonzeros(CONFIG, params).items()}


def _pruned(params, masks):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * masks[path_str(p)] if path_str(p) in masks else x, params)


def _round_trip(tmp, name, model, tokenizer):
    directory = save_model(tmp / name, model.params, model_config=CONFIG, tokenizer=tokenizer,
                           layouts=model.layouts)
    loaded = load_model(directory)
    assert loaded.layouts == model.layouts
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params),
                    jax.tree_util.tree_leaves(model.params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return loaded


@pytest.fixture(scope="module")
def unstructured(base):
    _, _, params, _ = base
    masks = _random_masks(params, 0.1)
    # a masked leaf that is not a linear kernel (ELSA may constrain the embedding) stays dense
    everything = {**masks, "embed/embedding": np.ones(params["embed"]["embedding"].shape, bool)}
    return _pruned(params, masks), compact_from_masks(CONFIG, params, everything)


def test_unstructured_compact_equals_pruned_twin_and_round_trips(base, unstructured):
    root, tokenizer, params, _ = base
    pruned, model = unstructured
    assert set(model.layouts) == {p[:-len("/kernel")] for p in masks_from_nonzeros(CONFIG,
                                                                                    params)}
    assert all(isinstance(lay, SparseLayout) for lay in model.layouts.values())
    q = model.params["layers"][0]["attn"]["q_proj"]
    assert q["rows"].dtype == jnp.int16 and q["cols"].dtype == jnp.int16
    assert model.params["embed"]["embedding"] is params["embed"]["embedding"]  # kept as is
    dense = _logits(pruned)
    np.testing.assert_allclose(_logits(model.params, model.layouts), dense, atol=2e-5)
    loaded = _round_trip(root, "unstructured", model, tokenizer)
    np.testing.assert_allclose(_logits(loaded.params, loaded.layouts), dense, atol=2e-5)
    twin = dense_params(CONFIG, loaded.layouts, loaded.params)
    for a, b in zip(jax.tree_util.tree_leaves(twin), jax.tree_util.tree_leaves(pruned),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_two_four_compact_equals_pruned_twin_and_round_trips(base, tmp_path):
    _, tokenizer, params, _ = base
    pruned, masks = prune(CONFIG, params, method="magnitude", structure="2:4", verbose=False)
    model = compact_from_masks(CONFIG, pruned, masks, structure="2:4")
    assert set(model.layouts.values()) == {NMLayout(2, 4)}
    assert model.params["layers"][1]["mlp"]["down_proj"]["indices"].dtype == jnp.uint8
    np.testing.assert_allclose(_logits(model.params, model.layouts), _logits(pruned), atol=2e-5)
    loaded = _round_trip(tmp_path, "nm", model, tokenizer)
    np.testing.assert_allclose(_logits(loaded.params, loaded.layouts), _logits(pruned),
                               atol=2e-5)
    # resident: values at 1/2 of the kernel plus one uint8 per value
    kernels = sum(m.size for m in masks.values())
    assert resident_bytes(model.params) == resident_bytes(params) - 4 * kernels + 5 * kernels // 2
    # an unstructured mask is not 2:4: refused naming the kernel
    with pytest.raises(ValueError, match=r"layers/0/attn/q_proj/kernel: w is not 2:4 sparse"):
        compact_from_masks(CONFIG, params, _random_masks(params, 0.9), structure="2:4")


def _surrogate(params):
    """Rank-3 + 3 % sparse parts on every linear kernel and the embedding; one block without a
    sparse part and one without a low-rank part."""
    rng, flat, out = np.random.default_rng(2), _flat(params), {}
    for path in ("embed/embedding", *masks_from_nonzeros(CONFIG, params)):
        m, n = flat[path].shape
        low = 0.1 * rng.standard_normal((m, 3)) @ rng.standard_normal((3, n))
        sparse = np.where(rng.random((m, n)) < 0.03, rng.standard_normal((m, n)), 0.0)
        if path.endswith("0/attn/k_proj/kernel"):
            sparse = np.zeros_like(sparse)
        if path.endswith("1/mlp/up_proj/kernel"):
            low = np.zeros_like(low)
        out[path] = block_surrogate(low, sparse)
    return out


def test_salaad_compact_equals_dense_deployment_and_round_trips(base, tmp_path):
    _, tokenizer, params, _ = base
    surrogate = _surrogate(params)
    allocation = allocate(surrogate, 0.6, 0.5, params=params, relative_to="constrained")
    model = compact_from_surrogate(CONFIG, params, surrogate, allocation)
    kinds = {type(lay) for lay in model.layouts.values()}
    assert kinds == {SumLayout, LowRankLayout, SparseLayout}
    assert isinstance(model.layouts["layers/0/attn/k_proj"], LowRankLayout)
    assert isinstance(model.layouts["layers/1/mlp/up_proj"], SparseLayout)
    q = model.layouts["layers/0/attn/q_proj"]
    key = "layers/0/attn/q_proj/kernel"
    assert q == SumLayout((LowRankLayout(allocation.ranks[key]),
                           SparseLayout(allocation.n_sparse[key])))
    np.testing.assert_array_equal(  # the embedding is not a linear: rebuilt densely
        model.params["embed"]["embedding"],
        reconstruct(surrogate["embed/embedding"], allocation.ranks["embed/embedding"],
                    allocation.n_sparse["embed/embedding"]))
    dense = _logits(hpa_deploy(params, surrogate, allocation))
    np.testing.assert_allclose(_logits(model.params, model.layouts), dense, atol=5e-5)
    loaded = _round_trip(tmp_path, "salaad", model, tokenizer)
    np.testing.assert_allclose(_logits(loaded.params, loaded.layouts), dense, atol=5e-5)


def test_deploy_cli_writes_a_compact_checkpoint_evaluate_scores(base, tmp_path):
    _, tokenizer, params, text = base
    source = save_model(tmp_path / "salaad", params, model_config=CONFIG, tokenizer=tokenizer)
    save_surrogate(source, _surrogate(params))
    args = ["--text", str(text), "--seq_len", "32", "--batch_size", "2", "--max_batches", "2"]
    deploy_args = ["--checkpoint", str(source), "--budget", "0.6", "--relative_to",
                   "constrained", *args]
    dense = deploy.main(deploy_args)  # no --out: the dense reconstruction, nothing written
    ppl = deploy.main([*deploy_args, "--out", str(tmp_path / "c")])
    loaded = load_model(tmp_path / "c")
    assert len(loaded.layouts) == 14 and loaded.meta["hpa"]["compact"]
    assert loaded.meta["hpa"]["resident_bytes"] == resident_bytes(loaded.params)
    assert ppl == pytest.approx(dense, rel=1e-5)
    assert evaluate.main(["--checkpoint", str(tmp_path / "c"), *args]) == pytest.approx(
        ppl, rel=1e-6)
    deploy.main([*deploy_args, "--out", str(tmp_path / "d"), "--compact", "false"])
    assert load_model(tmp_path / "d").layouts == {}


def test_compact_and_evaluate_clis_score_the_compact_checkpoint(base, unstructured, tmp_path):
    _, tokenizer, _, text = base
    pruned, _ = unstructured
    source = save_model(tmp_path / "pruned", pruned, model_config=CONFIG, tokenizer=tokenizer)
    record = compact_cli.main(["--checkpoint", str(source), "--out", str(tmp_path / "c")])
    info = json.loads((tmp_path / "c" / MODEL_FILE).read_text())
    assert info["format"] == COMPACT_FORMAT and len(info["layouts"]) == 14
    assert record["resident_bytes"] < 0.5 * record["dense_resident_bytes"]
    args = ["--text", str(text), "--seq_len", "32", "--batch_size", "2", "--max_batches", "2"]
    dense = evaluate.main(["--checkpoint", str(source), *args])
    assert evaluate.main(["--checkpoint", str(tmp_path / "c"), *args]) == pytest.approx(
        dense, rel=1e-5)


def test_bytes_scale_with_what_is_kept(base, tmp_path):
    _, tokenizer, params, _ = base
    kernels = sum(m.size for m in masks_from_nonzeros(CONFIG, params).values())
    disk, resident = {}, {}
    for density in (0.02, 0.1):
        masks = _random_masks(params, density, seed=3)
        model = compact_from_masks(CONFIG, params, masks)
        nnz = sum(int(m.sum()) for m in masks.values())
        resident[density] = resident_bytes(model.params)
        # fp32 values + two int16 indices per kept entry replace the fp32 kernels
        assert resident[density] == resident_bytes(params) - 4 * kernels + 8 * nnz
        save_model(tmp_path / str(density), model.params, model_config=CONFIG,
                   tokenizer=tokenizer, layouts=model.layouts)
        disk[density] = checkpoint_bytes(tmp_path / str(density))
    save_model(tmp_path / "dense", params, model_config=CONFIG, tokenizer=tokenizer)
    dense_disk = checkpoint_bytes(tmp_path / "dense")
    assert disk[0.02] < disk[0.1] < 0.6 * dense_disk
    # on disk the extra entries cost at most their resident bytes (orbax compresses the sorted
    # indices); a lower bound is not asserted: the on-disk size of these small checkpoints
    # varied between runs (0.34-0.5 of the resident difference)
    extra = resident[0.1] - resident[0.02]
    assert 0 < disk[0.1] - disk[0.02] <= 1.05 * extra


def _edit_model_json(directory, edit):
    path = directory / MODEL_FILE
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))


def test_a_compact_checkpoint_missing_a_part_is_refused(base, unstructured, tmp_path):
    _, tokenizer, params, _ = base
    _, model = unstructured
    directory = save_model(tmp_path / "c", model.params, model_config=CONFIG,
                           tokenizer=tokenizer, layouts=model.layouts)
    original = (directory / MODEL_FILE).read_text()
    # layouts name a part the params lack (lm_head as low rank): missing u, v; kernel unexpected
    _edit_model_json(directory, lambda i: i["layouts"].update(
        {"lm_head": {"type": "low_rank", "rank": 4}}))
    with pytest.raises(ValueError, match=r"missing leaves \['lm_head/u', 'lm_head/v'\]; "
                                         r"unexpected leaves \['lm_head/kernel'\]"):
        load_model(directory)
    # params hold a part the layouts do not describe
    (directory / MODEL_FILE).write_text(original)
    _edit_model_json(directory, lambda i: i["layouts"].pop("layers/1/mlp/up_proj"))
    with pytest.raises(ValueError, match=r"missing leaves \['layers/1/mlp/up_proj/kernel'\]; "
                                         r"unexpected leaves \['layers/1/mlp/up_proj/cols'"):
        load_model(directory)
    _edit_model_json(directory, lambda i: i.pop("layouts"))
    with pytest.raises(ValueError, match=r"compact checkpoint .* has no 'layouts' entry"):
        load_model(directory)
    _edit_model_json(directory, lambda i: i.update(format="admm_jax.checkpoint.v1",
                                                   layouts={}))
    with pytest.raises(ValueError, match="compact checkpoints use format"):
        load_model(directory)
    # wrong nnz: shapes named; a malformed layout: its path named
    (directory / MODEL_FILE).write_text(original)
    _edit_model_json(directory, lambda i: i["layouts"]["layers/0/attn/q_proj"].update(nnz=5))
    with pytest.raises(ValueError, match=r"mis-shaped leaves .*layers/0/attn/q_proj/cols"):
        load_model(directory)
    with pytest.raises(ValueError, match=r"layers/0/mlp/up_proj: a layout must be an object"):
        layouts_from_json({"layers/0/mlp/up_proj": {"type": "csr"}})
    # saving params that do not fit their layouts writes nothing
    with pytest.raises(ValueError, match=r"params do not fit their layouts.*missing leaves"):
        save_model(tmp_path / "bad", params, model_config=CONFIG, tokenizer=tokenizer,
                   layouts=model.layouts)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="mask 'layers/0/attn/q/kernel' is not a leaf"):
        compact_from_masks(CONFIG, params, {"layers/0/attn/q/kernel": np.ones((64, 64), bool)})


def test_abstract_template_of_layouts_matches_compact_params(unstructured):
    """The restore template is built from the layouts alone (shapes and index dtypes)."""
    _, model = unstructured
    template = abstract_params(CONFIG, linear=structured_factory(model.layouts, CONFIG))[1]
    spec = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), template)
    assert spec == jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), model.params)


def _kept_tiles(mask, b):
    """``[G₀, G₁]`` tiles of the zero-padded ``mask`` holding a kept entry."""
    g0, g1 = -(-mask.shape[0] // b), -(-mask.shape[1] // b)
    padded = np.zeros((g0 * b, g1 * b), bool)
    padded[:mask.shape[0], :mask.shape[1]] = mask
    return padded.reshape(g0, b, g1, b).any(axis=(1, 3))


@pytest.mark.parametrize("structure", ["block16", "block32"])
def test_block_compact_equals_pruned_twin_and_round_trips(base, tmp_path, structure):
    _, tokenizer, params, _ = base
    b = int(structure[len("block"):])
    pruned, masks = prune(CONFIG, params, method="magnitude", sparsity=0.6, structure=structure,
                          verbose=False)
    model = compact_from_masks(CONFIG, pruned, masks, structure=structure)
    assert set(model.layouts) == {p[:-len("/kernel")] for p in masks}
    n_blocks = {}
    for path, layout in model.layouts.items():
        tiles = _kept_tiles(np.asarray(masks[path + "/kernel"]), b)
        assert layout == BlockSparseLayout(int(tiles.sum()), b) and 0 < tiles.mean() < 1
        n_blocks[path] = layout.n_blocks
    down = model.params["layers"][1]["mlp"]["down_proj"]  # 172 × 64: overhanging tiles
    assert down["values"].shape[1:] == (b, b) and down["block_rows"].dtype == jnp.int16
    dense = _logits(pruned)
    np.testing.assert_allclose(_logits(model.params, model.layouts), dense, atol=2e-5)
    loaded = _round_trip(tmp_path, structure, model, tokenizer)
    np.testing.assert_allclose(_logits(loaded.params, loaded.layouts), dense, atol=2e-5)
    info = json.loads((tmp_path / structure / MODEL_FILE).read_text())
    assert info["layouts"]["layers/0/mlp/up_proj"] == {
        "type": "block", "n_blocks": n_blocks["layers/0/mlp/up_proj"], "block_size": b}
    twin = dense_params(CONFIG, loaded.layouts, loaded.params)
    for a, b_ in zip(jax.tree_util.tree_leaves(twin), jax.tree_util.tree_leaves(pruned),
                     strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))
    # b² fp32 numbers and two int16 indices per kept tile replace the fp32 kernels
    kernels = sum(m.size for m in masks.values())
    assert resident_bytes(model.params) == resident_bytes(params) - 4 * kernels + sum(
        n * (4 * b * b + 2 + 2) for n in n_blocks.values())
    # a tile count that disagrees with the stored tiles is refused, naming the leaves
    _edit_model_json(tmp_path / structure, lambda i: i["layouts"]["layers/0/attn/q_proj"].update(
        n_blocks=n_blocks["layers/0/attn/q_proj"] + 1))
    with pytest.raises(ValueError, match=r"mis-shaped leaves .*layers/0/attn/q_proj/block_cols"):
        load_model(tmp_path / structure)


def test_block_compact_of_an_empty_or_scattered_mask_is_exact(base):
    """A kernel that keeps nothing is one zero tile; a mask that is not whole tiles stores its
    partly kept tiles with zeros off the mask."""
    _, _, params, _ = base
    masks = _random_masks(params, 0.02, seed=4)
    empty = "layers/0/attn/k_proj/kernel"
    masks[empty] = np.zeros_like(masks[empty])
    # a mask entry on a zero weight, alone in its tile: the tile is stored all the same
    up = masks["layers/1/mlp/up_proj/kernel"]
    up[48:64, 160:172] = False
    up[50, 170] = True
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["layers"][1]["mlp"]["up_proj"]["kernel"] = \
        params["layers"][1]["mlp"]["up_proj"]["kernel"].at[50, 170].set(0.0)
    model = compact_from_masks(CONFIG, params, masks, structure="block16")
    k = model.params["layers"][0]["attn"]["k_proj"]
    assert model.layouts["layers/0/attn/k_proj"] == BlockSparseLayout(1, 16)
    assert not np.asarray(k["values"]).any()
    pruned = _pruned(params, masks)
    np.testing.assert_allclose(_logits(model.params, model.layouts), _logits(pruned), atol=2e-5)
    stored = model.params["layers"][1]["mlp"]["up_proj"]
    assert model.layouts["layers/1/mlp/up_proj"].n_blocks == _kept_tiles(up, 16).sum()
    tiles = set(zip(np.asarray(stored["block_rows"]).tolist(),
                    np.asarray(stored["block_cols"]).tolist()))
    assert (3, 10) in tiles
    with pytest.raises(ValueError, match="unstructured, N:M or block sparsity, not channel"):
        compact_from_masks(CONFIG, params, masks, structure="channel")


def test_compact_cli_stores_block_tiles(base, tmp_path):
    _, tokenizer, params, text = base
    pruned, _ = prune(CONFIG, params, method="magnitude", sparsity=0.75, structure="block16",
                      verbose=False)
    source = save_model(tmp_path / "pruned", pruned, model_config=CONFIG, tokenizer=tokenizer)
    record = compact_cli.main(["--checkpoint", str(source), "--out", str(tmp_path / "c"),
                               "--structure", "block16"])
    info = json.loads((tmp_path / "c" / MODEL_FILE).read_text())
    assert {lay["type"] for lay in info["layouts"].values()} == {"block"}
    assert {lay["block_size"] for lay in info["layouts"].values()} == {16}
    assert record["structure"] == "block16"
    assert record["resident_bytes"] < 0.6 * record["dense_resident_bytes"]
    args = ["--text", str(text), "--seq_len", "32", "--batch_size", "2", "--max_batches", "2"]
    dense = evaluate.main(["--checkpoint", str(source), *args])
    assert evaluate.main(["--checkpoint", str(tmp_path / "c"), *args]) == pytest.approx(
        dense, rel=1e-5)


def test_low_rank_plus_block_sum_round_trips(base, tmp_path):
    _, tokenizer, params, _ = base
    w = np.asarray(params["layers"][1]["attn"]["o_proj"]["kernel"])
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    residual = w - (u[:, :4] * s[:4]) @ vt[:4]
    tiles = np.kron(np.random.default_rng(2).random((4, 4)) < 0.25, np.ones((16, 16), bool))
    part = SumLinear([low_rank_from_factors(u[:, :4], s[:4], vt[:4].T),
                      block_sparse_from_dense(residual * tiles)])
    model = assemble_compact(CONFIG, params, {"layers/1/attn/o_proj": part}, {})
    assert model.layouts == {"layers/1/attn/o_proj": SumLayout((
        LowRankLayout(4), BlockSparseLayout(int(tiles[::16, ::16].sum()), 16)))}
    twin = jax.tree_util.tree_map(lambda x: x, params)
    twin["layers"][1]["attn"]["o_proj"] = {"kernel": materialize(part)}
    np.testing.assert_allclose(materialize(part), (u[:, :4] * s[:4]) @ vt[:4] + residual * tiles,
                               atol=1e-5)
    loaded = _round_trip(tmp_path, "sum", model, tokenizer)
    np.testing.assert_allclose(_logits(loaded.params, loaded.layouts), _logits(twin), atol=2e-5)


def test_block_layouts_json_round_trip_and_malformed_entries_are_named():
    layouts = {"layers/0/mlp/up_proj": BlockSparseLayout(7, 16),
               "layers/1/attn/o_proj": SumLayout((LowRankLayout(3), BlockSparseLayout(2, 32)))}
    as_json = layouts_to_json(layouts)
    assert as_json["layers/0/mlp/up_proj"] == {"type": "block", "n_blocks": 7, "block_size": 16}
    assert layouts_from_json(json.loads(json.dumps(as_json))) == layouts
    fixed = BlockSparseLayout(1, 16, block_rows=np.array([0]), block_cols=np.array([2]))
    assert layouts_to_json({"lm_head": fixed}) == {  # the indices are params leaves
        "lm_head": {"type": "block", "n_blocks": 1, "block_size": 16}}
    up = "layers/0/mlp/up_proj"
    with pytest.raises(ValueError, match=r"up_proj: a 'block' layout has the fields "
                                         r"\['n_blocks', 'block_size'\]; missing \['block_size'\]"):
        layouts_from_json({up: {"type": "block", "n_blocks": 3}})
    with pytest.raises(ValueError, match=r"unexpected \['block_rows'\]"):
        layouts_from_json({up: {"type": "block", "n_blocks": 3, "block_size": 16,
                                "block_rows": [0, 1, 2]}})
    with pytest.raises(TypeError, match="up_proj: n_blocks must be an integer, got '3'"):
        layouts_from_json({up: {"type": "block", "n_blocks": "3", "block_size": 16}})
    with pytest.raises(ValueError, match=r"up_proj: block_size must be an integer in \[1, inf\]"):
        layouts_from_json({up: {"type": "block", "n_blocks": 3, "block_size": 0}})
    with pytest.raises(ValueError, match=r"o_proj/parts/1: n_blocks must be an integer in \[0"):
        layouts_from_json({"layers/1/attn/o_proj": {"type": "sum", "parts": [
            {"type": "low_rank", "rank": 2}, {"type": "block", "n_blocks": -1,
                                               "block_size": 16}]}})
    with pytest.raises(ValueError, match=r"a layout must be an object with \"type\" one of "
                                         r"\['block', 'dense'"):
        layouts_from_json({up: {"type": "bsr", "n_blocks": 3, "block_size": 16}})
    # fit to the model is checked by the factory: 64 × 172 in 16 × 16 tiles is a 4 × 11 grid
    with pytest.raises(ValueError, match=r"up_proj: n_blocks must be an integer in \[0, 44\]"):
        structured_factory(layouts_from_json({up: {"type": "block", "n_blocks": 45,
                                                   "block_size": 16}}), CONFIG)


def _block_surrogate(params, b=16):
    """Rank-3 low-rank parts plus ~30 % of the b × b tiles of every linear kernel and the
    embedding as block-structured surrogate parts; one block without a sparse part and one
    without a low-rank part."""
    rng, flat, out = np.random.default_rng(3), _flat(params), {}
    for path in ("embed/embedding", *masks_from_nonzeros(CONFIG, params)):
        m, n = flat[path].shape
        low = 0.1 * rng.standard_normal((m, 3)) @ rng.standard_normal((3, n))
        tiles = rng.random((-(-m // b), -(-n // b))) < 0.3
        sparse = np.kron(tiles, np.ones((b, b)))[:m, :n] * rng.standard_normal((m, n))
        if path.endswith("0/attn/k_proj/kernel"):
            sparse = np.zeros_like(sparse)
        if path.endswith("1/mlp/up_proj/kernel"):
            low = np.zeros_like(low)
        out[path] = block_surrogate(low, sparse, sparse_structure=f"block{b}")
    return out


def test_salaad_block_compact_equals_dense_deployment_and_round_trips(base, tmp_path):
    _, tokenizer, params, _ = base
    surrogate = _block_surrogate(params)
    allocation = allocate(surrogate, 0.3, 0.5, params=params, relative_to="constrained")
    model = compact_from_surrogate(CONFIG, params, surrogate, allocation)
    assert {type(lay) for lay in model.layouts.values()} == {SumLayout, LowRankLayout,
                                                              BlockSparseLayout}
    key = "layers/0/attn/q_proj/kernel"
    assert 0 < allocation.n_sparse[key] < surrogate[key].nnz
    assert model.layouts["layers/0/attn/q_proj"] == SumLayout((
        LowRankLayout(allocation.ranks[key]), BlockSparseLayout(allocation.n_sparse[key], 16)))
    assert model.layouts["layers/1/mlp/up_proj"] == BlockSparseLayout(  # 64 × 172: partial tiles
        allocation.n_sparse["layers/1/mlp/up_proj/kernel"], 16)
    dense = hpa_deploy(params, surrogate, allocation)
    np.testing.assert_allclose(dense_params(CONFIG, model.layouts, model.params)["layers"][1]
                               ["mlp"]["up_proj"]["kernel"],
                               dense["layers"][1]["mlp"]["up_proj"]["kernel"], atol=1e-6)
    dense_logits = _logits(dense)
    np.testing.assert_allclose(_logits(model.params, model.layouts), dense_logits, atol=5e-5)
    loaded = _round_trip(tmp_path, "salaad_block", model, tokenizer)
    np.testing.assert_allclose(_logits(loaded.params, loaded.layouts), dense_logits, atol=5e-5)
