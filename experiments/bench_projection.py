"""Global top-k selection: threshold by bisection on counts vs a full sort, side by side.

    python -m experiments.bench_projection [--model 60m] [--sparsity 0.9]

On the parameter pytree of a model preset (``60m``: 58 M parameters, random weights), keep the
``(1 − sparsity)`` fraction of entries with the largest magnitude across all leaves:

* ours — :func:`admm_jax.projection.global_topk_masks`: bisection on counts (elementwise compares
  and sums, O(N) memory beyond the inputs), exact k with deterministic ties;
* baseline — the sort-based projection of existing JAX ADMM pruners: concatenate every score,
  ``jnp.sort`` them (O(N log N) time, an N-sized sorted copy), threshold at the k-th largest.

Reports median wall time (interleaved rounds) and the compiled programs' temporary memory
(``memory_analysis().temp_size_in_bytes``), as ratios, and how many entries the two keep
differently (the sort keeps every entry tied with the threshold, so it may keep more than k).
Writes JSON.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax.models.llama import LlamaConfig, abstract_params, count_params
from admm_jax.projection import global_topk_masks, keep_count
from experiments.benchmarking import interleaved_medians, report
from experiments.cli import parse_config


@dataclasses.dataclass(frozen=True)
class BenchProjectionConfig:
    """Global top-k by bisection vs full sort on a model-sized pytree."""

    out: str = "results/bench_projection.json"
    model: str = "60m"
    sparsity: float = 0.9
    rounds: int = 3


def sort_masks(leaves: list[jax.Array], k: int) -> list[jax.Array]:
    """Baseline: global sort of all scores, threshold at the k-th largest."""
    scores = jnp.concatenate([jnp.square(x).reshape(-1) for x in leaves])
    threshold = jnp.sort(scores)[scores.size - k]
    return [jnp.square(x) >= threshold for x in leaves]


def temp_bytes(fn, args) -> int:
    """Temporary buffer bytes of the compiled program (``-1`` if the backend does not say)."""
    analysis = jax.jit(fn).lower(args).compile().memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchProjectionConfig, argv)
    _, abstract = abstract_params(LlamaConfig.preset(cfg.model))
    n = count_params(abstract)
    shapes = [s.shape for s in jax.tree_util.tree_leaves(abstract)]
    keys = jax.random.split(jax.random.key(0), len(shapes))
    leaves = [jax.random.normal(key, shape) * 0.02 for key, shape in zip(keys, shapes)]
    k = keep_count(n, cfg.sparsity)

    def ours(ls):
        return global_topk_masks([jnp.square(x) for x in ls], k)

    def baseline(ls):
        return sort_masks(ls, k)

    ours_jit, base_jit = jax.jit(ours), jax.jit(baseline)
    mine, theirs = ours_jit(leaves), base_jit(leaves)
    kept = sum(int(m.sum()) for m in mine)
    kept_sort = sum(int(m.sum()) for m in theirs)  # ≥ k: it keeps every tie at the threshold
    differing = sum(int((a != b).sum()) for a, b in zip(mine, theirs))
    seconds = interleaved_medians({"bisection": lambda: ours_jit(leaves),
                                   "sort": lambda: base_jit(leaves)}, cfg.rounds, warmup=1)
    memory = {"bisection": temp_bytes(ours, leaves), "sort": temp_bytes(baseline, leaves)}
    result = {
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "model": cfg.model,
        "params": n, "leaves": len(shapes), "sparsity": cfg.sparsity, "k": k,
        "kept_by_bisection": kept, "kept_by_sort": kept_sort,
        "entries_differing": differing, "seconds": seconds,
        "time_ratio_sort_over_bisection": seconds["sort"] / seconds["bisection"],
        "temp_bytes": memory,
        "temp_memory_ratio_sort_over_bisection": (memory["sort"] / memory["bisection"]
                                                  if memory["bisection"] > 0 else None),
        "input_bytes": int(sum(np.prod(s) for s in shapes) * 4)}
    return report(result, cfg.out)


if __name__ == "__main__":
    main()
