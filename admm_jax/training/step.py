"""One jitted training step: the gradient of a pluggable loss w.r.t. a trainable subset of params.

Params are the pure-dict pytree of a Flax NNX model (:func:`admm_jax.models.llama.init_params`).
A *trainable* spec picks the leaves the optimizer sees; every other leaf is frozen::

    θ = θ_T ∪ θ_F                         (split_params by trainable_mask)
    ℓ, g = value_and_grad_{θ_T} loss(graphdef, θ_T ∪ θ_F, batch)
    u, s = tx.update(g, s, θ_T);   θ_T ← θ_T + u

with the optimizer state ``s = tx.init(θ_T)``: frozen weights get no gradient, no update and no
optimizer state (a LoRA or sparse adapter on a frozen base pays optimizer memory for the adapter
only). The loss is any ``loss_fn(graphdef, params, batch)`` returning a scalar, or
``(scalar, {name: metric})`` with ``has_aux=True``. A consensus optimizer that keeps one copy of
the weights per client (params with a leading client axis, batches ``[clients, B, T+1]``) plugs
in the loss of :func:`admm_jax.training.lm.per_client_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
from flax import nnx
from flax.nnx import filterlib

from admm_jax.core.tree import Selection, select
from admm_jax.training.lm import next_token_loss

Params = dict
LossFn = Callable[[nnx.GraphDef, Params, Any], Any]
#: ``None`` (every leaf), a regex on leaf paths, a bool pytree, a callable ``params -> bool
#: pytree`` (see :func:`admm_jax.core.tree.select`), or an NNX filter on the model's Variable
#: types: a ``nnx.Variable`` subclass such as ``nnx.LoRAParam``, a tuple of them, or a
#: ``flax.nnx.filterlib`` filter (``nnx.All``, ``nnx.Not``, ``nnx.PathContains`` ...).
Trainable = Any

_NNX_FILTERS = (filterlib.OfType, filterlib.Any, filterlib.All, filterlib.Not,
                filterlib.PathContains, filterlib.PathIn, filterlib.WithTag,
                filterlib.Everything, filterlib.Nothing)


def _is_nnx_filter(spec: Any) -> bool:
    if isinstance(spec, type):
        return issubclass(spec, nnx.Variable)
    if isinstance(spec, tuple) and spec:
        return all(_is_nnx_filter(s) for s in spec)
    return isinstance(spec, _NNX_FILTERS)


def _variable_mask(graphdef: nnx.GraphDef, params: Params, spec: Any) -> Selection:
    """Select the leaves whose NNX Variable (recorded in ``graphdef``) matches the filter."""
    predicate = filterlib.to_predicate(spec)
    flat = nnx.to_flat_state(nnx.state(nnx.merge(graphdef, params)))
    chosen = {tuple(path) for path, variable in flat if predicate(path, variable)}
    return jax.tree_util.tree_map_with_path(
        lambda path, _: tuple(k.key for k in path) in chosen, params)


def trainable_mask(graphdef: nnx.GraphDef, params: Params, trainable: Trainable = None
                   ) -> Selection:
    """The bool pytree over ``params`` of the leaves ``trainable`` selects (see :data:`Trainable`).

    Raises:
        TypeError: if ``params`` is not a dict.
        ValueError: if the selection does not match the structure of ``params`` or is empty.
    """
    if not isinstance(params, dict):
        raise TypeError(f"params must be a pure dict pytree, got {type(params).__name__}")
    if trainable is None:
        mask = jax.tree_util.tree_map(lambda _: True, params)
    elif _is_nnx_filter(trainable):
        mask = _variable_mask(graphdef, params, trainable)
    else:
        mask = select(params, trainable)
    if jax.tree_util.tree_structure(mask) != jax.tree_util.tree_structure(params):
        raise ValueError("trainable selection must have the structure of params")
    if not any(bool(m) for m in jax.tree_util.tree_leaves(mask)):
        raise ValueError(f"trainable {trainable!r} selects no parameter")
    return mask


def _split(tree, mask) -> tuple[Any, Any]:
    if not isinstance(tree, dict):
        return (tree, None) if bool(mask) else (None, tree)
    pairs = {k: _split(v, mask[k]) for k, v in tree.items()}
    kept = {k: a for k, (a, _) in pairs.items() if a is not None}
    rest = {k: b for k, (_, b) in pairs.items() if b is not None}
    return kept or None, rest or None


def split_params(params: Params, mask: Selection) -> tuple[Params, Params]:
    """``(trainable, frozen)``: two disjoint nested dicts holding the leaves where ``mask`` is
    True, resp. False (empty sub-dicts dropped), like ``nnx.split(state, filter, ...)``."""
    kept, rest = _split(params, mask)
    return kept or {}, rest or {}


def merge_params(trainable: Params, frozen: Params) -> Params:
    """Inverse of :func:`split_params`: the union of two disjoint nested dicts."""
    out = dict(trainable)
    for key, value in frozen.items():
        out[key] = merge_params(out[key], value) if key in out else value
    return out


class TrainStep(NamedTuple):
    """A train step and the optimizer init that matches it (optax-style ``init``/``update``).

    Attributes:
        init: ``params -> opt_state``: ``tx.init`` on the trainable subset only.
        step: ``(params, opt_state, batch) -> (params, opt_state, metrics)``, jitted, donating
            ``params`` and ``opt_state``. ``metrics`` holds ``loss``, ``grad_norm`` (of the
            trainable gradient) and the loss's aux metrics.
    """

    init: Callable[[Params], Any]
    step: Callable[[Params, Any, Any], tuple[Params, Any, dict]]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *,
                    loss_fn: LossFn = next_token_loss, has_aux: bool = False,
                    trainable: Trainable = None) -> TrainStep:
    """Build the train step of ``tx`` on ``loss_fn`` over the ``trainable`` params.

    Args:
        graphdef: static graph of the NNX model the params belong to.
        tx: any optax transformation; it sees the trainable subset only (its masks and
            path regexes apply to that subset, whose paths are those of the full params).
        loss_fn: ``(graphdef, params, batch) -> scalar`` (or ``(scalar, aux dict)`` with
            ``has_aux``); default: mean next-token cross-entropy of ``batch: int[B, T+1]``.
        has_aux: whether ``loss_fn`` also returns a dict of metrics (logged with the loss).
        trainable: which leaves are trained (:data:`Trainable`; default all). The rest are
            frozen: passed through bit-identically, with no gradient and no optimizer state.

    Returns:
        a :class:`TrainStep` ``(init, step)``.
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be a bool, got {has_aux!r}")

    def partition(params: Params) -> tuple[Params, Params]:
        return split_params(params, trainable_mask(graphdef, params, trainable))

    def init(params: Params):
        return tx.init(partition(params)[0])

    def step(params: Params, opt_state, batch):
        train_params, frozen = partition(params)

        def objective(p):
            out = loss_fn(graphdef, merge_params(p, frozen), batch)
            return out if has_aux else (out, {})

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(train_params)
        updates, opt_state = tx.update(grads, opt_state, train_params)
        train_params = optax.apply_updates(train_params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return merge_params(train_params, frozen), opt_state, metrics

    return TrainStep(init, jax.jit(step, donate_argnums=(0, 1)))
