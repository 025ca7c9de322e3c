"""Hugging Face ``LlamaForCausalLM`` checkpoints (safetensors): loader and exporter.

Hugging Face checkpoints already use rotate-half RoPE: weights are only transposed from
``[out, in]`` to ``[in, out]``. Single files, several files and sharded checkpoints (with
``model.safetensors.index.json``) are read; fp32, fp16 and bf16 weights load as fp32.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from admm_jax.models.llama import LlamaConfig
from admm_jax.models.weights import PretrainedModel, assemble, leaf, log, tensor_specs

__all__ = ["load_hf_llama", "save_hf_llama"]

_HF_ARCHITECTURES = ("LlamaForCausalLM",)
_SAFETENSORS_INDEX = "model.safetensors.index.json"


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
    log(f"loading Hugging Face checkpoint {directory} ...")
    config = _hf_config(json.loads(config_file.read_text()))
    files = _safetensors_files(directory)
    specs = list(tensor_specs(config))
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
    params = assemble(config, flat)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    log(f"loaded {len(flat)} tensors in {time.perf_counter() - start:.1f}s")
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
    are not part of the format, nor are per-layer widths (``ValueError``).

    Returns:
        ``directory`` (created if needed).
    """
    if model.config.per_layer:
        raise ValueError("a Hugging Face LlamaConfig has one head count and intermediate_size "
                         "for every layer; save a model with per-layer widths with "
                         "admm_jax.training.checkpoint.save_model")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive or None, got {max_shard_bytes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for spec in tensor_specs(model.config):
        w = np.asarray(leaf(model.params, spec.path), dtype=np.float32)
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
