"""LoRA + sparse adapters: zero-initialised adapters leave the model unchanged, the forward is
x(W0 + λAB + Mat(E)), gradients equal those of the dense reference (E's by SDDMM, with no dense
in × out array), only adapter weights train, merge/unmerge round trip, exact parameter counts,
and bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from admm_jax.adapters import (
    AdapterInit,
    AdapterParam,
    LowRankParam,
    SparseLoRA,
    SparseParam,
    adapt_params,
    adapter_param_count,
    adapter_paths,
    adapters_of,
    insert_adapters,
    lora_init,
    lora_inits,
    merge_adapters,
    unmerge_adapters,
)
from admm_jax.models.layouts import linear_specs
from admm_jax.models.linears import SparseIndices
from admm_jax.models.llama import Llama, LlamaConfig, forward, init_params
from admm_jax.training.step import make_train_step, trainable_mask

NANO = LlamaConfig.preset("nano")
TOKENS = jax.random.randint(jax.random.key(7), (2, 9), 0, NANO.vocab_size)
SPECS = linear_specs(NANO)


def _model(seed=0):
    return Llama(NANO, rngs=nnx.Rngs(params=seed))


def _random_init(key, d_in, d_out, rank, nnz, scale=0.5):
    """Non-zero factors and values at ``nnz`` distinct random positions."""
    ka, kb, ke, kp = jax.random.split(key, 4)
    flat = np.asarray(jax.random.choice(kp, d_in * d_out, (nnz,), replace=False))
    return AdapterInit(0.1 * jax.random.normal(ka, (d_in, rank)),
                       0.1 * jax.random.normal(kb, (rank, d_out)),
                       0.1 * jax.random.normal(ke, (nnz,)), flat // d_out, flat % d_out, scale)


#: Heterogeneous per-layer adapters: LoRA + sparse, pure LoRA, pure sparse.
PLAN = {"layers/0/attn/q_proj": (4, 30), "layers/0/mlp/down_proj": (2, 0),
        "layers/1/attn/v_proj": (0, 50), "layers/1/mlp/gate_proj": (3, 10)}


def _random_inits(seed=1):
    keys = jax.random.split(jax.random.key(seed), len(PLAN))
    return {p: _random_init(k, SPECS[p].in_features, SPECS[p].out_features, r, nnz)
            for k, (p, (r, nnz)) in zip(keys, PLAN.items(), strict=True)}


def _reference(w0, a, b, e, rows, cols, scale):
    """Dense ``W0 + λ A B + Mat(E)``."""
    return w0 + scale * a @ b + jnp.zeros_like(w0).at[rows, cols].set(e)


def _layer(rank, nnz, d_in=24, d_out=40, seed=0):
    base = nnx.Linear(d_in, d_out, use_bias=False, rngs=nnx.Rngs(seed))
    return SparseLoRA(base, _random_init(jax.random.key(seed + 1), d_in, d_out, rank, nnz))


def _weighted_sum(y):
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))


def test_zero_initialised_adapters_leave_logits_unchanged():
    model = _model()
    before = model(TOKENS)
    paths = adapter_paths(NANO)
    sparse = {paths[0]: ([0, 5, 63], [1, 1, 2]), paths[-1]: ([3], [4])}
    inits = lora_inits(model, dict.fromkeys(paths, 4), jax.random.key(3), indices=sparse,
                       scale=2.0)
    assert all(bool(jnp.any(i.lora_a != 0)) for i in inits.values())  # A random, B = E = 0
    inserted = insert_adapters(model, inits)
    assert set(inserted) == set(paths) == set(adapters_of(model))
    assert isinstance(model.layers[1].mlp.down_proj, SparseLoRA)
    np.testing.assert_array_equal(model(TOKENS), before)
    # the same on (graphdef, params)
    graphdef, params = init_params(NANO, jax.random.key(0))
    g2, p2 = adapt_params(graphdef, params, inits)
    np.testing.assert_array_equal(forward(g2, p2, TOKENS), forward(graphdef, params, TOKENS))


@pytest.mark.parametrize("rank, nnz", [(3, 50), (0, 50), (3, 0)])
def test_forward_equals_dense_reference(rank, nnz):
    layer = _layer(rank, nnz)
    x = jax.random.normal(jax.random.key(5), (2, 7, 24))
    w0 = layer.base_module.kernel[...]
    s = layer.weights()
    ref = _reference(w0, s.lora_a, s.lora_b, s.values, s.rows.astype(int), s.cols.astype(int),
                     layer.scale)
    assert (layer.lora_a is None) == (rank == 0) and (layer.sparse is None) == (nnz == 0)
    np.testing.assert_allclose(layer(x), x @ ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.dense(), ref, rtol=1e-6, atol=1e-7)
    assert (layer.rank, layer.nnz) == (rank, nnz)


def test_gradients_equal_the_dense_reference():
    layer = _layer(3, 60)
    x = jax.random.normal(jax.random.key(6), (5, 24))
    graphdef, adapter, rest = nnx.split(layer, AdapterParam, ...)

    def loss(adapter_state):
        return _weighted_sum(nnx.merge(graphdef, adapter_state, rest)(x))

    grads = jax.grad(loss)(adapter)
    w0 = layer.base_module.kernel[...]
    rows, cols = layer.sparse.rows[...].astype(int), layer.sparse.cols[...].astype(int)

    def ref_loss(a, b, e):
        return _weighted_sum(x @ _reference(w0, a, b, e, rows, cols, layer.scale))

    ga, gb, ge = jax.grad(ref_loss, argnums=(0, 1, 2))(layer.lora_a[...], layer.lora_b[...],
                                                        layer.sparse.values[...])
    np.testing.assert_allclose(grads["lora_a"][...], ga, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["lora_b"][...], gb, rtol=1e-5, atol=1e-6)
    # E's gradient is the dense gradient xᵀ dy gathered at the support
    dy = jax.grad(_weighted_sum)(layer(x))
    np.testing.assert_allclose(grads["sparse"]["values"][...], (x.T @ dy)[rows, cols],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ge, (x.T @ dy)[rows, cols], rtol=1e-5, atol=1e-6)


def test_sparse_gradient_never_forms_a_dense_kernel():
    """With the delta alone (no base, r = 0), no [in, out] array occurs in the backward as
    lowered for this CPU (``impl="auto"`` picks per platform when lowering, so the module, not
    the all-platform jaxpr, is what runs); the dense scatter formulation of the same loss does
    form one (so the check can fail)."""
    layer = _layer(0, 60)
    delta = SparseLoRA(None, layer.weights())
    x = jax.random.normal(jax.random.key(6), (5, 24))
    graphdef, values, rest = nnx.split(delta, SparseParam, ...)
    sparse = jax.jit(jax.grad(lambda v: _weighted_sum(nnx.merge(graphdef, v, rest)(x)))).lower(
        values).as_text()
    rows, cols = delta.sparse.rows[...].astype(int), delta.sparse.cols[...].astype(int)
    dense = jax.jit(jax.grad(lambda e: _weighted_sum(
        x @ jnp.zeros((24, 40)).at[rows, cols].set(e)))).lower(delta.sparse.values[...]).as_text()
    assert "24x40xf32" not in sparse
    assert "24x40xf32" in dense


def test_training_updates_adapters_only_and_keeps_w0_bit_identical():
    inits = lora_inits(_model(), dict.fromkeys(PLAN, 2), jax.random.key(3),
                       indices={p: (i.rows, i.cols) for p, i in _random_inits().items()})
    graphdef, params = adapt_params(*init_params(NANO, jax.random.key(0)), inits)
    mask = trainable_mask(graphdef, params, AdapterParam)
    chosen = jax.tree_util.tree_leaves(jax.tree.map(lambda m, x: x.size * m, mask, params))
    assert sum(chosen) == adapter_param_count(nnx.merge(graphdef, params))
    before = jax.tree.map(np.array, params)
    train = make_train_step(graphdef, optax.adam(1e-2), trainable=AdapterParam)
    opt_state = train.init(params)
    batch = jax.random.randint(jax.random.key(9), (2, 10), 0, NANO.vocab_size)
    for _ in range(3):
        params, opt_state, _ = train.step(params, opt_state, batch)
    flat_mask = jax.tree_util.tree_leaves_with_path(mask)
    after = dict(jax.tree_util.tree_leaves_with_path(params))
    for (path, m), (_, old) in zip(flat_mask, jax.tree_util.tree_leaves_with_path(before),
                                   strict=True):
        if m:
            assert not np.array_equal(after[path], old), path  # adapters move
        else:
            np.testing.assert_array_equal(after[path], old)  # W0, norms, embeddings, indices


def test_merge_unmerge_round_trip():
    model = _model()
    insert_adapters(model, _random_inits())
    adapted = model(TOKENS)
    w0 = {p: np.array(_kernel(model, p)) for p in PLAN}
    removed = merge_adapters(model)
    assert set(removed) == set(PLAN) and not adapters_of(model)
    dense_params = init_params(NANO, jax.random.key(0))[1]
    assert jax.tree.structure(nnx.to_pure_dict(nnx.state(model))) == \
        jax.tree.structure(dense_params)
    np.testing.assert_allclose(model(TOKENS), adapted, rtol=1e-4, atol=1e-5)
    unmerge_adapters(model, removed)
    for p in PLAN:
        np.testing.assert_allclose(_kernel(model, p), w0[p], rtol=0, atol=1e-6)
    np.testing.assert_allclose(model(TOKENS), adapted, rtol=1e-4, atol=1e-5)


def _kernel(model, path):
    node = model
    for key in path.split("/"):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node.base_module.kernel[...]


def test_parameter_count_is_exact():
    model = _model()
    n_dense = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    insert_adapters(model, _random_inits())
    expected = sum(r * (SPECS[p].in_features + SPECS[p].out_features) + nnz
                   for p, (r, nnz) in PLAN.items())
    assert adapter_param_count(model) == expected
    for f in (AdapterParam, nnx.LoRAParam):
        assert sum(x.size for x in jax.tree.leaves(nnx.state(model, f))) == expected
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, SparseParam))) == 90
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, LowRankParam))) == \
        expected - 90
    base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(AdapterParam)))
    assert sum(x.size for x in jax.tree.leaves(base)) == n_dense
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, SparseIndices))) == 2 * 90


def _init_with(**changes):
    return _random_init(jax.random.key(0), 64, 64, 2, 3)._replace(**changes)


@pytest.mark.parametrize("init, message", [
    (_init_with(rows=np.array([0, 1, 64])), "layers/0/attn/q_proj: rows[2] = 64 is out of range"),
    (_init_with(cols=np.array([0, 0, -1])), "cols[0] = -1 is out of range"),
    (_init_with(rows=np.array([1, 1, 2]), cols=np.array([5, 5, 0])), "duplicated entry"),
    (_init_with(scale=0.0), "scale must be in (0.0, inf)"),
    (_init_with(scale=-1.0), "scale must be in (0.0, inf)"),
    (_init_with(lora_b=jnp.zeros((3, 64))), "lora_a [in, r] and lora_b [r, out]"),
    (_init_with(lora_a=jnp.zeros((32, 2))), "do not fit the base module's [in, out] = (64, 64)"),
    (_init_with(values=jnp.zeros(2)), "must be 1-D of equal length"),
])
def test_bad_adapter_inputs(init, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        insert_adapters(_model(), {"layers/0/attn/q_proj": init})


def test_bad_selection_and_rank():
    model = _model()
    with pytest.raises(ValueError, match=re.escape("layers [5], but the model has layers 0 … 1")):
        adapter_paths(NANO, layers=[0, 5])
    with pytest.raises(ValueError, match="non-empty subset of"):
        adapter_paths(NANO, ("x_proj",))
    with pytest.raises(ValueError, match=re.escape("['layers/2/attn/q_proj'] that the model")):
        insert_adapters(model, {"layers/2/attn/q_proj": _init_with()})
    with pytest.raises(ValueError, match=re.escape("layers/0/mlp/up_proj: rank must be an "
                                                   "integer in [0, 64]")):
        lora_inits(model, {"layers/0/mlp/up_proj": -1}, jax.random.key(0))
    with pytest.raises(ValueError, match="both rows and cols"):
        lora_init(64, 64, 2, jax.random.key(0), rows=[1])
    insert_adapters(model, {"layers/0/attn/q_proj": _init_with()})
    with pytest.raises(ValueError, match="already carries an adapter"):
        insert_adapters(model, {"layers/0/attn/q_proj": _init_with()})
    removed = merge_adapters(model)
    model.layers[0].attn.q_proj = nnx.Linear(64, 32, use_bias=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unmerge needs a bias-free nnx\.Linear"):
        unmerge_adapters(model, removed)
