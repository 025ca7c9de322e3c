"""LLaMA model: shapes, causality, RoPE and grouped-query attention against a plain reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax.models.llama import (
    PRESETS,
    LlamaConfig,
    abstract_params,
    apply_rope,
    count_params,
    forward,
    init_params,
    rope_tables,
)

NANO = LlamaConfig.preset("nano")


@pytest.fixture(scope="module")
def nano():
    return init_params(NANO, jax.random.key(0))


def test_presets_sizes():
    assert count_params(abstract_params(PRESETS["nano"])[1]) < 1_000_000
    assert 5_000_000 <= count_params(abstract_params(PRESETS["tiny"])[1]) <= 10_000_000
    for name, lo, hi in [("60m", 50e6, 70e6), ("130m", 120e6, 140e6), ("350m", 340e6, 380e6),
                         ("1b", 1.0e9, 1.4e9)]:
        assert lo <= count_params(abstract_params(PRESETS[name])[1]) <= hi, name


def test_logit_shapes_and_param_layout(nano):
    graphdef, params = nano
    tokens = jnp.zeros((3, 17), jnp.int32)
    assert forward(graphdef, params, tokens).shape == (3, 17, NANO.vocab_size)
    hd = NANO.resolved_head_dim
    attn = params["layers"][0]["attn"]
    assert attn["q_proj"]["kernel"].shape == (NANO.dim, NANO.n_heads * hd)
    assert attn["k_proj"]["kernel"].shape == (NANO.dim, NANO.n_kv_heads * hd)
    assert params["lm_head"]["kernel"].shape == (NANO.dim, NANO.vocab_size)
    assert len(params["layers"]) == NANO.n_layers


def test_tied_embeddings_match_reference():
    cfg = dataclasses.replace(NANO, tie_embeddings=True)
    graphdef, params = init_params(cfg, jax.random.key(1))
    assert "lm_head" not in params
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 12)).astype(np.int32)
    got = np.asarray(forward(graphdef, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, _reference_forward(cfg, params, tokens), rtol=2e-4, atol=2e-4)


def test_causal_mask(nano):
    graphdef, params = nano
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, NANO.vocab_size, (2, 24)).astype(np.int32)
    changed = tokens.copy()
    changed[:, 15:] = (changed[:, 15:] + 7) % NANO.vocab_size
    a = forward(graphdef, params, jnp.asarray(tokens))
    b = forward(graphdef, params, jnp.asarray(changed))
    np.testing.assert_array_equal(np.asarray(a[:, :15]), np.asarray(b[:, :15]))
    assert not np.allclose(np.asarray(a[:, 15:]), np.asarray(b[:, 15:]))


def _reference_forward(cfg: LlamaConfig, params, tokens: np.ndarray) -> np.ndarray:
    """Plain NumPy LLaMA: per-head loops, complex-number RoPE, explicit KV-head lookup."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    hd, nh, nkv = cfg.resolved_head_dim, cfg.n_heads, cfg.n_kv_heads
    t = tokens.shape[1]

    def rms(x, scale):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps) * scale

    def rope(x):  # x: [T, hd]; pairs (x_i, x_{i+hd/2}) rotate by angle pos * base^(-2i/hd)
        half = hd // 2
        z = x[:, :half] + 1j * x[:, half:]
        freqs = cfg.rope_base ** (-np.arange(half) * 2.0 / hd)
        z = z * np.exp(1j * np.arange(t)[:, None] * freqs[None])
        return np.concatenate([z.real, z.imag], -1)

    out = []
    for seq in tokens:
        h = p["embed"]["embedding"][seq]
        for i in range(cfg.n_layers):
            layer = p["layers"][i]
            x = rms(h, layer["attn_norm"]["scale"])
            q = x @ layer["attn"]["q_proj"]["kernel"]
            k = x @ layer["attn"]["k_proj"]["kernel"]
            v = x @ layer["attn"]["v_proj"]["kernel"]
            heads = []
            for head in range(nh):
                kv = head // (nh // nkv)
                qh = rope(q[:, head * hd:(head + 1) * hd])
                kh = rope(k[:, kv * hd:(kv + 1) * hd])
                vh = v[:, kv * hd:(kv + 1) * hd]
                s = qh @ kh.T / np.sqrt(hd)
                s[np.triu_indices(t, 1)] = -np.inf
                w = np.exp(s - s.max(-1, keepdims=True))
                heads.append((w / w.sum(-1, keepdims=True)) @ vh)
            h = h + np.concatenate(heads, -1) @ layer["attn"]["o_proj"]["kernel"]
            x = rms(h, layer["mlp_norm"]["scale"])
            g = x @ layer["mlp"]["gate_proj"]["kernel"]
            hidden = g / (1 + np.exp(-g)) * (x @ layer["mlp"]["up_proj"]["kernel"])
            h = h + hidden @ layer["mlp"]["down_proj"]["kernel"]
        head = p["lm_head"]["kernel"] if "lm_head" in p else p["embed"]["embedding"].T
        out.append(rms(h, p["final_norm"]["scale"]) @ head)
    return np.stack(out)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_forward_matches_plain_reference(n_kv_heads):
    cfg = dataclasses.replace(NANO, n_kv_heads=n_kv_heads, rope_base=500.0, init_std=0.2)
    graphdef, params = init_params(cfg, jax.random.key(2))
    params = jax.tree_util.tree_map(
        lambda x: x * (1.0 + 0.3 * jax.random.normal(jax.random.key(3), x.shape))
        if x.ndim == 1 else x, params)  # non-trivial norm scales
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    got = np.asarray(forward(graphdef, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, _reference_forward(cfg, params, tokens), rtol=2e-4, atol=2e-4)


def test_rope_scores_depend_only_on_relative_position():
    hd, t = 16, 12
    cos, sin = rope_tables(t, hd, 10000.0)
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(1, 1, 1, hd)), rng.normal(size=(1, 1, 1, hd))
    q_all = apply_rope(jnp.broadcast_to(jnp.asarray(q, jnp.float32), (1, t, 1, hd)), cos, sin)
    k_all = apply_rope(jnp.broadcast_to(jnp.asarray(k, jnp.float32), (1, t, 1, hd)), cos, sin)
    scores = np.einsum("d,sd->s", np.asarray(q_all[0, 7, 0]), np.asarray(k_all[0, :, 0]))
    shifted = np.einsum("d,sd->s", np.asarray(q_all[0, 9, 0]), np.asarray(k_all[0, :, 0]))
    np.testing.assert_allclose(scores[:7], shifted[2:9], rtol=1e-4, atol=1e-5)


def test_bf16_compute_close_to_fp32(nano):
    graphdef, params = nano
    graphdef16, _ = abstract_params(dataclasses.replace(NANO, compute_dtype="bfloat16"))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, NANO.vocab_size, (2, 16)), jnp.int32)
    a = forward(graphdef, params, tokens)
    b = forward(graphdef16, params, tokens)
    assert b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(a).max()) + 1e-3


def test_bad_inputs(nano):
    graphdef, params = nano
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        LlamaConfig.preset("huge")
    with pytest.raises(ValueError, match="max_seq_len"):
        forward(graphdef, params, jnp.zeros((1, NANO.max_seq_len + 1), jnp.int32))
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        dataclasses.replace(NANO, n_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        dataclasses.replace(NANO, vocab_size=0)
    with pytest.raises(ValueError, match="compute_dtype"):
        dataclasses.replace(NANO, compute_dtype="int8")
    with pytest.raises(ValueError, match="unknown LlamaConfig fields"):
        LlamaConfig.from_dict({**NANO.to_dict(), "depth": 3})
