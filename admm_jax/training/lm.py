"""Language-modelling objective and evaluation: next-token cross-entropy and perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax.models.llama import forward

Array = jax.Array


def token_nll(logits: Array, targets: Array) -> Array:
    """Per-token negative log-likelihood ``−log softmax(logits)[target]``: ``[B, T]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def next_token_loss(graphdef, params, batch: Array) -> Array:
    """Mean next-token cross-entropy of ``batch: int[B, T+1]`` (inputs ``[:, :-1]``)."""
    logits = forward(graphdef, params, batch[:, :-1])
    return token_nll(logits, batch[:, 1:]).mean()


def per_client_loss(loss_fn: Callable = next_token_loss) -> Callable:
    """``loss_fn`` vmapped over a leading client axis of both params and batch, summed.

    For consensus optimizers that keep one copy of the weights per client: params have leaves
    ``[C, ...]`` and the batch is ``[C, B, T+1]``. The sum ``Σ_c f_c(θ_c)`` has gradient
    ``∂/∂θ_c = ∇f_c(θ_c)``, each client's own gradient, stacked. Use with ``has_aux=True``: the aux
    metric ``client_loss: f32[C]`` holds the per-client losses.

    Args:
        loss_fn: the single-client loss ``(graphdef, params, batch) -> scalar``.

    Returns:
        ``(graphdef, params, batch) -> (Σ_c f_c, {"client_loss": f32[C]})``.
    """

    def loss(graphdef, params, batch):
        losses = jax.vmap(loss_fn, in_axes=(None, 0, 0))(graphdef, params, batch)
        return losses.sum(), {"client_loss": losses}

    return loss


def make_nll_sum(graphdef) -> Callable[[dict, Array], tuple[Array, Array]]:
    """A jitted ``(params, batch) -> (sum of NLL, token count)`` for exact corpus perplexity."""

    @jax.jit
    def nll_sum(params, batch):
        nll = token_nll(forward(graphdef, params, batch[:, :-1]), batch[:, 1:])
        return nll.sum(), jnp.asarray(nll.size, jnp.float32)

    return nll_sum


def perplexity(nll_sum: Callable, params, batches: Iterable[np.ndarray]) -> float:
    """``exp(Σ NLL / #tokens)`` over every target token of ``batches``.

    Args:
        nll_sum: from :func:`make_nll_sum`.
        params: model parameters.
        batches: ``int[B, T+1]`` windows, e.g. :func:`admm_jax.data.eval_batches`.
    """
    total, count = 0.0, 0.0
    for batch in batches:
        s, n = nll_sum(params, jnp.asarray(batch))
        total += float(s)
        count += float(n)
    if count == 0:
        raise ValueError("perplexity needs at least one batch with one target token")
    return math.exp(total / count)


def unigram_perplexity(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity of the add-one-smoothed unigram distribution of ``train_tokens`` on
    ``eval_tokens`` — the baseline a trained language model must beat."""
    counts = np.bincount(np.asarray(train_tokens, np.int64), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[np.asarray(eval_tokens, np.int64)].mean()))
