"""Training batches, evaluation windows and calibration samples cut from a 1-D token split.

Training batches are pure functions of ``(seed, step)``: a run resumed at step ``s`` sees exactly
the batches an uninterrupted run would have seen from step ``s`` on. Every window is returned as
``int32``; a training or evaluation window holds ``seq_len + 1`` tokens, so that
``inputs, targets = batch[:, :-1], batch[:, 1:]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np

from admm_jax._checks import check_choice, check_int
from admm_jax.data.tokens import SPLITS, TokenizedCorpus


def _check_tokens(tokens: np.ndarray, length: int, what: str) -> None:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D numpy array, got "
                         f"{getattr(tokens, 'shape', type(tokens).__name__)}")
    if tokens.shape[0] < length:
        raise ValueError(f"{what} needs at least {length} tokens, but the array has "
                         f"{tokens.shape[0]}; use a smaller seq_len or a larger split")


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """``int32[len(starts), length]``: row ``i`` is ``tokens[starts[i] : starts[i] + length]``."""
    return np.asarray(tokens[starts[:, None] + np.arange(length)], dtype=np.int32)


def get_batch(tokens: np.ndarray, step: int, *, batch_size: int, seq_len: int,
              seed: int) -> np.ndarray:
    """Random crops for training step ``step``: a pure function of ``(seed, step)``.

    Args:
        tokens: 1-D token ids with at least ``seq_len + 1`` entries.
        step: non-negative training step (the data position).
        batch_size: number of crops.
        seq_len: model context length.
        seed: non-negative data seed.

    Returns:
        int32 ``[batch_size, seq_len + 1]``; inputs are ``[:, :-1]``, targets ``[:, 1:]``.
    """
    step = check_int("step", step, 0)
    batch_size = check_int("batch_size", batch_size, 1)
    seq_len = check_int("seq_len", seq_len, 1)
    seed = check_int("seed", seed, 0)
    _check_tokens(tokens, seq_len + 1, f"seq_len={seq_len} (windows of seq_len + 1)")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.shape[0] - seq_len, size=batch_size)
    return _windows(tokens, starts, seq_len + 1)


class BatchIterator:
    """Infinite iterator over :func:`get_batch` from ``start_step`` on.

    ``step`` is the step of the next batch; checkpoint it and resume with
    ``BatchIterator(..., start_step=step)`` to continue the exact same sequence of batches.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 start_step: int = 0):
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seq_len = check_int("seq_len", seq_len, 1)
        self.seed = check_int("seed", seed, 0)
        self.step = check_int("start_step", start_step, 0)
        _check_tokens(tokens, self.seq_len + 1, f"seq_len={self.seq_len} (windows of seq_len + 1)")
        self.tokens = tokens

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> np.ndarray:
        batch = get_batch(self.tokens, self.step, batch_size=self.batch_size,
                          seq_len=self.seq_len, seed=self.seed)
        self.step += 1
        return batch


def eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int,
                 max_batches: int | None = None) -> Iterator[np.ndarray]:
    """Sequential, non-overlapping evaluation windows over a split.

    Window ``i`` is ``tokens[i * seq_len : i * seq_len + seq_len + 1]`` for
    ``i < (len(tokens) - 1) // seq_len``, so every target position in
    ``[1, 1 + n_windows * seq_len)`` is scored exactly once; the final fewer than ``seq_len``
    tokens, which cannot fill a window, are left out. The last batch may be smaller than
    ``batch_size``. Arguments are checked eagerly, before the first batch is requested.

    Args:
        tokens: 1-D token ids with at least ``seq_len + 1`` entries.
        batch_size: windows per batch.
        seq_len: model context length.
        max_batches: stop after this many batches (``None``: the whole split).

    Returns:
        An iterator of int32 ``[b, seq_len + 1]`` with ``1 <= b <= batch_size``.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    seq_len = check_int("seq_len", seq_len, 1)
    if max_batches is not None:
        max_batches = check_int("max_batches", max_batches, 1)
    _check_tokens(tokens, seq_len + 1, f"seq_len={seq_len} (windows of seq_len + 1)")
    starts = np.arange((tokens.shape[0] - 1) // seq_len) * seq_len
    n_batches = -(-starts.size // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    return (_windows(tokens, starts[b * batch_size:(b + 1) * batch_size], seq_len + 1)
            for b in range(n_batches))


def calibration_samples(corpus: TokenizedCorpus, n: int, seq_len: int, *, seed: int = 0,
                        split: Literal["train", "val"] = "train") -> np.ndarray:
    """Random windows for one-shot pruning and compression calibration.

    Args:
        corpus: the tokenized corpus.
        n: number of windows.
        seq_len: tokens per window (at most the split length).
        seed: non-negative seed of the window positions.
        split: ``"train"`` or ``"val"``.

    Returns:
        int32 ``[n, seq_len]``.
    """
    n = check_int("n", n, 1)
    seq_len = check_int("seq_len", seq_len, 1)
    seed = check_int("seed", seed, 0)
    check_choice("split", split, SPLITS)
    tokens = getattr(corpus, split)
    _check_tokens(tokens, seq_len, f"the {split} split with seq_len={seq_len}")
    starts = np.random.default_rng(seed).integers(0, tokens.shape[0] - seq_len + 1, size=n)
    return _windows(tokens, starts, seq_len)
