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
