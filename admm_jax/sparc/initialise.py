"""Adapter initialisations from gradients: LoRA, LoRA-One, RoSA and RA-SpaRC at one budget.

Every method fills the same :class:`~admm_jax.adapters.SparseLoRA` layer
``W = W0 + λ·A B + Mat(E)`` (kernels ``[in, out]``, ``A = lora_a [in, r]``, ``B = lora_b
[r, out]``) with the same trainable budget per adapted kernel, ``p = r·(in + out)`` for a budget
rank ``r``, and the same scale ``λ = α / r``:

* ``lora`` (Hu et al. 2022): ``A ~ he_uniform``, ``B = 0``, no sparse part: ``W = W0``.
* ``lora-one`` (Zhang et al. 2025): one gradient step compressed by ``SVD_r``,
  ``W = W0 − (1/γ)·SVD_r(g)``, the factors balanced as in eq. (12) below.
* ``rosa`` (Nikdan et al. 2024): a LoRA of rank ``r_lr = round(f·r)`` (``f =
  rosa_rank_fraction``, default ½) plus ``p − r_lr·(in + out)`` sparse entries at the top-k of
  the accumulated squared gradients (RoSA's Fisher mask), all started as LoRA (``B = 0``,
  ``E = 0``): ``W = W0``.
* ``ra-sparc`` (§3.5): SpaRC of the gradient, ``C_p(g) = L + S`` (:func:`~admm_jax.sparc.
  sparc_compress`, the rank chosen per layer), as one compressed SGD step of size ``η = 1/γ``:
  with ``L/γ = UΣVᵀ``, eq. (12) in kernel orientation

      A₀ = −U√Σ / √λ,   B₀ = √ΣVᵀ / √λ,   E₀ = −S/γ  (at S's support),

  so ``W₁ = W0 + λA₀B₀ + Mat(E₀) = W0 − (1/γ)·C_p(g)`` exactly, and an optimizer step of size
  ``η`` on ``(A, B)`` moves the conceptual factors ``√λ·A``, ``√λ·B`` by ``ηλ`` times their
  gradient (Lemma A.3). The sign of the step sits on ``A``; ``g`` is the kernel gradient
  ``∇_{W0} L`` (:mod:`admm_jax.sparc.gradients`), and the SVD / top-k commute with the
  transpose, so the papers' ``[out, in]`` recipe applies to ``[in, out]`` kernels unchanged.

Choices the papers leave open: λ = α/r with the budget rank ``r`` for every method (LoRA's
convention; RA-SpaRC's per-layer ranks then share LoRA's scale instead of dividing by a rank
that may be 0); the gradient is one mini-batch for LoRA-One and RA-SpaRC (§3.5: "a single
stochastic gradient") and the accumulated squares over all calibration batches for RoSA.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax._checks import check_choice, check_int, check_real
from admm_jax.adapters import AdapterInit, lora_init
from admm_jax.sparc.compressors import (
    LowRankFactors,
    SparcResult,
    SparseEntries,
    exact_parts,
    sparc_budget,
    sparc_compress,
    svd_compress,
    topk_compress,
)

__all__ = [
    "METHODS",
    "Method",
    "adapter_inits",
    "init_from_parts",
    "lora_one_init",
    "ra_sparc_init",
    "rosa_init",
    "rosa_split",
]

Method = Literal["lora", "lora-one", "rosa", "ra-sparc"]
METHODS: tuple[str, ...] = ("lora", "lora-one", "rosa", "ra-sparc")
KERNEL = "/kernel"


def init_from_parts(factors: LowRankFactors, entries: SparseEntries, *, scale: float,
                    gamma: float) -> AdapterInit:
    """The adapter whose delta is ``−(1/γ)·(u v + S)``: eq. (12) with the step's sign on ``A``,
    ``A = −u/√(λγ)``, ``B = v/√(λγ)``, ``E = −values/γ`` (``u v = L`` with ``Σ`` split evenly,
    as :mod:`admm_jax.sparc.compressors` returns it).

    Raises:
        ValueError: ``scale`` or ``gamma`` not positive.
    """
    scale = check_real("scale", scale, low=0.0, low_open=True)
    gamma = check_real("gamma", gamma, low=0.0, low_open=True)
    c = 1.0 / math.sqrt(scale * gamma)
    return AdapterInit(-c * jnp.asarray(factors.u, jnp.float32),
                       c * jnp.asarray(factors.v, jnp.float32),
                       -jnp.asarray(entries.values, jnp.float32) / gamma,
                       jnp.asarray(entries.rows), jnp.asarray(entries.cols), scale)


def _no_entries() -> SparseEntries:
    empty = np.zeros(0, np.int32)
    return SparseEntries(np.zeros(0, np.float32), empty, empty)


def lora_one_init(g: jax.Array, rank: int, *, scale: float, gamma: float) -> AdapterInit:
    """LoRA-One: ``W₁ = W0 − (1/γ)·SVD_r(g)`` as a rank-``rank`` adapter (no sparse part)."""
    return init_from_parts(svd_compress(g, rank), _no_entries(), scale=scale, gamma=gamma)


def ra_sparc_init(result: SparcResult, *, scale: float, gamma: float) -> AdapterInit:
    """RA-SpaRC (§3.5): ``W₁ = W0 − (1/γ)·C_p(g)`` from the SpaRC compression of ``g``
    (:func:`~admm_jax.sparc.sparc_compress`), its padding trimmed (rank ``r*``, ``k*``
    entries)."""
    return init_from_parts(*exact_parts(result), scale=scale, gamma=gamma)


def rosa_split(shape: tuple[int, int], rank: int, fraction: float) -> tuple[int, int]:
    """RoSA's fixed split of the budget ``p = rank·(m + n)``: ``(r_lr, k)`` with
    ``r_lr = round(fraction·rank)`` and ``k = p − r_lr·(m + n)`` sparse entries."""
    m, n = shape
    r_lr = math.floor(fraction * rank + 0.5)
    return r_lr, (rank - r_lr) * (m + n)


def rosa_init(mean_square: jax.Array, rank: int, nnz: int, key: jax.Array, *,
              scale: float) -> AdapterInit:
    """RoSA: a standard LoRA of rank ``rank`` plus ``nnz`` zero-initialised sparse entries at
    the top-``nnz`` accumulated squared gradients ``mean_square`` (``W₁ = W0``)."""
    m, n = np.shape(mean_square)
    nnz = check_int("nnz", nnz, 0, m * n)
    entries = topk_compress(mean_square, nnz) if nnz else _no_entries()
    return lora_init(m, n, rank, key, rows=entries.rows, cols=entries.cols, scale=scale)


def _linear_grads(grads: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``{linear path: g}`` from ``{".../kernel": g}`` (the adapters' paths)."""
    out = {}
    for path, g in grads.items():
        if not path.endswith(KERNEL):
            raise ValueError(f"gradient paths are kernel leaves like "
                             f"'layers/0/attn/q_proj/kernel', got {path!r}")
        out[path.removesuffix(KERNEL)] = g
    return out


def adapter_inits(method: Method, gradient: Mapping[str, jax.Array], *, rank: int,
                  alpha: float, gamma: float = 1.0, key: jax.Array | None = None,
                  mean_square: Mapping[str, jax.Array] | None = None,
                  rosa_rank_fraction: float = 0.5, n_iter: int = 1
                  ) -> dict[str, AdapterInit]:
    """``{linear path: AdapterInit}`` of ``method`` for every kernel of ``gradient``, each at
    the budget ``rank·(in + out)`` trainable parameters with ``λ = alpha / rank``.

    Args:
        method: ``"lora"``, ``"lora-one"``, ``"rosa"`` or ``"ra-sparc"`` (module docstring).
        gradient: ``{".../kernel": g [in, out]}``, one stochastic gradient of each adapted
            kernel (its keys choose the adapted linears; ``lora`` uses only the shapes).
        rank: budget rank ``r ≥ 1``.
        alpha: LoRA alpha (``λ = α / r``).
        gamma: the inverse step size ``γ`` of LoRA-One / RA-SpaRC.
        key: PRNG key of the random LoRA factor (``lora``, ``rosa``).
        mean_square: ``{".../kernel": (1/N) Σ g_t²}`` for ``rosa``'s mask.
        rosa_rank_fraction: share of RoSA's budget in its low-rank part.
        n_iter: SpaRC's alternating projections at the chosen rank.

    Raises:
        ValueError: an unknown method, a missing ``key`` / ``mean_square``, a rank above
            ``min(in, out)``, non-positive ``alpha`` / ``gamma``.
    """
    method = check_choice("method", method, METHODS)
    rank = check_int("rank", rank, 1)
    scale = check_real("alpha", alpha, low=0.0, low_open=True) / rank
    grads = _linear_grads(gradient)
    if method in ("lora", "rosa") and key is None:
        raise ValueError(f"{method} needs a PRNG key for its random LoRA factor")
    if method == "rosa" and mean_square is None:
        raise ValueError("rosa needs mean_square (accumulated squared gradients) for its mask")
    keys = dict(zip(grads, jax.random.split(key, len(grads)), strict=True)) if key is not None \
        else {}
    if method == "ra-sparc":  # one matrix at a time: the scan fallback runs only where needed
        return {p: ra_sparc_init(sparc_compress(g, sparc_budget(np.shape(g), r_max=rank),
                                                n_iter=n_iter), scale=scale, gamma=gamma)
                for p, g in grads.items()}
    squares = _linear_grads(mean_square) if method == "rosa" else {}
    out = {}
    for path, g in grads.items():
        shape = np.shape(g)
        if method == "lora":
            out[path] = lora_init(*shape, rank, keys[path], scale=scale)
        elif method == "lora-one":
            out[path] = lora_one_init(g, rank, scale=scale, gamma=gamma)
        else:
            r_lr, nnz = rosa_split(shape, rank, rosa_rank_fraction)
            out[path] = rosa_init(squares[path], r_lr, nnz, keys[path], scale=scale)
    return out
