"""Capture through the model's own forward: equal to the pre-hook capture (an explicit copy of
its block math) on real SmolLM2 activations, sees what a factory-built linear does, and handles
per-layer widths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from admm_jax.data import calibration_samples, prepare_corpus
from admm_jax.models.llama import (
    LlamaConfig,
    abstract_params,
    apply_rope,
    causal_attention,
    dense_linear,
    forward,
    init_params,
)
from admm_jax.pruning.capture import (
    INPUT_SITES,
    BlockActivations,
    CapturedBlock,
    capture_blocks,
    gram_stats,
    site_widths,
)


def reference_block_activations(block, config: LlamaConfig, layer: int, x, cos,
                                sin) -> BlockActivations:
    """The capture's block math before it ran the model's forward (copied from the old
    ``block_activations``; head counts from ``config.block(layer)``)."""
    attn, mlp = block.attn, block.mlp
    b, t, _ = x.shape
    n_heads, n_kv_heads, hd, _ = config.block(layer)
    attn_in = block.attn_norm(x)
    q = attn.q_proj(attn_in).reshape(b, t, n_heads, hd)
    k = attn.k_proj(attn_in).reshape(b, t, n_kv_heads, hd)
    v = attn.v_proj(attn_in).reshape(b, t, n_kv_heads, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn_ctx = causal_attention(q, k, v).reshape(b, t, n_heads * hd)
    mid = x + attn.o_proj(attn_ctx)
    mlp_in = block.mlp_norm(mid)
    mlp_hidden = jax.nn.silu(mlp.gate_proj(mlp_in)) * mlp.up_proj(mlp_in)
    out = mid + mlp.down_proj(mlp_hidden)
    return BlockActivations(x, attn_in, attn_ctx, mid, mlp_in, mlp_hidden, out)


def record(store: dict):
    def callback(block: CapturedBlock) -> dict:
        store[block.index] = block
        return block.params
    return callback


def reference_of(graphdef, params, block: CapturedBlock) -> BlockActivations:
    model = nnx.merge(graphdef, params)
    cos, sin = model.rope(block.inputs.shape[1])
    return reference_block_activations(model.layers[block.index], model.config, block.index,
                                       block.inputs, cos, sin)


def assert_sites_close(got: BlockActivations, want: BlockActivations, rtol: float = 1e-5):
    for field in BlockActivations._fields:
        a, b = np.asarray(getattr(got, field)), np.asarray(getattr(want, field))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=field)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M: real weights, real calibration text
# ---------------------------------------------------------------------------------------------

def test_capture_equals_pre_hook_capture_on_smollm2(smollm2):
    corpus = prepare_corpus("shakespeare", tokenizer=smollm2.tokenizer)
    tokens = calibration_samples(corpus, 4, 64, seed=0)
    seen = {}
    _, hidden = capture_blocks(smollm2.config, smollm2.params, tokens, record(seen),
                               num_blocks=4, batch_size=3, verbose=False)
    graphdef = abstract_params(smollm2.config)[0]
    for index in (0, 3):
        block = seen[index]
        want = reference_of(graphdef, smollm2.params, block)
        assert_sites_close(block.activations(), want)
        for site in INPUT_SITES:
            a = np.asarray(getattr(want, site), np.float64)
            x = a.reshape(-1, a.shape[-1])
            np.testing.assert_allclose(block.stats[site], x.T @ x, rtol=1e-4,
                                       atol=1e-4 * np.abs(x.T @ x).max(), err_msg=site)
    np.testing.assert_allclose(seen[1].inputs, reference_of(graphdef, smollm2.params, seen[0]).out,
                               rtol=1e-5, atol=1e-5)
    assert hidden.shape == (4, 64, smollm2.config.dim)


# ---------------------------------------------------------------------------------------------
# A wrapped linear is seen downstream (the old capture re-implemented the block and ignored it)
# ---------------------------------------------------------------------------------------------

NANO = LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=176,
                   max_seq_len=32, init_std=0.1)


class ShiftedLinear(nnx.Linear):
    """A dense linear whose output is shifted by a fixed delta (same params as ``nnx.Linear``)."""

    delta = 0.5

    def __call__(self, x):
        return super().__call__(x) + self.delta


def shifted_q(spec, config, rngs):
    if spec.name != "q_proj":
        return dense_linear(spec, config, rngs)
    return ShiftedLinear(spec.in_features, spec.out_features, use_bias=False,
                         kernel_init=nnx.initializers.normal(config.init_std), rngs=rngs)


def test_capture_sees_a_wrapped_linear():
    graphdef, params = init_params(NANO, jax.random.key(0), linear=shifted_q)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (5, 16), 0, NANO.vocab_size))
    wrapped, dense = {}, {}
    _, hidden = capture_blocks(graphdef, params, tokens, record(wrapped), batch_size=2,
                               verbose=False)
    capture_blocks(NANO, params, tokens, record(dense), batch_size=2, verbose=False)
    got, plain = wrapped[0].activations(), dense[0].activations()
    # the same input reaches q_proj, but the shift changes everything after it
    np.testing.assert_array_equal(got.attn_in, plain.attn_in)
    for site in ("attn_ctx", "mid", "mlp_in", "mlp_hidden", "out"):
        assert not np.allclose(getattr(got, site), getattr(plain, site), atol=1e-3), site
    assert not np.allclose(wrapped[0].stats["attn_ctx"], dense[0].stats["attn_ctx"], atol=1e-3)
    # and what capture sees is what the wrapped model computes
    for i in (0, 1):
        assert_sites_close(wrapped[i].activations(), reference_of(graphdef, params, wrapped[i]))
    logits = nnx.merge(graphdef, params).unembed(hidden)
    np.testing.assert_allclose(logits, forward(graphdef, params, jnp.asarray(tokens)), rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Per-layer widths
# ---------------------------------------------------------------------------------------------

PER_LAYER = LlamaConfig(vocab_size=256, dim=32, n_layers=3, n_heads=(4, 2, 2),
                        n_kv_heads=(2, 2, 1), mlp_dim=(96, 24, 48), max_seq_len=32, head_dim=8,
                        init_std=0.1)


def test_capture_with_per_layer_widths():
    graphdef, params = init_params(PER_LAYER, jax.random.key(2))
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (3, 12), 0, PER_LAYER.vocab_size))
    seen = {}
    _, hidden = capture_blocks(PER_LAYER, params, tokens, record(seen), stats=gram_stats,
                               verbose=False)
    for i in range(3):
        widths = site_widths(PER_LAYER, i)
        assert {site: h.shape for site, h in seen[i].stats.items()} == {
            site: (w, w) for site, w in widths.items()}
        assert_sites_close(seen[i].activations(), reference_of(graphdef, params, seen[i]))
    assert site_widths(PER_LAYER, 1) == {"attn_in": 32, "attn_ctx": 16, "mlp_in": 32,
                                         "mlp_hidden": 24}
    logits = nnx.merge(graphdef, params).unembed(hidden)
    np.testing.assert_allclose(logits, forward(graphdef, params, jnp.asarray(tokens)), rtol=1e-5,
                               atol=1e-5)


def test_capture_rejects_params_of_other_widths():
    _, params = init_params(PER_LAYER, jax.random.key(2))
    other = LlamaConfig(**{**PER_LAYER.to_dict(), "mlp_dim": [96, 24, 40]})
    tokens = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match="params do not match"):
        capture_blocks(other, params, tokens, lambda block: block.params, verbose=False)
