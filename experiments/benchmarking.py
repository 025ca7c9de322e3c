"""Benchmark helpers: interleaved wall-clock medians and the JSON report."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax

from admm_jax._io import atomic_write_json


def interleaved_medians(fns: dict[str, Callable], rounds: int,
                        warmup: int = 0) -> dict[str, float]:
    """Median seconds of each ``fn()`` (result blocked on), all contenders alternating within each
    round so that background load affects them alike; ``warmup`` untimed calls each first."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def report(result: dict, out: str | Path) -> dict:
    """Write ``result`` as JSON to ``out`` (parents created) and print it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))
    return result
