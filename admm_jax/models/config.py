"""The architecture of a LLaMA model: :class:`LlamaConfig`, its per-layer shapes and presets.

Query heads, key/value heads and the MLP width may differ between decoder blocks (a structurally
pruned model), given as one ``int`` for every block or a tuple with one entry per block::

    LlamaConfig.preset("nano", mlp_dim=(172, 96))     # block 0 keeps 172 channels, block 1 has 96
    config.block(1)                                   # BlockShape(n_heads=4, n_kv_heads=2,
                                                      #            head_dim=16, mlp_dim=96)

:meth:`LlamaConfig.to_dict` is plain JSON (tuples become lists) and :meth:`LlamaConfig.from_dict`
reads it back (lists become tuples), so ``model.json`` files with an ``int`` ``mlp_dim`` written
before per-layer widths existed still load.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

from admm_jax._checks import check_int

#: Fields that take one value per decoder block (an ``int`` applies to every block).
PER_LAYER_FIELDS: tuple[str, ...] = ("n_heads", "n_kv_heads", "mlp_dim")
_SCALAR_FIELDS = ("vocab_size", "dim", "n_layers", "max_seq_len")
_DTYPES = ("float32", "bfloat16", "float16")


class BlockShape(NamedTuple):
    """The widths of one decoder block.

    Attributes:
        n_heads: query heads (``q_proj`` has ``n_heads·head_dim`` outputs).
        n_kv_heads: key/value heads (``k_proj``/``v_proj`` have ``n_kv_heads·head_dim`` outputs).
        head_dim: per-head width (the same in every block: RoPE tables are shared).
        mlp_dim: SwiGLU hidden width (``gate_proj``/``up_proj`` outputs, ``down_proj`` inputs).
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a :class:`~admm_jax.models.llama.Llama` model.

    Attributes:
        vocab_size: number of token ids.
        dim: residual-stream width.
        n_layers: number of decoder blocks.
        n_heads: query heads, one ``int`` or one per block (``n_layers`` entries).
        n_kv_heads: key/value heads, one ``int`` or one per block; in every block ``n_heads`` is
            a multiple of ``n_kv_heads`` (grouped-query attention when smaller).
        mlp_dim: hidden width of the SwiGLU MLP, one ``int`` or one per block.
        max_seq_len: longest sequence the model accepts.
        head_dim: per-head width; defaults to ``dim // n_heads`` (required when ``n_heads``
            differs between blocks).
        rope_base: RoPE frequency base.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: reuse the token embedding as the output projection.
        compute_dtype: dtype of activations and matmuls (params stay fp32).
        init_std: standard deviation of the normal weight initialisation.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int | tuple[int, ...]
    n_kv_heads: int | tuple[int, ...]
    mlp_dim: int | tuple[int, ...]
    max_seq_len: int
    head_dim: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    compute_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        for name in _SCALAR_FIELDS:
            check_int(f"LlamaConfig.{name}", getattr(self, name), 1)
        for name in PER_LAYER_FIELDS:  # lists (from JSON) -> tuples, so configs stay hashable
            object.__setattr__(self, name, _per_layer(name, getattr(self, name), self.n_layers))
        if self.head_dim is not None:
            check_int("LlamaConfig.head_dim", self.head_dim, 1)
        elif isinstance(self.n_heads, tuple):
            raise ValueError("LlamaConfig.head_dim is required when n_heads differs per layer")
        elif self.dim % self.n_heads:
            raise ValueError(
                f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                "unless head_dim is given")
        if self.resolved_head_dim % 2:
            raise ValueError(f"head dim must be even for RoPE, got {self.resolved_head_dim}")
        for i in range(self.n_layers):
            block = self.block(i)
            if block.n_heads % block.n_kv_heads:
                where = f" in layer {i}" if self.per_layer else ""
                raise ValueError(
                    f"LlamaConfig.n_heads ({block.n_heads}) must be a multiple of n_kv_heads "
                    f"({block.n_kv_heads}){where}")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"LlamaConfig.compute_dtype must be one of {', '.join(_DTYPES)}, "
                             f"got {self.compute_dtype!r}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def per_layer(self) -> bool:
        """Whether any width is given per block (a tuple), e.g. after structured pruning."""
        return any(isinstance(getattr(self, name), tuple) for name in PER_LAYER_FIELDS)

    def block(self, i: int) -> BlockShape:
        """The widths of decoder block ``i`` (``0 <= i < n_layers``)."""
        check_int("block index", i, 0, self.n_layers - 1)
        n_heads, n_kv_heads, mlp_dim = (
            _at(getattr(self, name), i) for name in PER_LAYER_FIELDS)
        return BlockShape(n_heads, n_kv_heads, self.resolved_head_dim, mlp_dim)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named preset (see :data:`PRESETS`) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values (per-layer tuples as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Inverse of :meth:`to_dict` (also reads dicts written before per-layer widths)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _per_layer(name: str, value: Any, n_layers: int) -> int | tuple[int, ...]:
    """A per-layer field validated: a positive ``int``, or ``n_layers`` of them as a tuple."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_layers:
            raise ValueError(f"LlamaConfig.{name} has {len(value)} entries, expected one per "
                             f"layer (n_layers={n_layers})")
        return tuple(check_int(f"LlamaConfig.{name}[{i}]", v, 1) for i, v in enumerate(value))
    return check_int(f"LlamaConfig.{name}", value, 1)


def _at(value: int | tuple[int, ...], i: int) -> int:
    return value[i] if isinstance(value, tuple) else value


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


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
