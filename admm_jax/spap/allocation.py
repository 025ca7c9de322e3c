"""Global (non-uniform across layers) structured GLU pruning: one budget of neurons for the
whole model, shared out by a global ranking of normalised neuron scores.

:func:`global_prune` runs two sequential passes over the calibration set:

1. the dense model: each block's neuron importances ``c_{l,i}`` from the method's own score
   (SPAP: the composite score; baselines: their score), normalised within the layer;
2. :func:`allocate_widths` keeps the ``keep_count(Σ_l n_l, sparsity)`` highest normalised scores
   of the model (every layer at least its best neuron), which fixes each layer's width ``k_l``;
   the method then prunes block by block to ``k_l`` neurons, each block seeing the already-pruned
   earlier ones — so the neurons are chosen by the method itself under sequential calibration,
   and only the widths come from the global ranking.

Raw scores are not comparable across layers (activation scales grow with depth), hence the
normalisation: ``"mean"`` divides by the layer's mean score, so a neuron is ranked by its share
of an average neuron of its layer and heavy-tailed layers (few dominant neurons) give up more;
``"zscore"`` standardises ``(c − mean) / std`` within the layer as FLAP's adaptive structure
search does (An et al., 2024, Sec. 3.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
from flax import nnx

from admm_jax._checks import check_choice, check_real
from admm_jax.models.llama import LlamaConfig
from admm_jax.ops.projection import keep_count
from admm_jax.pruning import CapturedBlock, capture_blocks, resolve_config
from admm_jax.spap.lsq import check_glu, glu_stats
from admm_jax.spap.methods import GLU_METHODS, prune_glu_block

Array = jax.Array
Normalise = Literal["mean", "zscore"]
NORMALISATIONS: tuple[str, ...] = ("mean", "zscore")


class GlobalPruned(NamedTuple):
    """The result of :func:`global_prune`.

    Attributes:
        params: the pruned parameters (zero outside the masks).
        masks: ``{"layers/{i}/mlp/{gate|up|down}_proj/kernel": [in, out] keep mask}``.
        widths: kept neurons per layer (sums to ``keep_count(Σ n_l, sparsity)``).
    """

    params: dict
    masks: dict[str, Array]
    widths: tuple[int, ...]


def _normalised(score: np.ndarray, normalise: str) -> np.ndarray:
    score = np.asarray(score, np.float64)
    if normalise == "mean":
        return score / max(float(np.mean(score)), np.finfo(np.float64).tiny)
    return (score - np.mean(score)) / max(float(np.std(score)), np.finfo(np.float64).tiny)


def allocate_widths(scores: Sequence[Any], sparsity: float, *,
                    normalise: Normalise = "mean") -> tuple[int, ...]:
    """Per-layer widths from a global ranking (module docstring).

    Args:
        scores: one ``[n_l]`` array of neuron importances per layer (higher: more important).
        sparsity: fraction of all neurons to prune, in ``[0, 1)``.
        normalise: ``"mean"`` or ``"zscore"`` (module docstring).

    Returns:
        ``k_l`` per layer, each in ``[1, n_l]``, summing to exactly
        ``max(L, keep_count(Σ_l n_l, sparsity))``; ties go to the earlier layer, then the lower
        index.
    """
    sparsity = check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
    check_choice("normalise", normalise, NORMALISATIONS)
    if not scores or any(np.ndim(s) != 1 or np.size(s) == 0 for s in scores):
        raise ValueError("scores must be a non-empty sequence of non-empty 1-D arrays")
    sizes = [int(np.size(s)) for s in scores]
    total = max(len(sizes), keep_count(sum(sizes), sparsity))
    ranked = []
    for s in scores:
        z = _normalised(s, normalise)
        z[int(np.argmax(z))] = np.inf  # every layer keeps its best neuron
        ranked.append(z)
    flat = np.concatenate(ranked)
    layer = np.repeat(np.arange(len(sizes)), sizes)
    chosen = np.argsort(-flat, kind="stable")[:total]
    return tuple(int(c) for c in np.bincount(layer[chosen], minlength=len(sizes)))


def _options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    check_choice("method", method, tuple(GLU_METHODS))
    record = GLU_METHODS[method]
    unknown = sorted(set(options) - set(record.defaults))
    if unknown:
        raise TypeError(f"unknown options {unknown} for method {method!r}; it accepts "
                        f"{sorted(record.defaults)}")
    options = {**record.defaults, **options}
    record.check(**options)
    return options


def global_prune(model: LlamaConfig | nnx.GraphDef, params: dict, calibration: Any, *,
                 method: str = "spap", sparsity: float = 0.5, normalise: Normalise = "mean",
                 batch_size: int = 8, verbose: bool = True, **options: Any) -> GlobalPruned:
    """Structured GLU pruning with one neuron budget for the whole model (module docstring).

    Args:
        model: the model's :class:`LlamaConfig` or graphdef.
        params: its parameters (dense GLU MLPs in every block).
        calibration: calibration token ids ``int[n, T]``.
        method: a name in :data:`~admm_jax.spap.methods.GLU_METHODS` (``"spap"``,
            ``"mag-neuron"``, ``"flap"``, ``"wanda-neuron"``).
        sparsity: fraction of all MLP neurons of the model to prune, in ``[0, 1)``.
        normalise: the within-layer score normalisation, ``"mean"`` or ``"zscore"``.
        batch_size: calibration samples per forward pass.
        verbose: progress bars on stderr.
        **options: the method's options (its ``GLU_METHODS[method].defaults``).

    Returns:
        The :class:`GlobalPruned` parameters, masks and per-layer widths.
    """
    config = resolve_config(model, params)
    sparsity = check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
    check_choice("normalise", normalise, NORMALISATIONS)
    options = _options(method, options)
    if calibration is None:
        raise ValueError(f"method={method!r} needs calibration tokens [n, seq_len]")
    for i in range(config.n_layers):
        check_glu(params["layers"][i].get("mlp"), f"layer {i} MLP")
    scores: dict[int, np.ndarray] = {}

    def record(block: CapturedBlock) -> dict:
        scores[block.index] = np.asarray(GLU_METHODS[method].score(block, **options))
        return block.params

    run = dict(batch_size=batch_size, verbose=verbose, stats=glu_stats)
    capture_blocks(model, params, calibration, record, **run)
    widths = allocate_widths([scores[i] for i in range(config.n_layers)], sparsity,
                             normalise=normalise)
    masks: dict[str, Array] = {}

    def prune_block(block: CapturedBlock) -> dict:
        new, block_masks = prune_glu_block(block, widths[block.index], method, **options)
        masks.update({f"layers/{block.index}/{k}/kernel": m for k, m in block_masks.items()})
        return new

    pruned, _ = capture_blocks(model, params, calibration, prune_block, **run)
    return GlobalPruned(pruned, masks, widths)
