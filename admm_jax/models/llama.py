"""LLaMA-style decoder-only transformer in Flax NNX.

The module tree reads like the architecture diagram::

    Llama
    ├── embed         Embed[vocab, dim]
    ├── layers[i]     DecoderBlock
    │   ├── attn_norm RMSNorm
    │   ├── attn      Attention (q/k/v/o projections, RoPE, grouped-query, causal)
    │   ├── mlp_norm  RMSNorm
    │   └── mlp       SwiGLU (gate/up/down projections)
    ├── final_norm    RMSNorm
    └── lm_head       Linear[dim, vocab]   (absent when embeddings are tied)

Widths may differ per block (:class:`~admm_jax.models.config.LlamaConfig` takes one ``n_heads``,
``n_kv_heads`` and ``mlp_dim`` per block), so a structurally pruned model is an ordinary model.

Every projection is built by one :data:`LinearFactory` ``(LinearSpec, config, rngs) -> module``,
passed as ``Llama(config, rngs=..., linear=...)`` / ``init_params(config, key, linear=...)``;
the default :func:`dense_linear` is a bias-free ``nnx.Linear`` at ``layers/{i}/attn/q_proj``
etc. Adapters and compact sparse or low-rank layers plug in there.

Activation hooks: each module sows the input of each of its linears as ``nnx.Intermediate``
(the style of flax's ``examples/gemma``), off by default so a normal forward pays nothing;
:func:`sown_inputs` runs a module with them on and returns ``{"attn/q_proj/inputs": x, ...}``.
One-shot compression (:mod:`admm_jax.pruning.capture`) reads its statistics from these hooks, so
whatever a factory-built or wrapped linear does is seen downstream.

Linear kernels are stored ``[in, out]`` (Flax convention). Parameters are fp32; an optional
``compute_dtype`` (e.g. ``"bfloat16"``) casts activations and weights for the matmuls. Logits are
always returned in fp32.

RoPE uses the rotate-half convention of Hugging Face LLaMA: the head dimension is split into two
halves ``(x1, x2)`` rotated as ``(x1 cos - x2 sin, x2 cos + x1 sin)`` with frequencies
``base^(-2i/d)``.

References:
    Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", 2023.
    Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021.
    Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models", 2023.
    Shazeer, "GLU Variants Improve Transformer", 2020.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from admm_jax.models.config import PRESETS, BlockShape, LlamaConfig

__all__ = [
    "PRESETS",
    "Attention",
    "BlockShape",
    "DecoderBlock",
    "LinearFactory",
    "LinearSpec",
    "Llama",
    "LlamaConfig",
    "SwiGLU",
    "abstract_params",
    "apply_rope",
    "causal_attention",
    "count_params",
    "dense_linear",
    "forward",
    "init_params",
    "rope_tables",
    "sown_inputs",
]

Array = jax.Array


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[Array, Array]:
    """Cos/sin tables ``[seq_len, head_dim // 2]`` with θ_i = base^(−2i/d)."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE on ``x: [B, T, H, D]`` with tables ``[T, D/2]``."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def causal_attention(q: Array, k: Array, v: Array) -> Array:
    """Grouped-query causal softmax attention.

    Args:
        q: ``[B, T, Hq, D]`` queries.
        k, v: ``[B, T, Hkv, D]`` keys and values, ``Hq % Hkv == 0``; each KV head serves
            ``Hq // Hkv`` consecutive query heads.

    Returns:
        ``[B, T, Hq, D]``.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / jnp.sqrt(d)
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, d)


# ---------------------------------------------------------------------------------------------
# Linear factory
# ---------------------------------------------------------------------------------------------

LinearName = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "lm_head"]
_GROUPS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class LinearSpec(NamedTuple):
    """Which linear layer a :data:`LinearFactory` is asked to build.

    Attributes:
        name: the projection (``"q_proj"`` … ``"down_proj"``, or ``"lm_head"``).
        layer: its decoder block, or ``None`` for ``lm_head``.
        in_features: input width.
        out_features: output width.
    """

    name: LinearName
    layer: int | None
    in_features: int
    out_features: int

    @property
    def path(self) -> str:
        """Its path in the parameter tree, e.g. ``"layers/3/attn/q_proj"`` or ``"lm_head"``."""
        if self.layer is None:
            return self.name
        return f"layers/{self.layer}/{_GROUPS[self.name]}/{self.name}"


#: ``(spec, config, rngs) -> module`` mapping ``[..., in_features] -> [..., out_features]``. Every
#: linear of a :class:`Llama` is built by one, so adapters and compact layers can replace them.
LinearFactory = Callable[[LinearSpec, LlamaConfig, nnx.Rngs], nnx.Module]


def dense_linear(spec: LinearSpec, config: LlamaConfig, rngs: nnx.Rngs) -> nnx.Linear:
    """The default factory: a bias-free ``nnx.Linear`` (kernel ``[in, out]``, fp32, normal
    initialisation with ``config.init_std``, matmul in ``config.compute_dtype``)."""
    return nnx.Linear(spec.in_features, spec.out_features, use_bias=False,
                      dtype=jnp.dtype(config.compute_dtype), param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(config.init_std), rngs=rngs)


def _rmsnorm(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(config.dim, epsilon=config.norm_eps, dtype=jnp.dtype(config.compute_dtype),
                       param_dtype=jnp.float32, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class _Hooked(nnx.Module):
    """A module that can record the input of each of its linears (off by default).

    ``nnx.view(model, sow_inputs=True)`` turns the hooks on (a static attribute, so the default
    graph and its compiled forward are untouched); under ``nnx.capture(..., nnx.Intermediate)`` the
    input of linear ``name`` is then sown as ``Intermediate`` ``"inputs"`` of that linear, at the
    parameter path of the linear (``attn/q_proj/inputs``). The sow happens here, in the parent,
    so it records what any factory-built (or wrapped) linear receives.
    """

    sow_inputs: bool = False

    def set_view(self, sow_inputs: bool | None = None):
        """Used by ``nnx.view``.

        Args:
            sow_inputs: record the inputs of this module's linears.
        """
        if sow_inputs is not None:
            self.sow_inputs = sow_inputs

    def _sow(self, target: str | None, name: str, value: Array) -> Array:
        """``value``, sown as ``name`` on child ``target`` (``None``: self) if hooks are on."""
        if self.sow_inputs:
            (self if target is None else getattr(self, target)).sow(nnx.Intermediate, name, value)
        return value

    def _linear(self, name: str, x: Array) -> Array:
        """Linear ``name`` applied to ``x``, with its input hook."""
        return getattr(self, name)(self._sow(name, "inputs", x))


class Attention(_Hooked):
    """Multi-head causal self-attention with RoPE and grouped-query KV heads."""

    def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs,
                 linear: LinearFactory = dense_linear):
        self.n_heads, self.n_kv_heads, self.head_dim, _ = config.block(layer)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        for name, d_in, d_out in [("q_proj", config.dim, q_dim), ("k_proj", config.dim, kv_dim),
                                  ("v_proj", config.dim, kv_dim), ("o_proj", q_dim, config.dim)]:
            setattr(self, name, linear(LinearSpec(name, layer, d_in, d_out), config, rngs))

    def __call__(self, x: Array, cos: Array, sin: Array) -> Array:
        b, t, _ = x.shape
        hd = self.head_dim
        q = self._linear("q_proj", x).reshape(b, t, self.n_heads, hd)
        k = self._linear("k_proj", x).reshape(b, t, self.n_kv_heads, hd)
        v = self._linear("v_proj", x).reshape(b, t, self.n_kv_heads, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self._linear("o_proj", causal_attention(q, k, v).reshape(b, t, self.n_heads * hd))


class SwiGLU(_Hooked):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs,
                 linear: LinearFactory = dense_linear):
        d, hidden = config.dim, config.block(layer).mlp_dim
        for name, d_in, d_out in [("gate_proj", d, hidden), ("up_proj", d, hidden),
                                  ("down_proj", hidden, d)]:
            setattr(self, name, linear(LinearSpec(name, layer, d_in, d_out), config, rngs))

    def __call__(self, x: Array) -> Array:
        hidden = jax.nn.silu(self._linear("gate_proj", x)) * self._linear("up_proj", x)
        return self._linear("down_proj", hidden)


class DecoderBlock(_Hooked):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    With hooks on it also sows the residual stream after attention as ``Intermediate`` ``"mid"``.
    """

    def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs,
                 linear: LinearFactory = dense_linear):
        self.attn_norm = _rmsnorm(config, rngs)
        self.attn = Attention(config, layer, rngs=rngs, linear=linear)
        self.mlp_norm = _rmsnorm(config, rngs)
        self.mlp = SwiGLU(config, layer, rngs=rngs, linear=linear)

    def __call__(self, x: Array, cos: Array, sin: Array) -> Array:
        x = self._sow(None, "mid", x + self.attn(self.attn_norm(x), cos, sin))
        return x + self.mlp(self.mlp_norm(x))


class Llama(_Hooked):
    """LLaMA-style decoder. ``model(tokens: int[B, T]) -> logits: f32[B, T, vocab]``.

    Args:
        config: the architecture (widths may differ per block, see :class:`LlamaConfig`).
        rngs: initialisation keys.
        linear: the factory that builds every q/k/v/o/gate/up/down projection and ``lm_head``
            (default :func:`dense_linear`); kept as ``model.linear_factory``.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs,
                 linear: LinearFactory = dense_linear):
        self.config = config
        self.linear_factory = linear
        self.embed = nnx.Embed(config.vocab_size, config.dim, param_dtype=jnp.float32,
                               embedding_init=nnx.initializers.normal(config.init_std), rngs=rngs)
        self.layers = nnx.List([DecoderBlock(config, i, rngs=rngs, linear=linear)
                                for i in range(config.n_layers)])
        self.final_norm = _rmsnorm(config, rngs)
        self.lm_head = None if config.tie_embeddings else linear(
            LinearSpec("lm_head", None, config.dim, config.vocab_size), config, rngs)

    def embed_tokens(self, tokens: Array) -> Array:
        """Token ids ``[B, T]`` to the residual stream ``[B, T, dim]`` (validates the length)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, seq], got {tokens.shape}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds the model's max_seq_len "
                f"{self.config.max_seq_len}")
        return self.embed(tokens).astype(jnp.dtype(self.config.compute_dtype))

    def rope(self, seq_len: int) -> tuple[Array, Array]:
        c = self.config
        return rope_tables(seq_len, c.resolved_head_dim, c.rope_base)

    def unembed(self, h: Array) -> Array:
        """Final norm and output projection: ``[B, T, dim] -> f32[B, T, vocab]``."""
        h = self.final_norm(h)
        if self.lm_head is None:
            logits = h @ self.embed.embedding[...].astype(h.dtype).T
        else:
            logits = self._linear("lm_head", h)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: Array) -> Array:
        h = self.embed_tokens(tokens)
        cos, sin = self.rope(tokens.shape[1])
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.unembed(h)


def sown_inputs(module: nnx.Module, *args: Any) -> tuple[Any, dict[str, Array]]:
    """Run ``module`` (a :class:`Llama`, :class:`DecoderBlock`, … ) on ``args`` with its hooks on.

    Returns:
        ``(output, sown)``: the module's output and ``{path: value}`` for everything its hooks
        sowed, keyed by path relative to ``module``: ``"attn/q_proj/inputs"`` (the input of that
        linear), ``"mid"`` (a block's residual stream after attention), or with a
        ``"layers/{i}/"`` prefix when ``module`` is the whole model.
    """
    out, sown = nnx.capture(nnx.view(module, sow_inputs=True), nnx.Intermediate)(*args)
    flat = nnx.to_flat_state(sown)
    return out, {"/".join(map(str, path)): var.get_value()[-1] for path, var in flat}


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def init_params(config: LlamaConfig, key: Array, *,
                linear: LinearFactory = dense_linear) -> tuple[nnx.GraphDef, dict]:
    """Build a :class:`Llama` and split it into its static graph and a pure-dict param pytree.

    The pure dict (``{"embed": {"embedding": …}, "layers": {0: {"attn": …}}, …}``) is what
    optimizers, ADMM transforms and checkpoints operate on; :func:`forward` merges it back.
    ``linear`` is the model's linear factory (see :class:`Llama`).
    """
    model = Llama(config, rngs=nnx.Rngs(params=key), linear=linear)
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def abstract_params(config: LlamaConfig, *,
                    linear: LinearFactory = dense_linear) -> tuple[nnx.GraphDef, dict]:
    """Like :func:`init_params` but with ``jax.ShapeDtypeStruct`` leaves (no allocation).

    Each projection is traced on its own (:func:`_traced_alone`): flax records every RNG draw
    under a trace at a cost linear in the trace so far, so one trace of the whole model grows
    quadratically with its size (minutes for a compact SmolLM2)."""

    def build():
        model = Llama(config, rngs=nnx.Rngs(params=0), linear=_traced_alone(linear))
        model.linear_factory = linear
        return model

    graphdef, state = nnx.split(nnx.eval_shape(build))
    return graphdef, nnx.to_pure_dict(state)


def _traced_alone(linear: LinearFactory) -> LinearFactory:
    """``linear`` built in a trace of its own, its leaves handed to the enclosing trace as zeros
    of the same shapes and dtypes (so only shapes flow out; values are never meant to)."""

    def factory(spec: LinearSpec, cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.Module:
        graphdef, state = nnx.split(nnx.eval_shape(lambda: linear(spec, cfg, nnx.Rngs(params=0))))
        return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))

    return factory


def forward(graphdef: nnx.GraphDef, params: dict, tokens: Array) -> Array:
    """Logits ``f32[B, T, vocab]`` of the model ``graphdef`` with ``params`` on ``tokens``."""
    return nnx.merge(graphdef, params)(tokens)
