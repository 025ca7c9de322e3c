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

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a :class:`Llama` model.

    Attributes:
        vocab_size: number of token ids.
        dim: residual-stream width.
        n_layers: number of decoder blocks.
        n_heads: number of query heads.
        n_kv_heads: number of key/value heads (``n_heads % n_kv_heads == 0``; GQA when smaller).
        mlp_dim: hidden width of the SwiGLU MLP.
        max_seq_len: longest sequence the model accepts.
        head_dim: per-head width; defaults to ``dim // n_heads``.
        rope_base: RoPE frequency base.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: reuse the token embedding as the output projection.
        compute_dtype: dtype of activations and matmuls (params stay fp32).
        init_std: standard deviation of the normal weight initialisation.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_dim: int
    max_seq_len: int
    head_dim: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    compute_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads})")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(
                f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                "unless head_dim is given")
        if self.resolved_head_dim % 2:
            raise ValueError(f"head dim must be even for RoPE, got {self.resolved_head_dim}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                "LlamaConfig.compute_dtype must be one of float32, bfloat16, float16, "
                f"got {self.compute_dtype!r}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named preset (see :data:`PRESETS`) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


#: Model presets. ``nano`` is for tests (< 1 M params), ``tiny`` for CPU demos (~7 M params), and
#: ``60m`` … ``1b`` follow the LLaMA sizes used by the SALAAD paper (GaLore configurations with a
#: 32k vocabulary and sequence length 256) for accelerators.
PRESETS: dict[str, LlamaConfig] = {
    "nano": LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=172,
                        max_seq_len=128),
    "tiny": LlamaConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                        mlp_dim=688, max_seq_len=256),
    "60m": LlamaConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8,
                       mlp_dim=1376, max_seq_len=256),
    "130m": LlamaConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        mlp_dim=2048, max_seq_len=256),
    "350m": LlamaConfig(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, n_kv_heads=16,
                        mlp_dim=2736, max_seq_len=256),
    "1b": LlamaConfig(vocab_size=32000, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32,
                      mlp_dim=5461, max_seq_len=256),
}


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


def _linear(din: int, dout: int, config: LlamaConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=False, dtype=jnp.dtype(config.compute_dtype),
                      param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(config.init_std), rngs=rngs)


def _rmsnorm(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(config.dim, epsilon=config.norm_eps, dtype=jnp.dtype(config.compute_dtype),
                       param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head causal self-attention with RoPE and grouped-query KV heads."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        hd = config.resolved_head_dim
        self.q_proj = _linear(config.dim, config.n_heads * hd, config, rngs)
        self.k_proj = _linear(config.dim, config.n_kv_heads * hd, config, rngs)
        self.v_proj = _linear(config.dim, config.n_kv_heads * hd, config, rngs)
        self.o_proj = _linear(config.n_heads * hd, config.dim, config, rngs)

    def __call__(self, x: Array, cos: Array, sin: Array) -> Array:
        c = self.config
        b, t, _ = x.shape
        hd = c.resolved_head_dim
        q = self.q_proj(x).reshape(b, t, c.n_heads, hd)
        k = self.k_proj(x).reshape(b, t, c.n_kv_heads, hd)
        v = self.v_proj(x).reshape(b, t, c.n_kv_heads, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(causal_attention(q, k, v).reshape(b, t, c.n_heads * hd))


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(config.dim, config.mlp_dim, config, rngs)
        self.up_proj = _linear(config.dim, config.mlp_dim, config, rngs)
        self.down_proj = _linear(config.mlp_dim, config.dim, config, rngs)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.attn_norm = _rmsnorm(config, rngs)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = _rmsnorm(config, rngs)
        self.mlp = SwiGLU(config, rngs=rngs)

    def __call__(self, x: Array, cos: Array, sin: Array) -> Array:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
    """LLaMA-style decoder. ``model(tokens: int[B, T]) -> logits: f32[B, T, vocab]``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.dim, param_dtype=jnp.float32,
                               embedding_init=nnx.initializers.normal(config.init_std), rngs=rngs)
        self.layers = nnx.List([DecoderBlock(config, rngs=rngs) for _ in range(config.n_layers)])
        self.final_norm = _rmsnorm(config, rngs)
        self.lm_head = None if config.tie_embeddings else _linear(
            config.dim, config.vocab_size, config, rngs)

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
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: Array) -> Array:
        h = self.embed_tokens(tokens)
        cos, sin = self.rope(tokens.shape[1])
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.unembed(h)


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def init_params(config: LlamaConfig, key: Array) -> tuple[nnx.GraphDef, dict]:
    """Build a :class:`Llama` and split it into its static graph and a pure-dict param pytree.

    The pure dict (``{"embed": {"embedding": …}, "layers": {0: {"attn": …}}, …}``) is what
    optimizers, ADMM transforms and checkpoints operate on; :func:`forward` merges it back.
    """
    model = Llama(config, rngs=nnx.Rngs(params=key))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def abstract_params(config: LlamaConfig) -> tuple[nnx.GraphDef, dict]:
    """Like :func:`init_params` but with ``jax.ShapeDtypeStruct`` leaves (no allocation)."""
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(params=0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def forward(graphdef: nnx.GraphDef, params: dict, tokens: Array) -> Array:
    """Logits ``f32[B, T, vocab]`` of the model ``graphdef`` with ``params`` on ``tokens``."""
    return nnx.merge(graphdef, params)(tokens)
