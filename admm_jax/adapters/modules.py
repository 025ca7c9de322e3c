"""LoRA + sparse adapter layers: a frozen base linear plus a trainable low-rank and sparse delta.

:class:`SparseLoRA` wraps any base module mapping ``[..., in] -> [..., out]`` (the frozen
``W0``, e.g. a bias-free ``nnx.Linear``) and adds

    y = base(x) + λ·(x A) B + x·Mat(E),     i.e.  W = W0 + λ·A B + Mat(E)   (kernels [in, out])

with ``A = lora_a [in, r]`` (fan-in), ``B = lora_b [r, out]`` (fan-out), ``λ = scale`` a static
float, and ``E`` trainable values at fixed ``(rows, cols)`` positions of the ``[in, out]``
kernel, multiplied by :func:`kernels.sparse_matmul` (SpMM forward; the gradient of ``E`` is the
SDDMM ``∂L/∂E[i] = Σ_t x[t, rows[i]]·dy[t, cols[i]]``, never the dense ``in × out`` gradient).

Orientation. The papers write ``W = W0 + λ·B_p A_p + Mat(E)`` for a PyTorch weight
``[out, in]`` with ``B_p [out, r]`` and ``A_p [r, in]``. Flax kernels are the transpose, so
``lora_a = A_pᵀ`` and ``lora_b = B_pᵀ``: the names keep their roles (A reads the input, B writes
the output, standard LoRA initialises B = 0) and agree with flax's own ``nnx.LoRA``
(``lora_a [in, r]``, ``lora_b [r, out]``, ``y = x a b + base(x)``). Row indices of ``E`` index
the input axis, column indices the output axis.

Variable types follow flax's ``nnx.LoRAParam`` convention: the trainable adapter weights are
:class:`AdapterParam` (a ``nnx.LoRAParam``), with the subtypes :class:`LowRankParam` (A, B) and
:class:`SparseParam` (E); the base weights stay ``nnx.Param`` and the indices are
:class:`~admm_jax.models.linears.SparseIndices`. So ``trainable=AdapterParam`` (or
``nnx.LoRAParam``) in :func:`admm_jax.training.step.make_train_step` trains exactly the
adapters. ``r = 0`` gives a pure sparse adapter (RoSA's sparse part alone) and ``nnz = 0``
plain LoRA: both are this module with one part absent (``None``, skipped statically).

References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2022.
    Nikdan et al., "RoSA: Accurate Parameter-Efficient Fine-Tuning via Robust Adaptation", 2024.
    RA-SpaRC (§3.5, App. B.1): ``W0 + Mat(E) + λBA`` with an SDDMM backward for ``E``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from admm_jax._checks import check_int, check_real
from admm_jax.models.linears import SparseLinear, materialize

__all__ = [
    "AdapterInit",
    "AdapterParam",
    "LowRankParam",
    "SparseDelta",
    "SparseLoRA",
    "SparseParam",
    "lora_init",
]

Array = jax.Array


class AdapterParam(nnx.LoRAParam):
    """A trainable adapter weight (an ``nnx.LoRAParam``): filter on it to train adapters only."""


class LowRankParam(AdapterParam):
    """The low-rank factors ``lora_a [in, r]`` and ``lora_b [r, out]``."""


class SparseParam(AdapterParam):
    """The sparse adapter values ``E [nnz]`` (their positions are ``SparseIndices``)."""


class AdapterInit(NamedTuple):
    """The initial state of one adapter, ``W = W0 + scale·lora_a lora_b + Mat(values)``.

    Attributes:
        lora_a: ``[in, r]`` fan-in factor (``r = 0`` allowed).
        lora_b: ``[r, out]`` fan-out factor.
        values: ``[nnz]`` sparse values (``nnz = 0`` allowed).
        rows: ``[nnz]`` integer input-axis indices in ``[0, in)``.
        cols: ``[nnz]`` integer output-axis indices in ``[0, out)``; ``(rows, cols)`` distinct.
        scale: ``λ > 0`` (LoRA's ``α/r``), static.
    """

    lora_a: Any
    lora_b: Any
    values: Any
    rows: Any
    cols: Any
    scale: float = 1.0


class SparseDelta(SparseLinear):
    """:class:`~admm_jax.models.linears.SparseLinear` whose values are :class:`SparseParam`
    (trainable adapter values at fixed indices, SDDMM backward)."""

    def __init__(self, matrix: kernels.SparseMatrix, *, compute_dtype: str = "float32"):
        super().__init__(matrix, compute_dtype=compute_dtype)
        self.values = SparseParam(matrix.values)


def _shape_of(base: nnx.Module | None) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a base module that records them, else ``None``."""
    if base is None or not hasattr(base, "in_features") or not hasattr(base, "out_features"):
        return None
    return int(base.in_features), int(base.out_features)


def _factors(init: AdapterInit, base_shape: tuple[int, int] | None) -> tuple[Array, Array]:
    """``(lora_a, lora_b)`` as arrays, their shapes checked against each other and the base."""
    a, b = jnp.asarray(init.lora_a), jnp.asarray(init.lora_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"adapter factors must be lora_a [in, r] and lora_b [r, out], got "
                         f"shapes {a.shape} and {b.shape}")
    if base_shape is not None and (a.shape[0], b.shape[1]) != base_shape:
        raise ValueError(f"adapter factors of shape [in, out] = {(a.shape[0], b.shape[1])} do "
                         f"not fit the base module's [in, out] = {base_shape}")
    return a, b


class SparseLoRA(nnx.Module):
    """``y = base(x) + λ·(x A) B + x·Mat(E)``: frozen base, trainable low-rank + sparse delta.

    Args:
        base_module: the frozen ``W0``, any module ``[..., in] -> [..., out]``, or ``None`` for
            the delta alone (as in flax's ``nnx.LoRA``). Its ``in_features`` /
            ``out_features``, where it has them, must match the factors.
        init: the adapter's initial :class:`AdapterInit` (factors, sparse values + indices,
            ``scale`` λ > 0). Entries are stored sorted by ``(col, row)`` with their values
            (:func:`kernels.sparse_matrix`), which also rejects indices out of range or
            duplicated.
        compute_dtype: activations and adapter weights are cast to it for the delta's matmuls.

    Attributes: ``lora_a`` / ``lora_b`` (:class:`LowRankParam`; ``None`` when ``rank = 0``),
    ``sparse`` (:class:`SparseDelta`: ``values`` :class:`SparseParam`, ``rows`` / ``cols``
    ``SparseIndices``; ``None`` when ``nnz = 0``), static ``scale``, ``rank``, ``nnz``,
    ``in_features``, ``out_features``. An absent part holds no leaf at all, so params and
    checkpoints never carry zero-size arrays.
    """

    def __init__(self, base_module: nnx.Module | None, init: AdapterInit, *,
                 compute_dtype: str = "float32"):
        if not isinstance(init, AdapterInit):
            raise TypeError(f"init must be an AdapterInit, got {type(init).__name__}")
        self.scale = check_real("scale", init.scale, low=0.0, low_open=True)
        a, b = _factors(init, _shape_of(base_module))
        self.in_features, self.rank = a.shape
        self.out_features = b.shape[1]
        matrix = kernels.sparse_matrix(init.values, init.rows, init.cols,
                                       (self.in_features, self.out_features))
        self.nnz = matrix.nnz
        self.compute_dtype = compute_dtype
        self.base_module = base_module
        # an absent part is None, not a zero-size array (checkpoints cannot store those)
        self.lora_a = LowRankParam(a) if self.rank else None
        self.lora_b = LowRankParam(b) if self.rank else None
        self.sparse = SparseDelta(matrix, compute_dtype=compute_dtype) if self.nnz else None

    @property
    def param_count(self) -> int:
        """Trainable scalars: ``r·(in + out) + nnz``."""
        return self.rank * (self.in_features + self.out_features) + self.nnz

    def adapter_out(self, x: Array) -> Array:
        """The delta ``λ·(x A) B + x·Mat(E)`` in ``compute_dtype`` (``[..., out]``)."""
        dt = jnp.dtype(self.compute_dtype)
        x = x.astype(dt)
        out = jnp.zeros((*x.shape[:-1], self.out_features), dt)
        if self.rank:
            out = out + ((x @ self.lora_a[...].astype(dt)) * self.scale) @ \
                self.lora_b[...].astype(dt)
        if self.nnz:
            out = out + self.sparse(x)
        return out

    def __call__(self, x: Array) -> Array:
        if self.base_module is None:
            return self.adapter_out(x)
        y = self.base_module(x)
        return y + self.adapter_out(x).astype(y.dtype)

    def delta(self) -> Array:
        """``ΔW = λ·A B + Mat(E)`` as a dense ``[in, out]`` kernel (fp32 or the params' dtype)."""
        out = jnp.zeros((self.in_features, self.out_features), jnp.float32)
        if self.rank:
            out = out + self.scale * (self.lora_a[...] @ self.lora_b[...])
        if self.nnz:
            out = out + self.sparse.dense()
        return out

    def dense(self) -> Array:
        """``W0 + ΔW`` (``W0 = materialize(base_module)``), so ``self(x) ≈ x @ self.dense()``."""
        if self.base_module is None:
            return self.delta()
        return materialize(self.base_module) + self.delta()

    def weights(self) -> AdapterInit:
        """The current adapter state as an :class:`AdapterInit` (to rebuild it on a new base)."""
        a = self.lora_a[...] if self.rank else jnp.zeros((self.in_features, 0), jnp.float32)
        b = self.lora_b[...] if self.rank else jnp.zeros((0, self.out_features), jnp.float32)
        if not self.nnz:
            empty = jnp.zeros(0, jnp.int32)
            return AdapterInit(a, b, jnp.zeros(0, jnp.float32), empty, empty, self.scale)
        return AdapterInit(a, b, self.sparse.values[...], self.sparse.rows[...],
                           self.sparse.cols[...], self.scale)


def lora_init(in_features: int, out_features: int, rank: int, key: Array, *,
              rows: Any = None, cols: Any = None, scale: float = 1.0) -> AdapterInit:
    """Standard LoRA initialisation: a delta that is exactly zero at the start.

    ``lora_a ~ he_uniform [in, r]`` (flax's ``nnx.LoRA`` default), ``lora_b = 0 [r, out]`` and
    ``E = 0`` at the given ``(rows, cols)`` (none by default), so ``W = W0`` at initialisation
    (Hu et al. 2022). ``rank`` is in ``[0, min(in, out)]``; give both ``rows`` and ``cols`` or
    neither (their validity is checked when the adapter is built)."""
    in_features = check_int("in_features", in_features, minimum=1)
    out_features = check_int("out_features", out_features, minimum=1)
    rank = check_int("rank", rank, minimum=0, maximum=min(in_features, out_features))
    scale = check_real("scale", scale, low=0.0, low_open=True)
    if (rows is None) != (cols is None):
        raise ValueError("give both rows and cols of the sparse adapter, or neither")
    if rows is None:
        rows = cols = np.zeros(0, np.int32)
    rows, cols = jnp.asarray(rows), jnp.asarray(cols)
    if rows.ndim != 1 or rows.shape != cols.shape:
        raise ValueError(f"rows and cols must be 1-D of equal length, got shapes {rows.shape} "
                         f"and {cols.shape}")
    a = nnx.initializers.he_uniform()(key, (in_features, rank), jnp.float32) if rank else \
        jnp.zeros((in_features, 0), jnp.float32)
    return AdapterInit(a, jnp.zeros((rank, out_features), jnp.float32),
                       jnp.zeros(rows.shape, jnp.float32), rows, cols, scale)
