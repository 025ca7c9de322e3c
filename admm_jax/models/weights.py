"""The parameters of a pretrained LLaMA-family model in this library's format, and the tensor
names shared by every on-disk format (Hugging Face safetensors, GGUF).

Every loader returns a :class:`PretrainedModel` whose ``params`` have exactly the structure of
:func:`admm_jax.models.llama.init_params` (fp32, linear kernels ``[in, out]``); per-layer widths
(:class:`~admm_jax.models.config.LlamaConfig`) are honoured tensor by tensor.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from admm_jax.models.llama import LlamaConfig, abstract_params

__all__ = ["PretrainedModel", "TensorSpec", "assemble", "leaf", "log", "tensor_specs"]


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


def log(message: str) -> None:
    """Progress message of the loaders on stderr."""
    print(f"[admm_jax] {message}", file=sys.stderr, flush=True)


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


class TensorSpec(NamedTuple):
    """One parameter: its path in our pytree, its names on disk, and whether it is a linear kernel
    (stored ``[out, in]`` on disk, ``[in, out]`` here)."""

    path: tuple[str | int, ...]
    hf_name: str
    gguf_name: str
    linear: bool


def tensor_specs(config: LlamaConfig) -> Iterator[TensorSpec]:
    """Every parameter of a :class:`Llama` with ``config``, in a fixed order."""
    yield TensorSpec(("embed", "embedding"), "model.embed_tokens.weight", "token_embd.weight",
                     False)
    for i in range(config.n_layers):
        for norm, (hf, gg) in _NORMS.items():
            yield TensorSpec(("layers", i, norm, "scale"), f"model.layers.{i}.{hf}.weight",
                             f"blk.{i}.{gg}.weight", False)
        for (block, proj), (hf, gg) in _LINEARS.items():
            yield TensorSpec(("layers", i, block, proj, "kernel"),
                             f"model.layers.{i}.{hf}.weight", f"blk.{i}.{gg}.weight", True)
    yield TensorSpec(("final_norm", "scale"), "model.norm.weight", "output_norm.weight", False)
    if not config.tie_embeddings:
        yield TensorSpec(("lm_head", "kernel"), "lm_head.weight", "output.weight", True)


def assemble(config: LlamaConfig, flat: dict[tuple[str | int, ...], np.ndarray]) -> dict:
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


def leaf(params: dict, path: tuple[str | int, ...]) -> Any:
    """The entry of the nested dict ``params`` at ``path``."""
    for key in path:
        params = params[key]
    return params

