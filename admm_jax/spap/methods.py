"""The structured GLU pruners as one-shot methods of :func:`admm_jax.pruning.prune`.

Importing this module registers, with the ``"channel"`` structure (whole intermediate neurons:
gate/up columns and down rows)::

    "spap"          SPAP (admm_jax.spap.spap)           options: SPAP_DEFAULTS
    "mag-neuron"    column-magnitude baseline           options: refit, ridge
    "flap"          FLAP fluctuation + compensation     options: refit, ridge
    "wanda-neuron"  Wanda-sp, |W|·‖X‖ per neuron        options: refit, ridge

e.g. ``prune(config, params, calibration, method="spap", structure="channel", sparsity=0.3)``.
Every block keeps ``keep_count(n, sparsity)`` neurons of its MLP (at least one); blocks are
pruned in order from the inputs of the already-pruned earlier blocks (``capture_blocks``).
The masks are the ``[in, out]`` keep masks of ``mlp/gate_proj`` and ``mlp/up_proj`` (whole
columns) and ``mlp/down_proj`` (whole rows); attention is not pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from admm_jax._checks import check_real
from admm_jax.models.llama import LlamaConfig
from admm_jax.ops.projection import keep_count
from admm_jax.ops.structures import Channel, Structure
from admm_jax.pruning import CapturedBlock, register_pruner
from admm_jax.spap.baselines import baseline_prune_mlp, neuron_scores
from admm_jax.spap.lsq import RIDGE, check_glu, glu_stats
from admm_jax.spap.spap import (
    SPAP_DEFAULTS,
    PrunedMLP,
    check_spap_options,
    composite_score,
    spap_prune_mlp,
)

Array = jax.Array


class GLUMethod(NamedTuple):
    """A structured GLU pruner.

    Attributes:
        prune: ``(block, n_keep, **options) -> PrunedMLP`` for one captured block.
        score: ``(block, **options) -> [n]`` neuron importances of the unpruned block, higher is
            more important (used to allocate widths across layers, :mod:`admm_jax.spap.allocation`).
        defaults: its options and their defaults.
        check: eager check of the options.
    """

    prune: Callable[..., PrunedMLP]
    score: Callable[..., Array]
    defaults: Mapping[str, Any]
    check: Callable[..., None]


def _where(block: CapturedBlock) -> str:
    return f"layer {block.index} MLP"


def _mlp_rows(block: CapturedBlock) -> Array:
    x = block.activations().mlp_in
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def _spap(block: CapturedBlock, n_keep: int, **options) -> PrunedMLP:
    return spap_prune_mlp(block.params["mlp"], _mlp_rows(block), n_keep, gram=block.stats.gram,
                          where=_where(block), **options)


def _spap_score(block: CapturedBlock, *, balance: float, **_) -> Array:
    """``c_i = ‖W_i‖^{2t} ‖H_i‖^{2(1−t)}``: the composite score on the dense weights."""
    w = block.params["mlp"]["down_proj"]["kernel"]
    return jnp.exp(composite_score(w, jnp.diagonal(block.stats.gram), balance))


def _check_baseline(*, refit: Any, ridge: Any) -> None:
    if not isinstance(refit, bool):
        raise TypeError(f"refit must be a bool, got {refit!r}")
    check_real("ridge", ridge, low=0.0, low_open=True)


def _baseline(score: str) -> GLUMethod:
    def prune_mlp(block: CapturedBlock, n_keep: int, **options) -> PrunedMLP:
        return baseline_prune_mlp(block.params["mlp"], block.stats, block.n_tokens, n_keep,
                                  score=score, where=_where(block), **options)

    def scores(block: CapturedBlock, **_) -> Array:
        return neuron_scores(score, block.params["mlp"]["down_proj"]["kernel"], block.stats,
                             block.n_tokens)

    return GLUMethod(prune_mlp, scores, {"refit": False, "ridge": RIDGE}, _check_baseline)


#: The structured GLU methods, by registered name.
GLU_METHODS: Mapping[str, GLUMethod] = {
    "spap": GLUMethod(_spap, _spap_score, SPAP_DEFAULTS, check_spap_options),
    "mag-neuron": _baseline("magnitude"),
    "flap": _baseline("flap"),
    "wanda-neuron": _baseline("wanda"),
}


def glu_masks(keep: Array, dim: int) -> dict[str, Array]:
    """The ``[in, out]`` keep masks of a block's GLU kernels from the neuron mask ``keep: [n]``."""
    n = keep.shape[0]
    column = jnp.broadcast_to(keep[None, :], (dim, n))
    return {"mlp/gate_proj": column, "mlp/up_proj": column,
            "mlp/down_proj": jnp.broadcast_to(keep[:, None], (n, dim))}


def prune_glu_block(block: CapturedBlock, n_keep: int, method: str,
                    **options: Any) -> tuple[dict, dict[str, Array]]:
    """Prune block ``block.index``'s GLU MLP to ``n_keep`` neurons with ``GLU_METHODS[method]``.

    Returns:
        ``(block params, {"mlp/gate_proj": mask, ...})`` in the registry's hook contract.
    """
    dim, _ = check_glu(block.params.get("mlp"), _where(block))
    result = GLU_METHODS[method].prune(block, n_keep, **options)
    mlp = {name: {"kernel": jnp.asarray(result.mlp[name]["kernel"], jnp.float32)}
           for name in result.mlp}
    return {**block.params, "mlp": mlp}, glu_masks(result.keep, dim)


def neurons_kept(n: int, sparsity: float) -> int:
    """Neurons a block of width ``n`` keeps at ``sparsity``: ``keep_count(n, sparsity)``, at
    least one."""
    return max(1, keep_count(n, sparsity))


def _hook(method: str) -> Callable[..., tuple[dict, dict[str, Array]]]:
    def prune_block(block: CapturedBlock, sparsity: float, structure: Structure,
                    **options: Any) -> tuple[dict, dict[str, Array]]:
        del structure  # always Channel
        n = block.config.block(block.index).mlp_dim
        return prune_glu_block(block, neurons_kept(n, sparsity), method, **options)

    prune_block.__doc__ = f"Block hook of {method!r}: prune_glu_block at keep_count(n, sparsity)."
    return prune_block


def _registry_check(method: str) -> Callable[..., None]:
    def check(config: LlamaConfig, structure: Structure, **options: Any) -> None:
        del config, structure
        GLU_METHODS[method].check(**options)

    return check


#: The :class:`~admm_jax.pruning.Pruner` records, by name.
REGISTERED = {name: register_pruner(name, _hook(name), stats=glu_stats, structures=(Channel,),
                                    defaults=method.defaults, check=_registry_check(name))
              for name, method in GLU_METHODS.items()}
