"""ELSA: surrogate-free ADMM pruning as an ADMM split (per-tensor and N:M sparsity).

The constraint set is ``C = {Z : ‖Z‖₀ ≤ k}`` per tensor (or an N:M pattern along the input
dimension); its prox is the hard projection that keeps the k entries with the largest score —
``v²``, or ``h·v²`` with the transform's EMA of squared gradients ``h`` (a diagonal Hessian
estimate, ELSA's objective-aware projection). :func:`elsa` is :func:`admm_jax.admm.admm` with this
split; :func:`finalize` applies the final hard projection and returns the masks.

λ schedules (constant, linear, cosine, exponential) are :func:`admm_jax.admm.rho_ramp` passed
as ``rho_schedule``; :func:`masked_updates` keeps the final mask fixed during fine-tuning.

Not yet here (see the ELSA issue): global sparsity across tensors in the transform (the
projection exists: :func:`admm_jax.projection.global_topk_masks`), low-precision (bf16/fp8)
storage of Z and U, and the one-shot baselines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admm_jax.admm import Split, admm, block_states, find_admm_states
from admm_jax.projection import keep_count, nm_mask, scores_of, topk_mask
from admm_jax.tree import SelectionSpec, path_str

Array = jax.Array


class SparsityState(NamedTuple):
    mask: Array  # bool, entries kept by the last projection
    flip_rate: Array  # fraction of mask entries that changed at the last projection


def _parse_structure(structure: str) -> tuple[int, int] | None:
    if structure == "unstructured":
        return None
    try:
        n, m = (int(p) for p in structure.split(":"))
    except ValueError:
        raise ValueError(f"structure must be 'unstructured' or 'N:M' (e.g. '2:4'), got "
                         f"{structure!r}") from None
    if not 0 < n < m:
        raise ValueError(f"structure {structure!r} needs 0 < N < M")
    return n, m


def sparsity_metrics(state: SparsityState) -> dict[str, Array]:
    """Per-block ELSA metrics: mask flip rate at the last projection and achieved sparsity."""
    return {"flip_rate": state.flip_rate,
            "sparsity": 1.0 - jnp.mean(state.mask, dtype=jnp.float32)}


def make_projection(sparsity: float, structure: str = "unstructured",
                    weighted: bool = True) -> Callable[[Array, Array | None], Array]:
    """``(v, curvature) -> bool mask``: the k largest scores per tensor, or an N:M pattern."""
    nm = _parse_structure(structure)
    if nm is None and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")

    def project(v: Array, curvature: Array | None) -> Array:
        score = scores_of(v, curvature if weighted else None)
        if nm is not None:
            return nm_mask(score, *nm)
        return topk_mask(score, keep_count(v.size, sparsity))

    return project


def sparsity_split(sparsity: float, structure: str = "unstructured",
                   weighted: bool = True) -> Split:
    """Hard projection onto ``‖Z‖₀ ≤ (1 − sparsity)·size`` per tensor, or onto an N:M pattern.

    Args:
        sparsity: fraction of zeros in ``[0, 1)`` (ignored for N:M, which fixes ``1 − N/M``).
        structure: ``"unstructured"`` or ``"N:M"`` (``"2:4"``, ``"4:8"``) along axis 0.
        weighted: score entries by ``h·v²`` when the transform keeps a curvature EMA.
    """
    project = make_projection(sparsity, structure, weighted)

    def init(x):
        mask = project(x, None)
        return x * mask, SparsityState(mask=mask, flip_rate=jnp.zeros((), jnp.float32))

    def prox(v, state: SparsityState, rho, curvature):
        del rho
        mask = project(v, curvature)
        flips = jnp.mean(mask != state.mask, dtype=jnp.float32)
        return v * mask, SparsityState(mask=mask, flip_rate=flips)

    return Split(init=init, prox=prox, metrics=sparsity_metrics)


def elsa(sparsity: float, rho: float | Any = 1e-3, *, structure: str = "unstructured",
         interval: int = 32, weighted: bool = True, curvature_decay: float = 0.999,
         mask: SelectionSpec = None, **admm_kwargs) -> optax.GradientTransformationExtraArgs:
    """ELSA as an optax transform (place it after clipping, before Adam)::

        tx = optax.chain(optax.clip_by_global_norm(1.0), elsa(0.9, rho=1e-3), optax.adam(1e-4))

    Args:
        sparsity: target fraction of zeros per constrained tensor, in ``[0, 1)``.
        rho: λ of the proximal term ``λ(w − z + u)`` (float or per-block function).
        structure: ``"unstructured"``, ``"2:4"``, ``"4:8"``, ...
        interval: steps between projections (≥ 1).
        weighted: objective-aware projection by ``h·v²`` (``h`` = EMA of squared gradients with
            ``curvature_decay``, like Adam's second moment).
        mask: constrained leaves (default: decoder kernels and the embedding).
        **admm_kwargs: forwarded to :func:`admm_jax.admm.admm` (``rho_schedule``,
            ``residual_balancing``, ...).
    """
    split = sparsity_split(sparsity, structure, weighted)
    return admm(split, rho, interval=interval, mask=mask,
                curvature_decay=curvature_decay if weighted else None, **admm_kwargs)


def finalize(params, opt_state, sparsity: float, structure: str = "unstructured",
             weighted: bool = True) -> tuple[Any, dict[str, Array]]:
    """Final hard projection of the current weights (same rule as the split, scores ``h·v²``
    from the transform's curvature when ``weighted``): params with exactly the target sparsity
    in every constrained block, and ``{path: mask}`` for fine-tuning with a fixed mask."""
    project = make_projection(sparsity, structure, weighted)
    (state,) = find_admm_states(opt_state)
    blocks = block_states(state)
    masks: dict[str, Array] = {}

    def apply(path, x):
        b = blocks.get(path_str(path))
        if b is None:
            return x
        masks[path_str(path)] = project(x, b.curvature)
        return x * masks[path_str(path)]

    return jax.tree_util.tree_map_with_path(apply, params), masks


def masked_updates(masks: dict[str, Array]) -> optax.GradientTransformation:
    """Keep a fixed sparsity pattern during fine-tuning: zero the updates of pruned entries.

    Put it last in the chain (after the base optimizer, so weight decay cannot revive pruned
    entries either)::

        final, masks = finalize(params, opt_state, 0.9)
        tx = optax.chain(optax.adamw(1e-4), masked_updates(masks))
    """

    def update_fn(updates, state, params=None):
        del params

        def apply(path, u):
            mask = masks.get(path_str(path))
            return u if mask is None else u * mask

        return jax.tree_util.tree_map_with_path(apply, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
