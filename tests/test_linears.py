"""Compact linear layers: the factory-built model equals its dense-materialised twin (logits,
sown inputs), gradients are the dense gradient projected onto the structure, only Params are
trainable, byte counts, exact pure-dict round trips and conversions, and bad layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels
from admm_jax.models.layouts import (
    BlockSparseLayout,
    DenseLayout,
    LowRankLayout,
    NMLayout,
    SparseLayout,
    SumLayout,
    insert_linears,
    layout_of,
    structured_factory,
)
from admm_jax.models.linears import (
    BlockSparseLinear,
    LowRankLinear,
    NMLinear,
    SparseIndices,
    SparseLinear,
    SumLinear,
    block_sparse_from_dense,
    low_rank_from_factors,
    materialize,
    nm_from_dense,
    param_bytes,
    sparse_from_dense,
)
from admm_jax.models.llama import LlamaConfig, abstract_params, forward, init_params, sown_inputs
from admm_jax.ops.projection import nm_mask
from kernels.block import block_from_dense

NANO = LlamaConfig.preset("nano")
TOKENS = jax.random.randint(jax.random.key(7), (2, 9), 0, NANO.vocab_size)
LAYOUTS = {
    "low_rank": {"layers/0/attn/q_proj": LowRankLayout(4)},
    "sparse": {"layers/0/mlp/down_proj": SparseLayout(900), "lm_head": SparseLayout(
        5, rows=np.array([0, 3, 3, 63, 10]), cols=np.array([511, 0, 1, 7, 7]))},
    "nm": {"layers/1/mlp/up_proj": NMLayout(2, 4), "layers/1/mlp/down_proj": NMLayout(1, 4)},
    "sum": {"layers/1/attn/o_proj": SumLayout((LowRankLayout(2), SparseLayout(60))),
            "layers/0/attn/v_proj": DenseLayout(),
            "layers/0/mlp/gate_proj": SumLayout((LowRankLayout(2), BlockSparseLayout(4, 16)))},
    # 64 × 172: the last block column overhangs the kernel (172 = 10·16 + 12 = 5·32 + 12)
    "block": {"layers/0/mlp/up_proj": BlockSparseLayout(6, 16),
              "layers/1/mlp/gate_proj": BlockSparseLayout(
                  3, 32, block_rows=np.array([1, 0, 1]), block_cols=np.array([5, 5, 0]))},
}


def _get(tree, path):
    """The node at ``path`` of a model (attributes) or of a pure dict (keys)."""
    for key in path.split("/"):
        k = int(key) if key.isdigit() else key
        tree = tree[k] if isinstance(tree, dict) or isinstance(k, int) else getattr(tree, k)
    return tree


def _replace(params, subtrees):
    """A copy of the pure dict ``params`` with the subtree at each path replaced."""
    out = jax.tree_util.tree_map(lambda x: x, params)
    for path, sub in subtrees.items():
        node, keys = out, [int(k) if k.isdigit() else k for k in path.split("/")]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = sub
    return out


def _build(layouts, seed=0):
    return init_params(NANO, jax.random.key(seed), linear=structured_factory(layouts, NANO))


def _dense_twin(graphdef, params, layouts):
    """The dense model with each structured linear replaced by its materialised kernel."""
    model = nnx.merge(graphdef, params)
    kernels = {p: {"kernel": materialize(_get(model, p))} for p in layouts}
    return init_params(NANO, jax.random.key(0))[0], _replace(params, kernels)


def _logit_loss(logits):
    return jnp.sum(logits * jnp.cos(jnp.arange(logits.size).reshape(logits.shape)))


def _projected(module, g):
    """The Param gradients of ``module`` from the dense gradient ``g = ∂L/∂W`` (chain rule)."""
    if isinstance(module, LowRankLinear):
        return {"u": g @ module.v[...].T, "v": module.u[...].T @ g}
    if isinstance(module, SparseLinear):
        m = module.matrix
        return {"values": g[m.rows.astype(int), m.cols.astype(int)]}
    if isinstance(module, BlockSparseLinear):
        m = module.matrix
        b, (g0, g1) = m.block_size, m.grid
        padded = jnp.zeros((g0 * b, g1 * b)).at[:g.shape[0], :g.shape[1]].set(g)
        tiles = padded.reshape(g0, b, g1, b).transpose(0, 2, 1, 3)
        return {"values": tiles[m.block_rows.astype(int), m.block_cols.astype(int)]}
    if isinstance(module, NMLinear):
        idx = module.indices[...].astype(int).reshape(-1, module.n, module.out_features)
        rows = idx + module.m * jnp.arange(idx.shape[0])[:, None, None]
        cols = jnp.arange(module.out_features)[None, None, :]
        return {"values": g[rows, cols].reshape(module.values.shape)}
    if isinstance(module, SumLinear):
        return {"parts": {i: _projected(p, g) for i, p in enumerate(module.parts)}}
    return {"kernel": g}


def _close(a, b, atol):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol),
                           a, b)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_logits_and_sown_inputs_equal_dense_twin(kind):
    graphdef, params = _build(LAYOUTS[kind])
    dense_graphdef, dense = _dense_twin(graphdef, params, LAYOUTS[kind])
    logits = forward(graphdef, params, TOKENS)
    np.testing.assert_allclose(logits, forward(dense_graphdef, dense, TOKENS), atol=1e-5)
    assert float(jnp.std(logits)) > 0
    _, sown = sown_inputs(nnx.merge(graphdef, params), TOKENS)
    _, sown_dense = sown_inputs(nnx.merge(dense_graphdef, dense), TOKENS)
    assert sown.keys() == sown_dense.keys() and "layers/1/mlp/up_proj/inputs" in sown
    _close(sown, sown_dense, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_gradients_are_the_projected_dense_gradient(kind):
    graphdef, params = _build(LAYOUTS[kind])
    dense_graphdef, dense = _dense_twin(graphdef, params, LAYOUTS[kind])
    model = nnx.merge(graphdef, params)
    gd, trainable, rest = nnx.split(model, nnx.Param, ...)
    grads = nnx.to_pure_dict(jax.grad(
        lambda p: _logit_loss(nnx.merge(gd, p, rest)(TOKENS)))(trainable))
    dense_grads = jax.grad(lambda p: _logit_loss(forward(dense_graphdef, p, TOKENS)))(dense)
    expected = _replace(dense_grads, {
        p: _projected(_get(model, p), _get(dense_grads, p)["kernel"]) for p in LAYOUTS[kind]})
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(expected)
    _close(grads, expected, atol=1e-5)


ALL = {k: v for layouts in LAYOUTS.values() for k, v in layouts.items()}


def test_only_params_are_selected_and_pure_dict_round_trip_is_exact():
    from admm_jax.training.step import trainable_mask

    graphdef, params = _build(ALL)
    model = nnx.merge(graphdef, params)
    is_int = jax.tree_util.tree_map(lambda x: jnp.issubdtype(x.dtype, jnp.integer), params)
    assert jax.tree_util.tree_leaves(trainable_mask(graphdef, params, nnx.Param)) == \
        [not b for b in jax.tree_util.tree_leaves(is_int)]
    indices = nnx.to_pure_dict(nnx.state(model, SparseIndices))
    # rows + cols of 3 COO matrices (down_proj, lm_head, one in a sum), 2 N:M index arrays,
    # block rows + cols of 3 block-sparse matrices (two plain, one in a sum)
    assert len(jax.tree_util.tree_leaves(indices)) == 2 * 3 + 2 + 2 * 3 == sum(
        jax.tree_util.tree_leaves(is_int))
    _, state = nnx.split(nnx.merge(*nnx.split(model)))
    again = nnx.to_pure_dict(state)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert params["lm_head"]["rows"].dtype == jnp.int16
    assert params["layers"][1]["mlp"]["up_proj"]["indices"].dtype == jnp.uint8
    block = params["layers"][1]["mlp"]["gate_proj"]
    assert block["values"].shape == (3, 32, 32) and block["block_rows"].dtype == jnp.int16
    np.testing.assert_array_equal(block["block_cols"], [0, 5, 5])  # sorted column-major
    np.testing.assert_array_equal(block["block_rows"], [1, 0, 1])
    template = abstract_params(NANO, linear=structured_factory(ALL, NANO))[1]
    assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), template) == \
        jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), params)
    merged = forward(graphdef, again, TOKENS)
    np.testing.assert_array_equal(merged, forward(graphdef, params, TOKENS))


def test_param_bytes_count_what_is_kept():
    graphdef, params = _build(ALL)
    model = nnx.merge(graphdef, params)
    q, down = _get(model, "layers/0/attn/q_proj"), _get(model, "layers/0/mlp/down_proj")
    up, o = _get(model, "layers/1/mlp/up_proj"), _get(model, "layers/1/attn/o_proj")
    assert param_bytes(q) == 4 * 4 * (64 + 64)
    assert param_bytes(down) == 900 * (4 + 2 + 2)
    assert param_bytes(up) == 32 * 172 * (4 + 1)
    assert param_bytes(o) == 4 * 2 * 128 + 60 * 8
    tiles = _get(model, "layers/0/mlp/up_proj")
    assert param_bytes(tiles) == 6 * (4 * 16 * 16 + 2 + 2)
    assert param_bytes(_get(model, "layers/0/mlp/gate_proj")) == 4 * 2 * (64 + 172) + 4 * 1028
    for module in (q, down, up, o, tiles):
        nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(nnx.state(module)))
        assert param_bytes(module) == nbytes < 4 * module.in_features * module.out_features
    assert param_bytes(_get(model, "layers/0/attn/v_proj")) == 4 * 64 * 32
    abstract = nnx.eval_shape(lambda: nnx.merge(graphdef, params))
    assert param_bytes(abstract) == param_bytes(model)


def test_conversions_keep_the_source_exactly():
    key = jax.random.split(jax.random.key(3), 3)
    u, s, vt = jnp.linalg.svd(jax.random.normal(key[0], (64, 32)), full_matrices=False)
    lr = low_rank_from_factors(u[:, :5], s[:5], vt[:5].T)
    np.testing.assert_allclose(materialize(lr), (u[:, :5] * s[:5]) @ vt[:5], atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(lr.u[...]), jnp.linalg.norm(lr.v[...]), rtol=1e-5)
    w = jax.random.normal(key[1], (64, 32))
    pruned = w * (jnp.abs(w) > 1.5)
    sp = sparse_from_dense(pruned)
    np.testing.assert_array_equal(materialize(sp), pruned)
    assert sp.values.shape == (int(jnp.sum(pruned != 0)),) and sp.rows.dtype == jnp.int16
    w24 = jnp.where(nm_mask(jnp.abs(w), 2, 4), w, 0).at[:4, 0].set(0).at[4, 1].set(0)
    nm = nm_from_dense(w24, 2, 4)
    np.testing.assert_array_equal(materialize(nm), w24)
    tiles = np.random.default_rng(4).random((4, 2)) < 0.5  # 16 × 16 tiles of the 64 × 32 w
    w_tiles = w * np.kron(tiles, np.ones((16, 16)))
    bs = block_sparse_from_dense(w_tiles)
    np.testing.assert_array_equal(materialize(bs), w_tiles)
    assert bs.n_blocks == tiles.sum() and bs.block_size == 16 and bs.shape == (64, 32)
    assert bs.block_rows.dtype == jnp.int16
    bs8 = block_sparse_from_dense(pruned, block_size=8)  # scattered entries: partly kept tiles
    np.testing.assert_array_equal(materialize(bs8), pruned)
    x = jax.random.normal(key[2], (3, 64))
    for module, dense in ((lr, materialize(lr)), (sp, pruned), (nm, w24), (bs, w_tiles),
                          (bs8, pruned)):
        np.testing.assert_allclose(module(x), x @ dense, atol=1e-5)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        nm_from_dense(w, 2, 4)


def test_converted_modules_go_into_a_compact_model():
    """A compact model from a pruned dense one: layouts from the modules, params inserted."""
    dense_graphdef, dense = init_params(NANO, jax.random.key(1))
    w_up = dense["layers"][0]["mlp"]["up_proj"]["kernel"]
    w_q = dense["layers"][1]["attn"]["q_proj"]["kernel"]
    w_down = dense["layers"][0]["mlp"]["down_proj"]["kernel"]
    u, s, vt = jnp.linalg.svd(w_q, full_matrices=False)
    mods = {"layers/0/mlp/up_proj": sparse_from_dense(w_up * (jnp.abs(w_up) > 0.03)),
            "layers/0/mlp/down_proj": nm_from_dense(
                jnp.where(nm_mask(jnp.abs(w_down), 2, 4), w_down, 0), 2, 4),
            "layers/1/attn/q_proj": SumLinear([low_rank_from_factors(u[:, :3], s[:3], vt[:3].T),
                                               sparse_from_dense(w_q * (jnp.abs(w_q) > 0.05))]),
            "layers/1/attn/o_proj": SumLinear([low_rank_from_factors(u[:, :2], s[:2], vt[:2].T),
                                               block_sparse_from_dense(w_q.at[16:].set(0))])}
    layouts = {p: layout_of(m) for p, m in mods.items()}
    graphdef, params = _build(layouts, seed=5)
    params = insert_linears(_replace(dense, {p: _get(params, p) for p in layouts}), mods)
    model = nnx.merge(graphdef, params)
    twin = _replace(dense, {p: {"kernel": materialize(m)} for p, m in mods.items()})
    for path, module in mods.items():
        np.testing.assert_array_equal(materialize(_get(model, path)), materialize(module))
    np.testing.assert_allclose(forward(graphdef, params, TOKENS),
                               forward(dense_graphdef, twin, TOKENS), atol=1e-5)
    with pytest.raises(ValueError, match="do not have the layout"):
        insert_linears(params, {"layers/0/attn/k_proj": mods["layers/0/mlp/up_proj"]})


@pytest.mark.parametrize("layouts, match", [
    ({"layers/0/attn/k_proj": LowRankLayout(33)}, r"layers/0/attn/k_proj: rank 33 exceeds"),
    ({"layers/0/attn/q_proj": NMLayout(4, 4)}, r"q_proj: N:M sparsity needs N < M, got 4:4"),
    ({"layers/0/mlp/down_proj": NMLayout(2, 8)}, r"M = 8 must divide the input dimension 172"),
    ({"lm_head": SparseLayout(2, rows=np.array([0, 64]), cols=np.array([1, 2]))},
     r"lm_head: rows\[1\] = 64 is out of range"),
    ({"lm_head": SparseLayout(2, rows=np.array([0, 0]), cols=np.array([1, 1]))},
     r"duplicated entry"),
    ({"lm_head": SparseLayout(3, rows=np.array([0, 1]), cols=np.array([1, 2]))},
     r"must have shape \(3,\)"),
    ({"layers/0/attn/q_proj": SparseLayout(64 * 64 + 1)}, r"nnz must be an integer in \[0, 4096\]"),
    ({"layers/0/attn/q_proj": SumLayout(())}, r"non-empty tuple of parts"),
    ({"layers/2/attn/q_proj": LowRankLayout(2)}, r"unknown linears \['layers/2/attn/q_proj'\]"),
    ({"layers/0/mlp/up_proj": BlockSparseLayout(45, 16)},
     r"up_proj: n_blocks must be an integer in \[0, 44\]"),
    ({"layers/0/mlp/up_proj": BlockSparseLayout(1, 0)}, r"block_size must be an integer in \[1"),
    ({"layers/0/mlp/up_proj": BlockSparseLayout(2, 16, block_rows=np.array([0, 4]),
                                                block_cols=np.array([1, 2]))},
     r"up_proj: block_rows\[1\] = 4 is out of range for a block grid of 4"),
    ({"layers/0/mlp/up_proj": BlockSparseLayout(2, 16, block_rows=np.array([3, 3]),
                                                block_cols=np.array([10, 10]))},
     r"duplicated block \(block_row, block_col\) = \(3, 10\)"),
    ({"layers/0/mlp/up_proj": BlockSparseLayout(3, 16, block_rows=np.array([0, 1]),
                                                block_cols=np.array([1, 2]))},
     r"must have shape \(3,\)"),
    ({"layers/0/mlp/up_proj": BlockSparseLayout(2, 16, block_rows=np.array([0, 1]))},
     "needs both block_rows and block_cols"),
])
def test_bad_layouts_raise_at_the_factory(layouts, match):
    with pytest.raises(ValueError, match=match):
        structured_factory(layouts, NANO)


def test_bad_modules_raise():
    with pytest.raises(TypeError, match="layout must be one of"):
        structured_factory({"lm_head": (4,)}, NANO)
    with pytest.raises(ValueError, match="strictly increasing"):
        NMLinear(jnp.zeros((2, 3)), jnp.array([[1, 3, 2], [0, 3, 3]]), 2, 4)
    with pytest.raises(ValueError, match=r"in-group indices must lie in \[0, 4\)"):
        NMLinear(jnp.zeros((2, 1)), jnp.array([[1], [4]]), 2, 4)
    with pytest.raises(ValueError, match="share one"):
        SumLinear([LowRankLinear(jnp.zeros((4, 1)), jnp.zeros((1, 3))),
                   LowRankLinear(jnp.zeros((4, 1)), jnp.zeros((1, 4)))])
    with pytest.raises(ValueError, match="non-negative"):
        low_rank_from_factors(jnp.ones((4, 1)), jnp.array([-1.0]), jnp.ones((3, 1)))
    with pytest.raises(TypeError, match=r"matrix must be a kernels\.BlockSparseMatrix"):
        BlockSparseLinear(kernels.from_dense(jnp.eye(4)))
    with pytest.raises(TypeError, match=r"matrix must be a kernels\.SparseMatrix"):
        SparseLinear(block_from_dense(jnp.eye(4), block_size=2))
    with pytest.raises(TypeError, match=r"rule must be a kernels\.DensifyRule"):
        BlockSparseLinear(block_from_dense(jnp.eye(4), block_size=2), rule=0.5)


@pytest.mark.parametrize("cls, convert", [(SparseLinear, sparse_from_dense),
                                          (BlockSparseLinear, block_sparse_from_dense)])
def test_the_densify_rule_is_static_and_picks_the_form(cls, convert):
    """``rule`` lives in the graph definition, not in the params: forcing the dense or the
    sparse product changes the program and not the result."""
    w = jax.random.normal(jax.random.key(8), (64, 48)) * np.kron(
        np.random.default_rng(5).random((4, 3)) < 0.5, np.ones((16, 16)))
    x = jax.random.normal(jax.random.key(9), (2, 5, 64))
    module = convert(w)
    assert isinstance(module, cls) and module.rule == kernels.DEFAULT_RULE
    graphdef, state = nnx.split(module)
    outputs, programs = [], []
    for density in (0.0, 1.0):  # densify every product / none
        module.rule = kernels.DensifyRule.constant(density)
        g, s = nnx.split(module)
        assert nnx.to_pure_dict(s).keys() == nnx.to_pure_dict(state).keys() and g != graphdef
        outputs.append(nnx.merge(g, s)(x))
        programs.append(str(jax.make_jaxpr(lambda x, g=g, s=s: nnx.merge(g, s)(x))(x)))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs[1], x @ w, rtol=1e-5, atol=1e-5)
    assert programs[0] != programs[1]


def test_sum_of_coo_and_block_parts_equals_their_dense_sum():
    """Mixed formats in one sum layer: ``SumLinear([COO, BSR])`` is ``x (A + B)``, and both
    parts' values receive the gradient of the dense sum restricted to their supports."""
    rng = np.random.default_rng(11)
    a = np.where(rng.random((40, 72)) < 0.1, rng.standard_normal((40, 72)), 0).astype(np.float32)
    tiles = np.kron(rng.random((3, 5)) < 0.4, np.ones((16, 16), bool))[:40, :72]
    b = np.where(tiles, rng.standard_normal((40, 72)), 0).astype(np.float32)
    layer = SumLinear([sparse_from_dense(a), block_sparse_from_dense(b)])
    x = jnp.asarray(rng.standard_normal((6, 40)), jnp.float32)
    np.testing.assert_allclose(layer(x), x @ (a + b), rtol=1e-5, atol=1e-5)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2))(params)
    dense_grad = np.asarray(x.T @ (2 * (x @ (a + b))))
    coo, bsr = layer.parts[0].matrix, layer.parts[1].matrix
    np.testing.assert_allclose(grads["parts"][0]["values"][...],
                               dense_grad[np.asarray(coo.rows), np.asarray(coo.cols)],
                               rtol=1e-4, atol=1e-4)
    padded = np.pad(dense_grad, ((0, 8), (0, 8)))
    want = np.stack([padded[16 * r:16 * r + 16, 16 * c:16 * c + 16]
                     for r, c in zip(np.asarray(bsr.block_rows), np.asarray(bsr.block_cols))])
    np.testing.assert_allclose(grads["parts"][1]["values"][...], want, rtol=1e-4, atol=1e-4)
