"""Eager argument checks shared by every public function.

Each check raises ``TypeError`` / ``ValueError`` naming the argument and its allowed range, so a
bad input fails at the call site and never as a shape or dtype error from inside XLA. Traced
values (e.g. a ρ injected by ``optax.inject_hyperparams``) cannot be checked eagerly; the checks
that accept them say so and let them pass.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer (its value is unknown until run time)."""
    return isinstance(value, jax.core.Tracer)


def check_int(name: str, value: Any, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (either bound optional); bools and
    non-integers raise ``TypeError``, out-of-range values ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value}")
    return value


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False,
               allow_traced: bool = False) -> Any:
    """``value`` as a ``float`` in the interval given by ``low``/``high`` (open ends with
    ``low_open``/``high_open``). A concrete 0-d array (how ``optax.inject_hyperparams`` passes a
    hyperparameter) counts as its number. With ``allow_traced`` a tracer passes through
    unchecked."""
    if allow_traced and is_traced(value):
        return value
    if isinstance(value, (jax.Array, np.ndarray)) and not is_traced(value) and value.ndim == 0 \
            and np.issubdtype(value.dtype, np.number) and value.dtype != np.bool_:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above or value != value:
        left = "-inf" if low is None else low
        right = "inf" if high is None else high
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}" \
                   f"{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices`` (a ``Literal`` option), else ``ValueError``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
