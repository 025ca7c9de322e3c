"""ELSA: surrogate-free ADMM pruning as an ADMM split.

The constraint set is ``C = {Z : ‖Z‖₀ ≤ k}`` — per tensor, globally over all constrained tensors,
or an N:M pattern along the input dimension. Its prox is the hard projection that keeps the
entries with the largest *score*: ``v²``, or ``h·v²`` with the transform's EMA of squared
gradients ``h`` (a diagonal Hessian estimate; ELSA's objective-aware projection). :func:`elsa`
is :func:`admm_jax.core.admm.admm` with this split; :func:`finalize` applies the final hard
projection and returns the masks; :func:`masked_updates` keeps them fixed during fine-tuning.

* λ schedules (constant, linear, cosine, exponential): :func:`admm_jax.core.admm.rho_ramp` passed as
  ``rho_schedule``; residual balancing: ``residual_balancing=(1.5, 2.0)`` (ELSA's μ, τ).
* ELSA-L: ``state_dtype="bf16" | "e4m3" | "e5m2"`` stores Z and U in low precision with
  per-tensor or per-row fp32 scales (:mod:`admm_jax.core.storage`); memory is measured from the
  state by :func:`admm_jax.core.admm.state_memory`.
* Global sparsity (``scope="global"``) keeps the k largest scores over all constrained tensors
  by a bisection threshold (:func:`admm_jax.ops.projection.global_topk_masks`); its Z is initialised
  with the per-tensor projection at the same sparsity and becomes global at the first stage 2.

Choices where the paper is silent: the Hessian estimate is kept by the transform (an EMA of the
raw squared gradient with Adam's β₂ = 0.999 by default) rather than read from the chained Adam
state, so ELSA composes with any base optimizer; Z starts at the projection of the initial
weights and U at 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admm_jax.core.admm import Split, admm, block_states, find_admm_states
from admm_jax.core.storage import StateStorage
from admm_jax.core.tree import SelectionSpec, path_str
from admm_jax.ops.projection import (
    global_topk_masks,
    keep_count,
    nm_mask,
    parse_structure,
    scores_of,
    topk_mask,
)

Array = jax.Array
Projection = Callable[[list[Array], list[Array | None]], list[Array]]


class SparsityState(NamedTuple):
    mask: Array  # bool, entries kept by the last projection
    flip_rate: Array  # fraction of mask entries that changed at the last projection


def _pair_scores(pair: tuple[Array, Array | None]) -> Array:
    """``scores_of(v, h)`` of a ``(v, h)`` pair, recomputed inside the global bisection so the
    scores of the whole model are never stored."""
    return scores_of(*pair)


def sparsity_metrics(state: SparsityState) -> dict[str, Array]:
    """Per-block ELSA metrics: mask flip rate at the last projection and achieved sparsity."""
    return {"flip_rate": state.flip_rate,
            "sparsity": 1.0 - jnp.mean(state.mask, dtype=jnp.float32)}


def make_projection(sparsity: float, structure: str = "unstructured", scope: str = "tensor",
                    weighted: bool = True) -> Projection:
    """``(vs, curvatures) -> masks`` over a list of blocks.

    ``scope="tensor"``: the ``keep_count(size, sparsity)`` largest scores of every tensor, or an
    N:M pattern per tensor; ``scope="global"``: the ``keep_count(Σ size, sparsity)`` largest
    scores over all tensors together (unstructured only). Scores are ``h·v²`` when ``weighted``
    and a curvature is given, else ``v²``.
    """
    nm = parse_structure(structure)
    if scope not in ("tensor", "global"):
        raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
    if nm is not None and scope == "global":
        raise ValueError(f"N:M structure {structure!r} is per group of M inputs; use "
                         "scope='tensor'")
    if nm is None and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")

    def project(vs: list[Array], curvatures: list[Array | None]) -> list[Array]:
        pairs = [(v, h if weighted else None) for v, h in zip(vs, curvatures)]
        if scope == "global":
            k = keep_count(sum(v.size for v in vs), sparsity)
            return global_topk_masks(pairs, k, score_fn=_pair_scores)
        scores = [_pair_scores(p) for p in pairs]
        if nm is not None:
            return [nm_mask(s, *nm) for s in scores]
        return [topk_mask(s, keep_count(s.size, sparsity)) for s in scores]

    return project


def sparsity_split(sparsity: float, structure: str = "unstructured", scope: str = "tensor",
                   weighted: bool = True) -> Split:
    """Hard projection onto ``‖Z‖₀ ≤ k`` (per tensor or global) or onto an N:M pattern.

    Args:
        sparsity: fraction of zeros in ``[0, 1)`` (ignored for N:M, which fixes ``1 − N/M``).
        structure: ``"unstructured"`` or ``"N:M"`` (``"2:4"``, ``"4:8"``) along axis 0.
        scope: ``"tensor"`` (every tensor at ``sparsity``) or ``"global"`` (one budget).
        weighted: score entries by ``h·v²`` when the transform keeps a curvature EMA.
    """
    project = make_projection(sparsity, structure, scope, weighted)
    per_tensor = make_projection(sparsity, structure, "tensor", weighted)

    def init(x):
        (mask,) = per_tensor([x], [None])
        return x * mask, SparsityState(mask=mask, flip_rate=jnp.zeros((), jnp.float32))

    def joint_prox(vs, states, rhos, curvatures):
        del rhos
        masks = project(vs, curvatures)
        new_states = [SparsityState(mask=m, flip_rate=jnp.mean(m != s.mask, dtype=jnp.float32))
                      for m, s in zip(masks, states)]
        return [v * m for v, m in zip(vs, masks)], new_states

    def prox(v, state, rho, curvature):
        (z,), (state,) = joint_prox([v], [state], [rho], [curvature])
        return z, state

    return Split(init=init, prox=prox, metrics=sparsity_metrics,
                 joint_prox=joint_prox if scope == "global" else None)


def elsa(sparsity: float, rho: float | Any = 1e-3, *, structure: str = "unstructured",
         scope: str = "tensor", interval: int = 32, weighted: bool = True,
         curvature_decay: float = 0.999, state_dtype: str = "float32",
         state_scaling: str | None = None, mask: SelectionSpec = None,
         **admm_kwargs) -> optax.GradientTransformationExtraArgs:
    """ELSA as an optax transform (place it after clipping, before Adam)::

        tx = optax.chain(optax.clip_by_global_norm(1.0), elsa(0.9, rho=1e-3), optax.adam(1e-4))

    Args:
        sparsity: target fraction of zeros, in ``[0, 1)``.
        rho: λ of the proximal term ``λ(w − z + u)`` (float or per-block function).
        structure: ``"unstructured"``, ``"2:4"``, ``"4:8"``, ...
        scope: ``"tensor"`` or ``"global"`` (one top-k over all constrained tensors).
        interval: steps between projections (≥ 1).
        weighted: objective-aware projection by ``h·v²`` (``h`` = EMA of squared gradients with
            ``curvature_decay``, like Adam's second moment).
        state_dtype: ELSA-L storage of Z and U: ``"float32"``, ``"bf16"``, ``"e4m3"``, ``"e5m2"``.
        state_scaling: ``"tensor"``, ``"row"`` or ``"none"`` (default: tensor for fp8, none for
            bf16), see :class:`admm_jax.core.storage.StateStorage`.
        mask: constrained leaves (default: decoder kernels and the embedding).
        **admm_kwargs: forwarded to :func:`admm_jax.core.admm.admm` (``rho_schedule``,
            ``residual_balancing``, ...).
    """
    split = sparsity_split(sparsity, structure, scope, weighted)
    return admm(split, rho, interval=interval, mask=mask,
                curvature_decay=curvature_decay if weighted else None,
                state_storage=StateStorage(state_dtype, state_scaling), **admm_kwargs)


def finalize(params, opt_state, sparsity: float, structure: str = "unstructured",
             scope: str = "tensor", weighted: bool = True) -> tuple[Any, dict[str, Array]]:
    """Final hard projection of the current weights (same rule as the split, scores ``h·v²``
    from the transform's curvature when ``weighted``): params with exactly the target sparsity
    (per constrained block, or in total for ``scope="global"``), and ``{path: mask}`` for
    fine-tuning with a fixed mask (:func:`masked_updates`)."""
    project = make_projection(sparsity, structure, scope, weighted)
    (state,) = find_admm_states(opt_state)
    blocks = block_states(state)
    flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    paths = [p for p in blocks if p in flat]
    if len(paths) != len(blocks):
        raise ValueError(f"params lack constrained blocks {sorted(set(blocks) - set(paths))}")
    masks = dict(zip(paths, project([flat[p] for p in paths],
                                    [blocks[p].curvature for p in paths])))

    def apply(path, x):
        m = masks.get(path_str(path))
        return x if m is None else x * m

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
