"""Global top-k selection: threshold by bisection on counts vs a full sort, side by side.

    python -m experiments.bench_projection [--model 60m] [--sparsity 0.9]

On the parameter pytree of a model preset (``60m``: 58 M parameters, random weights), keep the
``(1 − sparsity)`` fraction of entries with the largest magnitude across all leaves:

* ours — :func:`admm_jax.ops.projection.global_topk_masks` with ``score_fn=jnp.square``: the k-th
  largest score by 32 bisection steps on counts (each an elementwise compare and count, the
  score recomputed inside it), then ``score ≥ t``; exact k with deterministic ties;
* baseline — the sort-based projection of existing JAX ADMM pruners: concatenate every score,
  ``jnp.sort`` them (O(N log N) time, an N-sized sorted copy), threshold at the k-th largest.

Both run on two inputs: the random weights (no ties at the threshold) and the same weights
rounded to a grid of 0.005 (a few dozen levels, so the threshold value is shared by ~10⁶ entries
and ours takes its tie-break path; the sort keeps every tie, so it keeps more than k).

Reports median wall time (interleaved rounds), the compiled programs' memory
(``memory_analysis()``: temporary buffers, and the output masks that both produce), and the
peak resident memory of one call measured in a fresh process per contender (rise of the
process's peak RSS over its RSS before the call, inputs and compiled program already in place;
Linux only) — as ratios sort / bisection. Writes JSON.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp

from admm_jax._checks import check_int, check_real
from admm_jax.models.llama import LlamaConfig, abstract_params
from admm_jax.ops.projection import global_threshold, global_topk_masks, keep_count
from experiments.benchmarking import interleaved_medians, report
from experiments.cli import parse_config


@dataclasses.dataclass(frozen=True)
class BenchProjectionConfig:
    """Global top-k by bisection vs full sort on a model-sized pytree."""

    out: str = "results/bench_projection.json"
    """JSON report path."""
    model: str = "60m"
    """Model preset whose parameter shapes are filled with random weights."""
    sparsity: float = 0.9
    """Fraction of entries removed (the top 1 − SPARSITY by magnitude are kept)."""
    rounds: int = 3
    """Interleaved timed rounds (the median is reported)."""
    rss: bool = True
    """Also measure peak RSS per contender in a fresh process (Linux)."""

    def __post_init__(self):
        check_real("sparsity", self.sparsity, low=0.0, high=1.0, low_open=True, high_open=True)
        check_int("rounds", self.rounds, minimum=1)


def sort_masks(leaves: list[jax.Array], k: int) -> list[jax.Array]:
    """Baseline: global sort of all scores, threshold at the k-th largest."""
    scores = jnp.concatenate([jnp.square(x).reshape(-1) for x in leaves])
    threshold = jnp.sort(scores)[scores.size - k]
    return [jnp.square(x) >= threshold for x in leaves]


def contenders(k: int) -> dict:
    """``name -> fn(leaves) -> masks``: ours (scores recomputed inside each count), ours on a
    precomputed score list (what a caller without ``score_fn`` gets), and the sort."""
    return {
        "bisection": lambda ls: global_topk_masks(ls, k, score_fn=jnp.square),
        "bisection_precomputed_scores": lambda ls: global_topk_masks(
            [jnp.square(x) for x in ls], k),
        "sort": lambda ls: sort_masks(ls, k),
    }


def model_leaves(model: str, tied: bool = False) -> list[jax.Array]:
    """Random N(0, 0.02²) weights shaped like the preset's parameters (optionally rounded to a
    0.005 grid, which creates massive ties)."""
    _, abstract = abstract_params(LlamaConfig.preset(model))
    shapes = [s.shape for s in jax.tree_util.tree_leaves(abstract)]
    keys = jax.random.split(jax.random.key(0), len(shapes))
    leaves = [jax.random.normal(key, shape) * 0.02 for key, shape in zip(keys, shapes)]
    return [jnp.round(x / 0.005) * 0.005 for x in leaves] if tied else leaves


def memory(fn, args) -> dict[str, int]:
    """Temporary and output buffer bytes of the compiled program (``-1`` if not reported)."""
    analysis = jax.jit(fn).lower(args).compile().memory_analysis()
    return {f: int(getattr(analysis, f"{f}_size_in_bytes", -1)) if analysis is not None else -1
            for f in ("temp", "output")}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child_peak_rss(name: str, model: str, sparsity: float) -> int:
    """In this (fresh) process: build the inputs, compile ``name``, reset the peak-RSS mark, run
    it once and return the rise of peak RSS over the RSS before the call, in bytes."""
    leaves = model_leaves(model)
    k = keep_count(sum(x.size for x in leaves), sparsity)
    compiled = jax.jit(contenders(k)[name]).lower(leaves).compile()
    jax.block_until_ready(leaves)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    jax.block_until_ready(compiled(leaves))
    return (_status_kib("VmHWM") - before) * 1024


def peak_rss(name: str, model: str, sparsity: float) -> int | None:
    """:func:`child_peak_rss` in a fresh interpreter (``None`` where it cannot be measured).

    Large allocations are forced to ``mmap`` so that freed buffers leave the RSS at once."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    code = textwrap.dedent(f"""
        from experiments.bench_projection import child_peak_rss
        print(child_peak_rss({name!r}, {model!r}, {sparsity!r}))
    """)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=root, timeout=1800)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return int(proc.stdout.strip().splitlines()[-1])


def _ratio(a, b):
    return a / b if a is not None and b is not None and b > 0 else None


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchProjectionConfig, argv)
    leaves, tied = model_leaves(cfg.model), model_leaves(cfg.model, tied=True)
    n = sum(x.size for x in leaves)
    k = keep_count(n, cfg.sparsity)
    fns = contenders(k)
    ours, precomputed, base = (jax.jit(fns[name]) for name in
                               ("bisection", "bisection_precomputed_scores", "sort"))

    def kept(masks):
        return sum(int(m.sum()) for m in masks)

    mine, theirs, mine_tied, theirs_tied = ours(leaves), base(leaves), ours(tied), base(tied)
    assert all(bool((a == b).all()) for a, b in zip(mine, precomputed(leaves)))
    t = global_threshold(tied, k, score_fn=jnp.square)
    ties_at_threshold = sum(int((jnp.square(x) == t).sum()) for x in tied)
    seconds = interleaved_medians({
        "bisection": lambda: ours(leaves), "sort": lambda: base(leaves),
        "bisection_tied": lambda: ours(tied), "sort_tied": lambda: base(tied)},
        cfg.rounds, warmup=1)
    mem = {name: memory(fn, leaves) for name, fn in fns.items()}
    rss = {name: (peak_rss(name, cfg.model, cfg.sparsity) if cfg.rss else None)
           for name in fns}
    result = {
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "model": cfg.model,
        "params": int(n), "leaves": len(leaves), "sparsity": cfg.sparsity, "k": k,
        "kept_by_bisection": kept(mine), "kept_by_sort": kept(theirs),
        "entries_differing": sum(int((a != b).sum()) for a, b in zip(mine, theirs)),
        "tied_input": {"ties_at_threshold": ties_at_threshold,
                       "kept_by_bisection": kept(mine_tied), "kept_by_sort": kept(theirs_tied)},
        "seconds": seconds,
        "time_ratio_sort_over_bisection": seconds["sort"] / seconds["bisection"],
        "time_ratio_sort_over_bisection_tied": seconds["sort_tied"] / seconds["bisection_tied"],
        "temp_bytes": {name: m["temp"] for name, m in mem.items()},
        "output_bytes": {name: m["output"] for name, m in mem.items()},
        "temp_memory_ratio_sort_over_bisection": _ratio(mem["sort"]["temp"],
                                                        mem["bisection"]["temp"]),
        "temp_plus_output_ratio_sort_over_bisection": _ratio(
            mem["sort"]["temp"] + mem["sort"]["output"],
            mem["bisection"]["temp"] + mem["bisection"]["output"]),
        "peak_rss_rise_bytes": rss,
        "peak_rss_ratio_sort_over_bisection": _ratio(rss["sort"], rss["bisection"]),
        "input_bytes": int(sum(x.size * x.dtype.itemsize for x in leaves))}
    return report(result, cfg.out)


if __name__ == "__main__":
    main()
