"""LLaMA model: shapes, causality, RoPE and grouped-query attention against a plain reference;
per-layer widths; the linear factory; the activation hooks."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from admm_jax.models.llama import (
    PRESETS,
    BlockShape,
    LinearSpec,
    Llama,
    LlamaConfig,
    abstract_params,
    apply_rope,
    count_params,
    dense_linear,
    forward,
    init_params,
    rope_tables,
    sown_inputs,
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
    hd = cfg.resolved_head_dim
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
            nh, nkv, _, _ = cfg.block(i)
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


# ---------------------------------------------------------------------------------------------
# Per-layer widths
# ---------------------------------------------------------------------------------------------

PER_LAYER = LlamaConfig(vocab_size=97, dim=48, n_layers=3, n_heads=(4, 2, 6), n_kv_heads=(2, 1, 3),
                        mlp_dim=(120, 40, 64), max_seq_len=32, head_dim=8, rope_base=300.0,
                        init_std=0.2)


def test_per_layer_widths_init_and_forward():
    graphdef, params = init_params(PER_LAYER, jax.random.key(4))
    for i, (nh, nkv, mlp) in enumerate([(4, 2, 120), (2, 1, 40), (6, 3, 64)]):
        assert PER_LAYER.block(i) == BlockShape(nh, nkv, 8, mlp)
        layer = params["layers"][i]
        assert layer["attn"]["q_proj"]["kernel"].shape == (48, nh * 8)
        assert layer["attn"]["k_proj"]["kernel"].shape == (48, nkv * 8)
        assert layer["attn"]["o_proj"]["kernel"].shape == (nh * 8, 48)
        assert layer["mlp"]["gate_proj"]["kernel"].shape == (48, mlp)
        assert layer["mlp"]["down_proj"]["kernel"].shape == (mlp, 48)
    assert PER_LAYER.per_layer and not NANO.per_layer
    tokens = np.random.default_rng(5).integers(0, PER_LAYER.vocab_size, (2, 11)).astype(np.int32)
    got = np.asarray(forward(graphdef, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, _reference_forward(PER_LAYER, params, tokens), rtol=2e-4,
                               atol=2e-4)


def test_per_layer_config_json_round_trip():
    text = PER_LAYER.to_json()
    stored = json.loads(text)
    assert stored["mlp_dim"] == [120, 40, 64] and stored["n_heads"] == [4, 2, 6]
    loaded = LlamaConfig.from_dict(stored)
    assert loaded == PER_LAYER and isinstance(loaded.mlp_dim, tuple)
    assert hash(loaded) == hash(PER_LAYER)
    assert LlamaConfig.from_dict(NANO.to_dict()) == NANO
    # a model.json written before per-layer widths existed (int fields) still loads
    old = json.loads('{"compute_dtype": "float32", "dim": 64, "head_dim": null, "init_std": 0.02, '
                     '"max_seq_len": 128, "mlp_dim": 172, "n_heads": 4, "n_kv_heads": 2, '
                     '"n_layers": 2, "norm_eps": 1e-05, "rope_base": 10000.0, '
                     '"tie_embeddings": false, "vocab_size": 512}')
    assert LlamaConfig.from_dict(old) == NANO


def test_per_layer_config_errors():
    with pytest.raises(ValueError, match=r"mlp_dim has 2 entries, expected one per layer"):
        dataclasses.replace(PER_LAYER, mlp_dim=(8, 8))
    with pytest.raises(ValueError, match=r"mlp_dim\[1\] must be an integer in \[1, inf\], got 0"):
        dataclasses.replace(PER_LAYER, mlp_dim=(8, 0, 8))
    with pytest.raises(TypeError, match=r"n_kv_heads\[2\] must be an integer"):
        dataclasses.replace(PER_LAYER, n_kv_heads=(2, 1, 1.5))
    with pytest.raises(ValueError, match=r"multiple of n_kv_heads .* in layer 1"):
        dataclasses.replace(PER_LAYER, n_kv_heads=(2, 3, 3))
    with pytest.raises(ValueError, match="head_dim is required"):
        dataclasses.replace(PER_LAYER, head_dim=None)
    with pytest.raises(ValueError, match="block index"):
        PER_LAYER.block(3)
    assert dataclasses.replace(PER_LAYER, mlp_dim=[1, 2, 3]).mlp_dim == (1, 2, 3)


# ---------------------------------------------------------------------------------------------
# The linear factory
# ---------------------------------------------------------------------------------------------

DENSE_PATHS = ["embed/embedding", "final_norm/scale"] + [
    f"layers/{i}/{name}" for i in range(2) for name in (
        "attn/k_proj/kernel", "attn/o_proj/kernel", "attn/q_proj/kernel", "attn/v_proj/kernel",
        "attn_norm/scale", "mlp/down_proj/kernel", "mlp/gate_proj/kernel", "mlp/up_proj/kernel",
        "mlp_norm/scale")] + ["lm_head/kernel"]


def _paths(params) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return ["/".join(str(k.key) for k in path) for path, _ in flat]


def test_default_factory_keeps_paths_and_values():
    """Same param paths as before the factory existed, and the same init and logits: reference
    values computed with the pre-factory model (nano, init_std 0.1, key 0)."""
    cfg = dataclasses.replace(NANO, init_std=0.1)
    graphdef, params = init_params(cfg, jax.random.key(0))
    assert _paths(params) == DENSE_PATHS
    explicit = init_params(cfg, jax.random.key(0), linear=dense_linear)[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                    jax.tree_util.tree_leaves(explicit)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 9)), jnp.int32)
    logits = np.asarray(forward(graphdef, params, tokens))
    np.testing.assert_allclose(logits[0, 0, :4], [-0.7314924, -0.8654303, 0.18714255, 0.07168084],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits[1, 8, 100:104], [0.0949761, 1.0347039, 0.7450159, -0.1219103],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.abs(logits).sum(), 5874.6099, rtol=1e-5)


def test_factory_sees_every_linear():
    specs = []

    def recording(spec: LinearSpec, config: LlamaConfig, rngs: nnx.Rngs):
        assert config is PER_LAYER
        specs.append(spec)
        return dense_linear(spec, config, rngs)

    _, params = abstract_params(PER_LAYER, linear=recording)
    order = [("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
             ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]
    assert [s.path for s in specs] == [f"layers/{i}/{g}/{n}" for i in range(3)
                                       for g, n in order] + ["lm_head"]
    by_path = {s.path: s for s in specs}
    assert len(by_path) == 7 * PER_LAYER.n_layers + 1
    assert by_path["layers/1/attn/o_proj"] == LinearSpec("o_proj", 1, 16, 48)
    assert by_path["layers/2/mlp/up_proj"] == LinearSpec("up_proj", 2, 48, 64)
    assert by_path["lm_head"] == LinearSpec("lm_head", None, 48, 97)
    for spec in specs:
        assert _leaf(params, spec.path + "/kernel").shape == (spec.in_features, spec.out_features)


def _leaf(tree, path: str):
    for key in path.split("/"):
        tree = tree[int(key) if key.isdigit() else key]
    return tree


class Scaled(nnx.Module):
    """Wraps a linear and scales its output: a stand-in for an adapter."""

    def __init__(self, base: nnx.Module, factor: float):
        self.base, self.factor = base, factor

    def __call__(self, x):
        return self.factor * self.base(x)


def test_custom_factory_changes_the_forward():
    def zero_down(spec, config, rngs):
        base = dense_linear(spec, config, rngs)
        return Scaled(base, 0.0) if spec.name == "down_proj" else base

    graphdef, params = init_params(NANO, jax.random.key(0), linear=zero_down)
    assert params["layers"][0]["mlp"]["down_proj"] == {"base": {"kernel": params["layers"][0][
        "mlp"]["down_proj"]["base"]["kernel"]}}
    model = nnx.merge(graphdef, params)
    assert model.linear_factory is zero_down
    # with down_proj zeroed, every MLP output vanishes: the model equals one without MLPs
    dense_graphdef, dense = init_params(NANO, jax.random.key(0))
    no_mlp = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "down_proj" in jax.tree_util.keystr(path) else x,
        dense)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 512, (1, 7)), jnp.int32)
    np.testing.assert_allclose(forward(graphdef, params, tokens),
                               forward(dense_graphdef, no_mlp, tokens), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Activation hooks
# ---------------------------------------------------------------------------------------------

def test_hooks_are_off_by_default_and_record_linear_inputs():
    model = Llama(PER_LAYER, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 6)), jnp.int32)
    plain = model(tokens)
    assert not jax.tree_util.tree_leaves(nnx.state(model, nnx.Intermediate))
    out, sown = sown_inputs(model, tokens)
    np.testing.assert_array_equal(out, plain)
    assert not jax.tree_util.tree_leaves(nnx.state(model, nnx.Intermediate))
    assert model.layers[0].sow_inputs is False  # the view did not change the model
    expected = {f"layers/{i}/{p}" for i in range(3) for p in (
        "mid", *(f"{g}/{n}/inputs" for g, n in [("attn", "q_proj"), ("attn", "k_proj"),
                                                ("attn", "v_proj"), ("attn", "o_proj"),
                                                ("mlp", "gate_proj"), ("mlp", "up_proj"),
                                                ("mlp", "down_proj")]))} | {"lm_head/inputs"}
    assert set(sown) == expected
    assert sown["layers/1/attn/o_proj/inputs"].shape == (2, 6, 16)
    assert sown["layers/1/mlp/down_proj/inputs"].shape == (2, 6, 40)
    # each recorded input reproduces its linear's output inside the model: layer 2's q_proj
    # input is the attention norm of layer 1's output
    mid, block = sown["layers/1/mid"], model.layers[1]
    np.testing.assert_allclose(sown["layers/1/mlp/gate_proj/inputs"], block.mlp_norm(mid))
    h1 = mid + block.mlp.down_proj(sown["layers/1/mlp/down_proj/inputs"])
    np.testing.assert_allclose(sown["layers/2/attn/q_proj/inputs"], model.layers[2].attn_norm(h1),
                               rtol=1e-5, atol=1e-6)
