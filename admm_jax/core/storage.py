"""Low-precision storage of ADMM states (ELSA-L).

At LLM scale the ADMM auxiliary variable Z and scaled dual U double the optimizer memory. ELSA-L
keeps them in bf16 or fp8 with fp32 scales and computes in fp32: every read decodes, every write
encodes.

A :class:`StateStorage` is a codec ``encode: f32[m, n] -> stored``, ``decode: stored -> f32[m, n]``:

* ``"float32"``: the array itself (4 bytes per entry);
* ``"bfloat16"``: a cast (2 bytes), optionally scaled to ``amax = 1``;
* ``"float8_e4m3fn"`` / ``"float8_e5m2"``: ``q = cast(x / s)`` with the scale ``s = amax / fmax``
  (``fmax`` the format's largest finite value: 448 for e4m3, 57344 for e5m2), so the largest
  magnitude maps to ``fmax`` (1 byte per entry plus the scales).

Scales are fp32, per tensor (one scalar) or per row: for a ``[in, out]`` kernel a "row" is one
output unit (a row of the ``[out, in]`` weight of PyTorch), i.e. one scale per column here,
``s: f32[1, out]``. Casting rounds to nearest even; a stored round trip has relative error at most
``2^-(stored mantissa bits + 1)`` (bf16: 2⁻⁸, e4m3: 2⁻⁴, e5m2: 2⁻³) for normal values, and
at most that fraction of ``s·fmax`` in absolute terms below the normal range.

Reference: ELSA (../papers/elsa.md), ELSA-L; Micikevicius et al., "FP8 Formats for Deep
Learning", 2022.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_ALIASES = {"fp32": "float32", "float32": "float32", "f32": "float32",
            "bf16": "bfloat16", "bfloat16": "bfloat16",
            "fp8": "float8_e4m3fn", "e4m3": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
            "float8_e4m3fn": "float8_e4m3fn",
            "e5m2": "float8_e5m2", "fp8_e5m2": "float8_e5m2", "float8_e5m2": "float8_e5m2"}
_SCALINGS = ("none", "tensor", "row")


class Stored(NamedTuple):
    """A tensor in a low-precision format: ``decode = values.astype(f32) · scale``."""

    values: Array  # [m, n] in the storage dtype
    scale: Array  # f32 [] (tensor) or [1, n] (row)


@functools.cache
def storage_dtype(name: str) -> jnp.dtype:
    """The JAX dtype for a storage name (``"bf16"``, ``"e4m3"``, ``"float8_e5m2"``, ...).

    Raises:
        ValueError: unknown name, or a format that this JAX build / default backend cannot hold
            (checked by a round trip of a small array on the default device).
    """
    canonical = _ALIASES.get(str(name).lower())
    if canonical is None:
        raise ValueError(f"unknown state dtype {name!r}; choose one of {sorted(set(_ALIASES))}")
    dtype = getattr(jnp, canonical, None)
    if dtype is None:
        raise ValueError(f"state dtype {name!r} ({canonical}) is not available in this JAX "
                         f"build (jax {jax.__version__}); use 'bfloat16' or 'float32'")
    try:
        with jax.ensure_compile_time_eval():
            probe = jnp.asarray([1.0, -2.0], jnp.float32).astype(dtype).astype(jnp.float32)
            ok = bool(np.array_equal(np.asarray(probe), [1.0, -2.0]))
    except Exception as e:  # a backend without the format raises at compile or run time
        raise ValueError(f"state dtype {name!r} ({canonical}) is unavailable on the "
                         f"{jax.default_backend()} backend: {e}") from e
    if not ok:
        raise ValueError(f"state dtype {name!r} ({canonical}) does not round-trip on the "
                         f"{jax.default_backend()} backend")
    return jnp.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class StateStorage:
    """How ADMM state tensors are stored (module docstring).

    Attributes:
        dtype: ``"float32"`` (default, no encoding), ``"bfloat16"``, ``"float8_e4m3fn"`` or
            ``"float8_e5m2"`` (aliases ``fp32``, ``bf16``, ``e4m3``, ``e5m2`` accepted).
        scaling: ``"tensor"``, ``"row"`` (one scale per output unit) or ``"none"``; default:
            ``"tensor"`` for fp8, ``"none"`` for bf16 (its range equals fp32's).
    """

    dtype: str = "float32"
    scaling: str | None = None

    def __post_init__(self):
        storage_dtype(self.dtype)  # validates name and availability
        if self.scaling is not None and self.scaling not in _SCALINGS:
            raise ValueError(f"scaling must be one of {_SCALINGS}, got {self.scaling!r}")

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return storage_dtype(self.dtype)

    @property
    def is_fp32(self) -> bool:
        return self.jnp_dtype == jnp.float32

    @property
    def resolved_scaling(self) -> str:
        if self.scaling is not None:
            return self.scaling
        return "tensor" if self.jnp_dtype.itemsize == 1 else "none"

    def _target_max(self) -> float:
        """Where the scale maps ``amax``: the format's largest finite value for fp8, 1 for
        bf16 (whose range is fp32's, so scaling only needs to normalise)."""
        dtype = self.jnp_dtype
        return float(jnp.finfo(dtype).max) if dtype.itemsize == 1 else 1.0

    def encode(self, x: Array) -> Array | Stored:
        """``f32[m, n]`` → stored form: the array itself (fp32), a cast (``scaling="none"``) or
        :class:`Stored` values and scales."""
        if self.is_fp32:
            return x.astype(jnp.float32)
        scaling = self.resolved_scaling
        x = x.astype(jnp.float32)
        target = self._target_max()
        fmax = float(jnp.finfo(self.jnp_dtype).max)
        if scaling == "none":  # a plain cast (saturating), no scale to store
            return jnp.clip(x, -fmax, fmax).astype(self.jnp_dtype)
        amax = jnp.max(jnp.abs(x), axis=None if scaling == "tensor" else 0,
                       keepdims=scaling == "row")
        scale = jnp.where(amax > 0, amax / target, 1.0).astype(jnp.float32)
        # saturate: fp32 rounding of x / scale may pass the target by an ulp, and fp8 e4m3fn
        # has no inf (an out-of-range cast would give NaN)
        q = jnp.clip(x / scale, -fmax, fmax)
        return Stored(values=q.astype(self.jnp_dtype), scale=scale)

    def decode(self, stored: Array | Stored) -> Array:
        """Stored form → ``f32[m, n]``."""
        if isinstance(stored, Stored):
            return stored.values.astype(jnp.float32) * stored.scale
        return stored.astype(jnp.float32)


def nbytes(tree: Any) -> int:
    """Bytes held by the arrays of a pytree (``None`` and ``MaskedNode`` leaves hold none)."""
    return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree_util.tree_leaves(tree)
                   if hasattr(x, "dtype")))
