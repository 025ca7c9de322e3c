"""Physical shrinking of structurally pruned GLU MLPs: a smaller model with a per-layer
``mlp_dim``, numerically the masked dense model.

Removing neuron ``i`` of a SwiGLU MLP deletes column ``i`` of the gate and up kernels and row
``i`` of the down kernel; the kept neurons' contributions ``silu(x w_g,i)(x w_u,i) W_i`` are
untouched, so the smaller model computes exactly what the masked one does (up to the summation
order of the down projection). The result is an ordinary :class:`LlamaConfig` with
``mlp_dim=(k_0, …, k_{L−1})`` and its parameters, which ``save_model`` / ``load_model`` store and
read back like any model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax.models.llama import LlamaConfig
from admm_jax.pruning import resolve_config
from admm_jax.spap.lsq import check_glu

Array = jax.Array


def kept_neurons(masks: Mapping[str, Any], n_layers: int) -> tuple[np.ndarray, ...]:
    """The kept neuron indices of every layer (sorted int ``[k_l]``), read from the down-projection
    keep masks ``masks["layers/{i}/mlp/down_proj/kernel"]`` (``[n, dim]``, whole rows) returned by
    :func:`admm_jax.pruning.prune` or :func:`~admm_jax.spap.allocation.global_prune`.

    Raises:
        ValueError: a layer's mask is missing or does not keep or drop whole rows.
    """
    kept = []
    for i in range(n_layers):
        key = f"layers/{i}/mlp/down_proj/kernel"
        if key not in masks:
            raise ValueError(f"masks has no {key!r}: not the result of a structured GLU pruner")
        mask = np.asarray(masks[key], bool)
        if mask.ndim != 2 or not np.all(mask == mask[:, :1]):
            raise ValueError(f"{key} must keep or drop whole rows (neurons)")
        kept.append(np.flatnonzero(mask[:, 0]))
    return tuple(kept)


def _indices(keep: Any, n: int, layer: int) -> np.ndarray:
    """Sorted unique indices from an index array or a bool mask ``[n]``."""
    keep = np.asarray(keep)
    if keep.dtype == bool:
        if keep.shape != (n,):
            raise ValueError(f"layer {layer}: a bool keep mask must have shape ({n},), got "
                             f"{keep.shape}")
        keep = np.flatnonzero(keep)
    if keep.ndim != 1 or keep.size == 0 or not np.issubdtype(keep.dtype, np.integer):
        raise ValueError(f"layer {layer}: keep must be a non-empty 1-D array of neuron indices "
                         "or a bool mask")
    if keep.min() < 0 or keep.max() >= n or np.unique(keep).size != keep.size:
        raise ValueError(f"layer {layer}: kept neuron indices must be distinct and in [0, {n})")
    return np.sort(keep)


def shrink_mlp(config: LlamaConfig, params: dict,
               keep: Sequence[Any]) -> tuple[LlamaConfig, dict]:
    """The model with only the ``keep[l]`` neurons of each layer's GLU MLP.

    Args:
        config: the model's configuration (dense linears).
        params: its parameters (``init_params(config)``'s structure).
        keep: one entry per layer, the kept neuron indices (int ``[k_l]``) or a bool mask
            ``[n_l]`` (e.g. :func:`kept_neurons` of a pruner's masks).

    Returns:
        ``(config with mlp_dim=(k_0, …), params)``: gate/up kernels ``[dim, k_l]``, down kernels
        ``[k_l, dim]``, everything else shared with ``params``.

    Raises:
        ValueError: ``keep`` has the wrong length or bad indices, or a block's MLP is not a
            dense GLU MLP.
    """
    for i in range(config.n_layers):
        check_glu(params["layers"][i].get("mlp"), f"layer {i} MLP")
    config = resolve_config(config, params)
    if len(keep) != config.n_layers:
        raise ValueError(f"keep must have one entry per layer ({config.n_layers}), got "
                         f"{len(keep)}")
    layers, widths = {}, []
    for i in range(config.n_layers):
        idx = jnp.asarray(_indices(keep[i], config.block(i).mlp_dim, i))
        mlp = params["layers"][i]["mlp"]
        layers[i] = {**params["layers"][i], "mlp": {
            "gate_proj": {"kernel": mlp["gate_proj"]["kernel"][:, idx]},
            "up_proj": {"kernel": mlp["up_proj"]["kernel"][:, idx]},
            "down_proj": {"kernel": mlp["down_proj"]["kernel"][idx, :]}}}
        widths.append(int(idx.size))
    return dataclasses.replace(config, mlp_dim=tuple(widths)), {**params, "layers": layers}
