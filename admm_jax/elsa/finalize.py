"""After ELSA: the final hard projection (:func:`finalize`) and fine-tuning with the fixed mask
(:func:`masked_updates`)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from admm_jax.core.state import block_states
from admm_jax.core.tree import path_str
from admm_jax.elsa.split import Scope, make_projection
from admm_jax.ops.structures import StructureSpec

Array = jax.Array


def finalize(params: Any, opt_state: Any, sparsity: float,
             structure: StructureSpec = "unstructured", scope: Scope = "tensor",
             weighted: bool = True) -> tuple[Any, dict[str, Array]]:
    """Final hard projection of the current weights, by the split's rule.

    Args:
        params: the trained parameters.
        opt_state: an optimizer state holding the ELSA transform's state (its constrained blocks
            and, when ``weighted``, the curvature ``h`` (EMA of the squared raw gradients) that
            scores entries by ``h·v²``).
        sparsity, structure, scope, weighted: as for :func:`admm_jax.elsa.split.elsa`.

    Returns:
        ``(params, masks)``: params with exactly the target sparsity (per constrained block, or
        in total for ``scope="global"``; for a block structure, exactly the target fraction of
        whole tiles), and ``{path: bool mask}`` for fine-tuning with a fixed mask
        (:func:`masked_updates`).
    """
    project = make_projection(sparsity, structure, scope, weighted)
    blocks = block_states(opt_state)
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
