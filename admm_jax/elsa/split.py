"""ELSA: surrogate-free ADMM pruning as an ADMM split.

The constraint set is ``C = {Z : ‖Z‖₀ ≤ k}`` — per tensor, globally over all constrained tensors,
an N:M pattern along the input dimension, whole channels or whole ``b × b`` tiles. Its prox is
the hard projection that keeps the entries (or tiles) with the largest *score*: ``v²``, or
``h·v²`` (ELSA's objective-aware projection) with ``h`` the transform's EMA of the squared raw
gradient ``∇f(W)`` (a diagonal Hessian estimate; see :mod:`admm_jax.core.admm`), summed per tile
for block structures. :func:`elsa` is :func:`admm_jax.core.admm.admm` with this split;
:func:`admm_jax.elsa.finalize.finalize` applies the final hard projection and returns the masks;
:func:`admm_jax.elsa.finalize.masked_updates` keeps them fixed during fine-tuning. Structures
are the values of :mod:`admm_jax.ops.structures` (or their strings): unstructured, N:M, channel
(per tensor only) and block (``"block16"``: per tensor or global).

* λ schedules (constant, linear, cosine, exponential): :func:`admm_jax.core.schedules.rho_ramp`
  passed as ``rho_schedule``; residual balancing: ``residual_balancing=(1.5, 2.0)`` (ELSA's μ, τ).
* ELSA-L: ``state_dtype="bf16" | "e4m3" | "e5m2"`` stores Z and U in low precision with
  per-tensor or per-row fp32 scales (:mod:`admm_jax.core.storage`); memory is measured from the
  state by :func:`admm_jax.core.state.state_memory`.
* Under ``optax.inject_hyperparams`` only ``rho`` and ``decoupled_lr`` may be injected; pass
  ``sparsity``, ``interval`` and ``curvature_decay`` (and any callable ``rho`` or
  ``rho_schedule``) as ``static_args``.
* Global sparsity (``scope="global"``) keeps the k largest scores over all constrained tensors
  by a bisection threshold (:func:`admm_jax.ops.projection.global_topk_masks`); its Z is initialised
  with the per-tensor projection at the same sparsity and becomes global at the first stage 2.
  With a :class:`~admm_jax.ops.structures.Block` structure the same bisection runs over the tile
  scores (``h·v²`` summed per ``b × b`` tile) of all tensors: one budget of ``keep_count(Σ tiles,
  sparsity)`` whole tiles. N:M and channel have no global form (their groups are per tensor).

Choices where the paper is silent: the Hessian estimate is kept by the transform (an EMA of the
raw squared gradient, decay Adam's β₂ = 0.999 by default) rather than read from the chained Adam
state, so ELSA composes with any base optimizer; unlike the official code's ``exp_avg_sq`` it
leaves out the proximal term λ(w − z + u), the constraint's own pull. For that the transform
must see gradients: first in the chain with ``coupling="gradient"``, wrapping the base optimizer
(``base=``) with ``coupling="decoupled"``; ``weighted=True`` with ``coupling="decoupled"`` and no
``base`` is refused. Z starts at the projection of the initial weights and U at 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from admm_jax._checks import check_choice, check_real
from admm_jax.core.admm import Coupling, RhoScaling, RhoSpec, admm
from admm_jax.core.schedules import Schedule
from admm_jax.core.split import Split
from admm_jax.core.storage import StateStorage
from admm_jax.core.tree import SelectionSpec
from admm_jax.ops.projection import global_topk_masks, keep_count, scores_of
from admm_jax.ops.structures import (
    Block,
    StructureSpec,
    Unstructured,
    effective_sparsity,
    expand_tiles,
    parse_structure,
    structure_mask,
    tile_scores,
)

Array = jax.Array
Projection = Callable[[list[Array], list[Array | None]], list[Array]]
Scope = Literal["tensor", "global"]
StateScaling = Literal["none", "tensor", "row"]


class SparsityState(NamedTuple):
    mask: Array  # bool, entries kept by the last projection
    flip_rate: Array  # fraction of mask entries that changed at the last projection


def _pair_scores(pair: tuple[Array, Array | None]) -> Array:
    """``scores_of(v, h)`` of a ``(v, h)`` pair, recomputed inside the global bisection so the
    scores of the whole model are never stored."""
    return scores_of(*pair)


def sparsity_metrics(state: SparsityState) -> dict[str, Array]:
    """Per-block ELSA metrics (the split's ``metrics``): mask flip rate at the last projection
    and achieved sparsity."""
    return {"flip_rate": state.flip_rate,
            "sparsity": 1.0 - jnp.mean(state.mask, dtype=jnp.float32)}


def _global_tile_masks(pairs: list[tuple[Array, Array | None]], block: Block,
                       sparsity: float) -> list[Array]:
    """Masks keeping the ``keep_count(Σ tiles, sparsity)`` tiles with the largest summed score
    over all tensors (ties: list order, then row-major tile order): the global bisection of
    :func:`~admm_jax.ops.projection.global_topk_masks` on the tile scores, which are ``b²``
    times smaller than the tensors and so stored."""
    tiles = [tile_scores(_pair_scores(p), block.size) for p in pairs]
    keeps = global_topk_masks(tiles, keep_count(sum(t.size for t in tiles), sparsity))
    return [expand_tiles(keep, block.size, v.shape) for keep, (v, _) in zip(keeps, pairs)]


def make_projection(sparsity: float, structure: StructureSpec = "unstructured",
                    scope: Scope = "tensor", weighted: bool = True) -> Projection:
    """``(vs, curvatures) -> masks`` over a list of blocks.

    ``scope="tensor"``: every tensor alone under ``structure``
    (:func:`admm_jax.ops.structures.structure_mask`: the ``keep_count(size, sparsity)`` largest
    scores, an N:M pattern, whole channels, or the ``keep_count(tiles, sparsity)`` ``b × b``
    tiles with the largest summed score); ``scope="global"``: the ``keep_count(Σ size,
    sparsity)`` largest scores over all tensors together, or for a block structure the
    ``keep_count(Σ tiles, sparsity)`` largest tile scores (N:M and channel are per tensor
    only). Scores are ``h·v²`` when ``weighted`` and a curvature is given, else ``v²``.
    """
    structure = parse_structure(structure)
    check_choice("scope", scope, get_args(Scope))
    if scope == "global" and not isinstance(structure, (Unstructured, Block)):
        raise ValueError(f"structure {structure} is a per-tensor pattern (N:M groups or whole "
                         "channels); use scope='tensor'")
    target = effective_sparsity(structure, sparsity)

    def project(vs: list[Array], curvatures: list[Array | None]) -> list[Array]:
        pairs = [(v, h if weighted else None) for v, h in zip(vs, curvatures)]
        if scope == "global" and isinstance(structure, Block):
            return _global_tile_masks(pairs, structure, target)
        if scope == "global":
            k = keep_count(sum(v.size for v in vs), target)
            return global_topk_masks(pairs, k, score_fn=_pair_scores)
        return [structure_mask(_pair_scores(p), structure, target) for p in pairs]

    return project


def sparsity_split(sparsity: float, structure: StructureSpec = "unstructured",
                   scope: Scope = "tensor", weighted: bool = True, *,
                   curvature_decay: float = 0.999) -> Split:
    """Hard projection onto ``‖Z‖₀ ≤ k`` (per tensor or global), an N:M pattern, channels or
    ``b × b`` tiles.

    Args:
        sparsity: fraction of zeros in ``[0, 1)`` (ignored for N:M, which fixes ``1 − N/M``; a
            fraction of tiles for block).
        structure: ``"unstructured"``, ``"N:M"`` (``"2:4"``, ``"4:8"``) along axis 0,
            ``"channel"`` (whole output units, per tensor), ``"blockB"`` (``"block16"``: whole
            ``B × B`` tiles, partial edge tiles included), or an
            :mod:`admm_jax.ops.structures` value.
        scope: ``"tensor"`` (every tensor at ``sparsity``) or ``"global"`` (one budget, of
            entries or, for block, of tiles).
        weighted: score entries by ``h·v²``, with ``h`` the transform's EMA of the squared raw
            gradients.
        curvature_decay: decay in ``[0, 1)`` of that EMA (used only when ``weighted``).

    Returns:
        The split; its prox projects all blocks at once, its metrics are
        :func:`sparsity_metrics`.
    """
    project = make_projection(sparsity, structure, scope, weighted)
    per_tensor = make_projection(sparsity, structure, "tensor", weighted)
    if weighted:
        check_real("curvature_decay", curvature_decay, low=0.0, high=1.0, high_open=True)

    def init(x):
        (mask,) = per_tensor([x], [None])
        return x * mask, SparsityState(mask=mask, flip_rate=jnp.zeros((), jnp.float32))

    def prox(vs, states, contexts):
        masks = project(vs, [c.curvature for c in contexts])
        new_states = [SparsityState(mask=m, flip_rate=jnp.mean(m != s.mask, dtype=jnp.float32))
                      for m, s in zip(masks, states)]
        return [v * m for v, m in zip(vs, masks)], new_states

    return Split(init=init, prox=prox, metrics=sparsity_metrics,
                 curvature_decay=curvature_decay if weighted else None)


def elsa(sparsity: float, rho: RhoSpec = 1e-3, *, structure: StructureSpec = "unstructured",
         scope: Scope = "tensor", interval: int = 32, weighted: bool = True,
         curvature_decay: float = 0.999, state_dtype: str = "float32",
         state_scaling: StateScaling | None = None, mask: SelectionSpec = None,
         rho_scaling: RhoScaling = "none", n_layers: int | None = None,
         rho_schedule: Schedule | None = None,
         residual_balancing: tuple[float, float] | None = None,
         coupling: Coupling = "gradient", decoupled_lr: float | optax.Schedule = 1.0,
         halt_on_nonfinite: bool = False,
         base: optax.GradientTransformation | None = None) -> optax.GradientTransformationExtraArgs:
    """ELSA as an optax transform. Gradient coupling (the paper's proximal term added to the
    gradient): place it after clipping, before Adam::

        tx = optax.chain(optax.clip_by_global_norm(1.0), elsa(0.9, rho=1e-3), optax.adam(1e-4))

    Decoupled coupling (the pull ``η_t λ(w − z + u)`` bypasses Adam): it wraps the base
    optimizer, so that its curvature EMA sees the raw gradients::

        tx = optax.chain(optax.clip_by_global_norm(1.0),
                         elsa(0.9, rho=1e-2, coupling="decoupled", base=optax.adamw(1e-4)))

    Args:
        sparsity: target fraction of zeros, in ``[0, 1)``.
        rho: λ of the proximal term ``λ(w − z + u)`` (float or per-block function).
        structure: ``"unstructured"``, ``"2:4"``, ``"4:8"``, ``"channel"``, ``"block16"``, ...
            (see :func:`sparsity_split`).
        scope: ``"tensor"`` or ``"global"`` (one top-k over all constrained tensors).
        interval: steps between projections (≥ 1).
        weighted: objective-aware projection by ``h·v²``, with ``h ← d·h + (1 − d)·g²`` the EMA
            (decay ``d = curvature_decay``, like Adam's ν) of the squared raw gradient
            ``g = ∇f(W)``, before the proximal term. Needs ``base`` when decoupled.
        curvature_decay: the EMA's decay in ``[0, 1)``.
        state_dtype: ELSA-L storage of Z and U: ``"float32"``, ``"bf16"``, ``"e4m3"``, ``"e5m2"``.
        state_scaling: ``"tensor"``, ``"row"`` or ``"none"`` (default: tensor for fp8, none for
            bf16), see :class:`admm_jax.core.storage.StateStorage`.
        mask: constrained leaves (default: decoder kernels and the embedding).
        rho_scaling, n_layers, rho_schedule, residual_balancing, coupling, decoupled_lr,
            halt_on_nonfinite: see :func:`admm_jax.core.admm.admm` (ELSA's λ schedules are
            ``rho_schedule=rho_ramp(...)``, its residual balancing ``(1.5, 2.0)``).
        base: with ``coupling="decoupled"``, the base optimizer the transform wraps (required
            when ``weighted``); see :func:`admm_jax.core.admm.admm`.

    Raises:
        ValueError: a bad argument, or ``weighted`` with ``coupling="decoupled"`` and no
            ``base`` (the curvature EMA would see Adam's steps, not gradients).
    """
    split = sparsity_split(sparsity, structure, scope, weighted, curvature_decay=curvature_decay)
    return admm(split, rho, interval=interval, mask=mask, rho_scaling=rho_scaling,
                n_layers=n_layers, rho_schedule=rho_schedule,
                residual_balancing=residual_balancing, coupling=coupling,
                decoupled_lr=decoupled_lr, state_storage=StateStorage(state_dtype, state_scaling),
                halt_on_nonfinite=halt_on_nonfinite, base=base)
