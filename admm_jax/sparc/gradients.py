"""Gradients of chosen linear kernels: the signal every adapter initialisation compresses.

LoRA-One and RA-SpaRC compress one stochastic gradient ``g_ℓ = ∇_{W_ℓ} L(W; ξ)`` of each adapted
kernel (a mini-batch ξ of next-token windows); RoSA picks its sparse positions from the squared
gradients accumulated over many batches, ``Σ_t g_{ℓ,t} ⊙ g_{ℓ,t}``; the quality metric of
:mod:`admm_jax.sparc` averages over several stochastic gradients. :func:`kernel_gradients`
gives the first, :func:`gradient_statistics` the mean, the mean square and a few per-batch
samples in one pass over the batches.

Kernels are flax ``[in, out]``, the transpose of the papers' PyTorch ``[out, in]`` weights; every
compressor used here (truncated SVD, top-k, SpaRC) commutes with the transpose, so gradients are
compressed in kernel orientation and the adapters built from them need no transposition.

References:
    Zhang et al., "LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning LLMs", 2025.
    Nikdan et al., "RoSA: Accurate Parameter-Efficient Fine-Tuning via Robust Adaptation", 2024.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from admm_jax.core.tree import flat_paths, path_str
from admm_jax.training.lm import next_token_loss
from admm_jax.training.step import merge_params, split_params

__all__ = ["GradientStats", "gradient_statistics", "kernel_gradient_fn", "kernel_gradients"]

Array = jax.Array


class GradientStats(NamedTuple):
    """Per-kernel gradient statistics over ``count`` batches (``{leaf path: f32 [in, out]}``).

    Attributes:
        mean: ``(1/N) Σ_t g_t``, the full-batch gradient estimate.
        mean_square: ``(1/N) Σ_t g_t ⊙ g_t`` (RoSA's accumulated squared gradients, up to 1/N).
        samples: ``{path: f32 [S, in, out]}``, the first ``S`` per-batch gradients.
        count: ``N``.
    """

    mean: dict[str, Array]
    mean_square: dict[str, Array]
    samples: dict[str, Array]
    count: int


def _kernel_mask(params: dict, paths: Sequence[str]) -> dict:
    """The bool pytree selecting the leaves at ``paths`` (``ValueError`` naming a missing one)."""
    flat = flat_paths(params)
    missing = sorted(set(paths) - set(flat))
    if missing:
        raise ValueError(f"params have no leaf {missing[0]!r} (expected kernel paths such as "
                         f"'layers/0/attn/q_proj/kernel')")
    wanted = set(paths)
    for path in wanted:
        if np.ndim(flat[path]) != 2:
            raise ValueError(f"{path!r} is not a 2-D kernel (shape {np.shape(flat[path])})")
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p) in wanted, params)


def kernel_gradient_fn(graphdef: nnx.GraphDef, params: dict, paths: Sequence[str], *,
                       loss_fn: Callable = next_token_loss
                       ) -> Callable[[dict, Array], dict[str, Array]]:
    """A jitted ``(params, batch) -> {path: ∇_{W_path} loss}`` over the kernels at ``paths``
    only (the other leaves are constants of the differentiation), in float32.

    Args:
        graphdef: the model's graph definition.
        params: a params pytree of that model (only its structure is used).
        paths: leaf paths of 2-D kernels, e.g. ``"layers/0/mlp/up_proj/kernel"``.
        loss_fn: ``loss_fn(graphdef, params, batch) -> scalar`` (default: mean next-token NLL).
    """
    mask = _kernel_mask(params, paths)

    @jax.jit
    def grads(params, batch):
        chosen, rest = split_params(params, mask)
        g = jax.grad(lambda c: loss_fn(graphdef, merge_params(c, rest), batch))(chosen)
        return {p: x.astype(jnp.float32) for p, x in flat_paths(g).items()}

    return grads


def kernel_gradients(graphdef: nnx.GraphDef, params: dict, batch: Array,
                     paths: Sequence[str], *, loss_fn: Callable = next_token_loss
                     ) -> dict[str, Array]:
    """One stochastic gradient ``{path: g [in, out]}`` of the kernels at ``paths`` on ``batch``
    (``[B, T + 1]`` token windows for the default loss)."""
    return kernel_gradient_fn(graphdef, params, paths, loss_fn=loss_fn)(params, batch)


def gradient_statistics(graphdef: nnx.GraphDef, params: dict, batches: Iterable[Array],
                        paths: Sequence[str], *, n_samples: int = 0,
                        loss_fn: Callable = next_token_loss) -> GradientStats:
    """Mean, mean square and the first ``n_samples`` per-batch gradients of the kernels at
    ``paths`` over ``batches`` (consumed once; see :class:`GradientStats`).

    Raises:
        ValueError: no batch, ``n_samples < 0``, a path that is not a 2-D leaf of ``params``.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    grads = kernel_gradient_fn(graphdef, params, paths, loss_fn=loss_fn)
    total = square = None
    samples: list[dict[str, Array]] = []
    count = 0
    for batch in batches:
        g = grads(params, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        sq = jax.tree.map(jnp.square, g)
        square = sq if square is None else jax.tree.map(jnp.add, square, sq)
        if len(samples) < n_samples:
            samples.append(g)
        count += 1
    if not count:
        raise ValueError("gradient_statistics needs at least one batch")
    stacked = {p: jnp.stack([s[p] for s in samples]) for p in paths} if samples else {}
    return GradientStats(jax.tree.map(lambda x: x / count, total),
                         jax.tree.map(lambda x: x / count, square), stacked, count)
