"""Sparse kernels and compact models against dense, side by side in one process; JSON report.

    python -m experiments.bench_sparse                       # (a) + (b) + (c) on toy stand-ins
    python -m experiments.bench_sparse --parts models --standins smollm2 --sparsities 0.5,0.9 \
        --budgets 0.3,0.5,0.7                                 # (c) on SmolLM2 stand-ins
    python -m experiments.bench_sparse --models dense=runs/x/model,elsa90=runs/x-c --tokens 1,512
    python -m experiments.bench_sparse --parts crossover --standins smollm2 --repeats 5 \
        --out results/bench_sparse_crossover.json            # (d): CPU_DENSIFY_ABOVE's source
    python -m experiments.bench_sparse --quick true          # a smoke run in seconds

(a) SpMM forward ``x @ W`` (:func:`kernels.sparse_matmul`) in both CPU forms, ``impl="xla"``
(gather + segment-sum) and ``impl="densify"``, against the dense matmul of the same ``W`` on the
SmolLM2-135M layer shapes (576×576 q/o, 576×192 k/v, 576×1536 gate/up, 1536×576 down) at
densities 1–50 %, at 1 (decode), 8, 64 and 512 tokens; which one ``impl="auto"`` picks, and the
crossover density per token count for one layer alone (``densify_above_in_cache``: its weights
stay in cache, which flatters densifying at few tokens; see (d)).
(b) The SDDMM value gradient ``∂L/∂v_i = ⟨x[:, r_i], dy[:, c_i]⟩`` against the dense gradient
``xᵀ dy`` followed by a gather, at densities 0.1–5 % on 576×1536 at 512 tokens: time, the
compiled programs' temporary bytes (intermediates, excluding arguments and outputs, which are
reported apart; XLA's ``memory_analysis``) and their ratio, and the largest difference of the
values.
(c) Forward latency, compiled temporary / peak bytes, resident parameter bytes and bytes on disk
of checkpoints (``--models name=DIR,...``: dense or compact, e.g. deployed SALAAD / ELSA models)
against the first one named. Without ``--models`` it builds stand-ins (:func:`standin_models`)
from ``--standins`` (a random ``nano`` by default; ``smollm2`` for the real layer shapes and
weights): the dense model, its magnitude-pruned compact twins (unstructured at ``--sparsities``,
and 2:4), and HPA deployments at ``--budgets`` of a low-rank + sparse surrogate with SALAAD's
shape (``--rank_ratio``, ``--density``). A deployment's speed and bytes depend only on its
layouts and sizes, not on how good the weights are.

(d) The crossover that :data:`kernels.ops.CPU_DENSIFY_ABOVE` holds (``densify_above``): the
``--standins`` model magnitude-pruned to 3–70 % density, its forward with every sparse product in
the XLA form against every one densified (:func:`kernels.densify_rule`), at 1–512 tokens.

Every timing is a median over ``--repeats`` rounds in which all contenders alternate
(:func:`experiments.benchmarking.interleaved_medians`), after ``--warmup`` untimed calls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from admm_jax._checks import check_choice, check_int, check_real
from admm_jax.models.compact import compact_from_masks, resident_bytes
from admm_jax.models.llama import PRESETS, LlamaConfig, forward, init_params
from admm_jax.models.pretrained import PRETRAINED
from admm_jax.pruning import prune
from admm_jax.salaad.compact import compact_from_surrogate
from admm_jax.salaad.hpa import allocate
from admm_jax.salaad.surrogate import block_surrogate
from admm_jax.training.checkpoint import checkpoint_bytes, load_model, model_graphdef, save_model
from experiments.benchmarking import interleaved_medians, report
from experiments.cli import csv_items, parse_config
from experiments.loading import load_model_source
from kernels import densify_rule, from_dense, resolve_impl, sddmm, sparse_matmul

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))
DENSITIES = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.3, 0.5)
SPMM_TOKENS = (1, 8, 64, 512)
SDDMM_DENSITIES = (0.001, 0.005, 0.01, 0.02, 0.05)
MODEL_DENSITIES = (0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
PARTS = ("spmm", "sddmm", "models", "crossover")


@dataclasses.dataclass(frozen=True)
class BenchSparseConfig:
    """SpMM / SDDMM against dense, and compact models against dense ones (JSON to --out)."""

    out: str = "results/bench_sparse.json"
    """JSON report path."""
    quick: bool = False
    """Smoke run: one shape, two densities, 3 rounds, toy models at 64 tokens."""
    repeats: int = 20
    """Timed rounds per contender (medians)."""
    warmup: int = 2
    """Untimed calls per contender first."""
    models: str = ""
    """name=DIR,... checkpoints for (c), the first is the reference; default: stand-ins built
    from ``--standins`` (:func:`standin_models`)."""
    standins: str = "nano"
    """Model whose weights (a pretrained name such as smollm2) or random init (a preset) the
    stand-ins of (c) are built from."""
    sparsities: str = "0.9"
    """Unstructured magnitude sparsities of the stand-ins (also a 2:4 one is built)."""
    budgets: str = "0.5"
    """HPA budgets (fractions of the constrained parameters) of the low-rank + sparse stand-ins."""
    rank_ratio: float = 0.3
    """Rank of the stand-in surrogate's low-rank part, as a fraction of min(m, n) (0.3: the
    subspace cap the SmolLM2 SALAAD run ended at)."""
    density: float = 0.5
    """Density of the stand-in surrogate's sparse part (0.5: within the 0.42–0.71 that run
    ended at)."""
    tokens: str = "1,512"
    """Sequence lengths for (c) (capped at each model's max_seq_len)."""
    parts: str = "spmm,sddmm,models"
    """Comma-separated benchmarks to run: spmm (a), sddmm (b), models (c), crossover (d)."""

    def __post_init__(self):
        check_int("repeats", self.repeats, minimum=1)
        check_int("warmup", self.warmup, minimum=0)
        for part in csv_items(self.parts):
            check_choice("parts", part, PARTS)
        check_choice("standins", self.standins, (*sorted(PRETRAINED), *sorted(PRESETS)))
        check_real("rank_ratio", self.rank_ratio, low=0.0, high=1.0)
        check_real("density", self.density, low=0.0, high=1.0)
        for budget in _floats(self.budgets):
            check_real("budgets", budget, low=0.0, high=1.0, low_open=True)
        for sparsity in _floats(self.sparsities):
            check_real("sparsities", sparsity, low=0.0, high=1.0, high_open=True)


def _floats(csv: str) -> tuple[float, ...]:
    return tuple(float(x) for x in csv_items(csv))


def _random_sparse(shape: tuple[int, int], density: float, seed: int):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    keep = rng.random(shape) < density
    return jnp.asarray(np.where(keep, w, 0)), from_dense(jnp.asarray(w), keep)


def _analysis(fn, *args):
    """XLA's memory analysis of ``jit(fn)`` compiled for ``args``."""
    return jax.jit(fn).lower(*args).compile().memory_analysis()


def _memory(fn, *args) -> dict:
    """Temporary and peak bytes of ``jit(fn)`` compiled for ``args``."""
    analysis = _analysis(fn, *args)
    return {"temp_bytes": int(analysis.temp_size_in_bytes),
            "peak_bytes": int(analysis.peak_memory_in_bytes)}


SDDMM_MEMORY_NOTE = ("temp_bytes: the compiled program's intermediates (XLA memory_analysis "
                     "temp_size_in_bytes), excluding its arguments and outputs, which are "
                     "argument_bytes and output_bytes; temp_ratio = sddmm / dense_gather temp")


def _sddmm_memory(fn, *args) -> dict:
    """Temporary (intermediates only), argument and output bytes of ``jit(fn)``."""
    analysis = _analysis(fn, *args)
    return {"temp_bytes": int(analysis.temp_size_in_bytes),
            "argument_bytes": int(analysis.argument_size_in_bytes),
            "output_bytes": int(analysis.output_size_in_bytes)}


def bench_spmm(shapes, densities, token_counts, repeats: int, warmup: int) -> list[dict]:
    """(a): rows ``{shape, density, tokens, dense_s, xla_s, densify_s, auto_impl, auto_s,
    speedup = dense_s / auto_s}``: the dense matmul, both CPU forms of the sparse product
    (:mod:`kernels.ops`), and which one ``impl="auto"`` dispatches to at that density and token
    count (its time is that contender's)."""
    fns = {"dense": jax.jit(lambda x, w: x @ w)}
    for impl in ("xla", "densify"):
        fns[impl] = jax.jit(functools.partial(sparse_matmul, impl=impl))
    rows = []
    for shape in shapes:
        for density in densities:
            w_dense, w = _random_sparse(shape, density, seed=0)
            for tokens in token_counts:
                x = jax.random.normal(jax.random.key(1), (tokens, shape[0]))
                args = {"dense": w_dense, "xla": w, "densify": w}
                t = interleaved_medians({k: functools.partial(f, x, args[k])
                                         for k, f in fns.items()}, repeats, warmup)
                rows.append(with_dispatch({
                    "shape": list(shape), "density": density, "tokens": tokens, "nnz": w.nnz,
                    "dense_s": t["dense"], "xla_s": t["xla"], "densify_s": t["densify"]}))
    return rows


def with_dispatch(row: dict) -> dict:
    """``row`` with ``auto_impl`` (what ``impl="auto"`` runs at its density and token count),
    ``auto_s`` (that contender's measured time) and ``speedup = dense_s / auto_s``."""
    auto = resolve_impl("auto", density=row["nnz"] / np.prod(row["shape"]), tokens=row["tokens"])
    auto_s = row[f"{auto}_s"]
    return {**row, "auto_impl": auto, "auto_s": auto_s, "speedup": row["dense_s"] / auto_s}


def crossover(rows: list[dict], tokens: int) -> float:
    """The density above which ``"densify"`` beats ``"xla"`` at ``tokens``: per shape (model
    rows have the empty shape: one group), the geometric mean of the last grid density where XLA
    wins and the next one (the grid's end if one form wins everywhere); the median over shapes."""
    points = []
    for shape in sorted({tuple(r["shape"]) for r in rows}):
        grid = sorted((r for r in rows if tuple(r["shape"]) == shape and r["tokens"] == tokens),
                      key=lambda r: r["density"])
        wins = [r["densify_s"] < r["xla_s"] for r in grid]
        k = next((i for i in range(len(grid)) if all(wins[i:])), len(grid))
        if k in (0, len(grid)):
            points.append(grid[min(k, len(grid) - 1)]["density"])
        else:
            points.append(float(np.sqrt(grid[k - 1]["density"] * grid[k]["density"])))
    return float(np.median(points))


def bench_sddmm(shape, densities, tokens: int, repeats: int, warmup: int) -> list[dict]:
    """(b): SDDMM against ``(xᵀ dy)[rows, cols]``: time, compiled temporary / argument /
    output bytes (:data:`SDDMM_MEMORY_NOTE`), their ratio, max difference."""
    x = jax.random.normal(jax.random.key(2), (tokens, shape[0]))
    dy = jax.random.normal(jax.random.key(3), (tokens, shape[1]))

    def dense_then_gather(x, dy, rows, cols):
        return (x.T @ dy)[rows.astype(jnp.int32), cols.astype(jnp.int32)]

    def sparse_values(x, dy, w):
        return sddmm(x, dy, w)

    gather_fn, sddmm_fn = jax.jit(dense_then_gather), jax.jit(sparse_values)
    rows = []
    for density in densities:
        _, w = _random_sparse(shape, density, seed=4)
        t = interleaved_medians({"gather": lambda w=w: gather_fn(x, dy, w.rows, w.cols),
                                 "sddmm": lambda w=w: sddmm_fn(x, dy, w)}, repeats, warmup)
        mem_g = _sddmm_memory(dense_then_gather, x, dy, w.rows, w.cols)
        mem_s = _sddmm_memory(sparse_values, x, dy, w)
        diff = float(jnp.max(jnp.abs(gather_fn(x, dy, w.rows, w.cols) - sddmm_fn(x, dy, w))))
        rows.append({"shape": list(shape), "density": density, "tokens": tokens, "nnz": w.nnz,
                     "dense_gather_s": t["gather"], "sddmm_s": t["sddmm"],
                     "speedup": t["gather"] / t["sddmm"], "dense_gather_memory": mem_g,
                     "sddmm_memory": mem_s,
                     "temp_ratio": mem_s["temp_bytes"] / max(mem_g["temp_bytes"], 1),
                     "max_abs_diff": diff})
    return rows


def _forward(graphdef, params, tokens):
    return forward(graphdef, params, tokens)


FORCE = {"xla": ((1, 1.0),), "densify": ((1, 0.0),)}  # densify_rule tables forcing one form


def bench_model_crossover(root: Path, base, densities, token_counts, repeats: int,
                          warmup: int) -> list[dict]:
    """(d): the whole model's forward with every projection kernel magnitude-pruned to each
    ``densities`` (compact, unstructured), run once with every sparse product in the XLA form
    and once densified (:func:`kernels.densify_rule`), against the dense model: rows
    ``{density, tokens, dense_s, xla_s, densify_s}``. Unlike (a) the weights of 210 layers do not
    fit in cache, as in real use; :data:`kernels.ops.CPU_DENSIFY_ABOVE` is this part's
    crossover."""
    config, params, tokenizer = base
    dense = functools.partial(_forward, model_graphdef(load_model(
        save_model(root / "dense", params, model_config=config, tokenizer=tokenizer))))
    rows = []
    for density in densities:
        kept, masks = prune(config, params, method="magnitude", sparsity=1 - density,
                            structure="unstructured", verbose=False)
        model = compact_from_masks(config, kept, masks, structure="unstructured")
        loaded = load_model(save_model(root / f"d{density:g}", model.params, model_config=config,
                                       tokenizer=tokenizer, layouts=model.layouts))
        graphdef = model_graphdef(loaded)
        for tokens in token_counts:
            seq = jnp.asarray(np.random.default_rng(5).integers(
                0, config.vocab_size, (1, min(tokens, config.max_seq_len))), jnp.int32)
            fns = {"dense": functools.partial(jax.jit(dense), params, seq)}
            for form, table in FORCE.items():
                with densify_rule(table):  # a new partial: jit's trace cache keys on it
                    jitted = jax.jit(functools.partial(_forward, graphdef))
                    jax.block_until_ready(jitted(loaded.params, seq))  # traced under the rule
                fns[form] = functools.partial(jitted, loaded.params, seq)
            t = interleaved_medians(fns, repeats, warmup)
            rows.append({"shape": [], "density": density, "tokens": int(seq.shape[1]),
                         **{f"{k}_s": v for k, v in t.items()}})
            print(f"density {density:g}, {seq.shape[1]} tokens: " + ", ".join(
                f"{k} {v * 1e3:.1f} ms" for k, v in t.items()), flush=True)
    return rows


def bench_models(models: dict[str, str], token_counts, repeats: int, warmup: int) -> list[dict]:
    """(c): per checkpoint and sequence length: forward seconds, compiled memory, resident and
    on-disk bytes, and each as a ratio to the first checkpoint's."""
    loaded = {name: load_model(d) for name, d in models.items()}
    ref, rows = next(iter(loaded)), []
    for tokens in token_counts:
        fns, block = {}, []
        for name, m in loaded.items():
            t = min(tokens, m.config.max_seq_len)
            seq = jnp.asarray(np.random.default_rng(5).integers(0, m.config.vocab_size, (1, t)),
                              jnp.int32)
            fwd = functools.partial(_forward, model_graphdef(m))
            fns[name] = functools.partial(jax.jit(fwd), m.params, seq)
            block.append({"model": name, "tokens": t, "layouts": len(m.layouts),
                          **_memory(fwd, m.params, seq),
                          "resident_bytes": resident_bytes(m.params),
                          "checkpoint_bytes": checkpoint_bytes(models[name])})
        seconds = interleaved_medians(fns, repeats, warmup)
        for row in block:
            row["forward_s"] = seconds[row["model"]]
            for key in ("forward_s", "peak_bytes", "resident_bytes", "checkpoint_bytes"):
                row[f"{key}_vs_{ref}"] = row[key] / block[0][key]
        rows += block
    return rows


def standin_surrogate(params: dict, rank_ratio: float, density: float) -> dict:
    """A surrogate shaped like SALAAD's for every decoder projection kernel ``W [m, n]``: its
    best rank-⌊rank_ratio·min(m, n)⌋ part (truncated SVD) and the ⌈density·m·n⌉ largest
    entries of the residual. Speed and bytes of a deployment depend only on these sizes."""
    out = {}
    for i, layer in params["layers"].items():
        for group, linears in layer.items():
            for name, leaf in linears.items() if group in ("attn", "mlp") else ():
                w = np.asarray(leaf["kernel"], np.float64)
                r = int(rank_ratio * min(w.shape))
                u, sv, vt = np.linalg.svd(w, full_matrices=False)
                low = (u[:, :r] * sv[:r]) @ vt[:r]
                residual = w - low
                keep = np.argsort(np.abs(residual), axis=None)[::-1][:math.ceil(density * w.size)]
                sparse = np.zeros(w.size)
                sparse[keep] = residual.reshape(-1)[keep]
                out[f"layers/{i}/{group}/{name}/kernel"] = block_surrogate(
                    low, sparse.reshape(w.shape))
    return out


def standin_models(root: Path, config: LlamaConfig, params: dict, tokenizer,
                   sparsities: tuple[float, ...], budgets: tuple[float, ...],
                   rank_ratio: float, density: float) -> dict[str, str]:
    """Checkpoints under ``root`` (``{name: dir}``): the dense ``params``; their magnitude-pruned
    compact twins at each unstructured ``sparsities`` (``sparse50`` …) and at 2:4 (``nm24``);
    and HPA deployments (κ = 0.5) of :func:`standin_surrogate` at each ``budgets`` fraction of the
    constrained parameters (``slr30`` …)."""
    def save(name, model):
        out[name] = save_model(root / name, model.params, model_config=config,
                               tokenizer=tokenizer, layouts=model.layouts)

    out = {"dense": save_model(root / "dense", params, model_config=config, tokenizer=tokenizer)}
    pruned = [(f"sparse{s:.0%}"[:-1], "unstructured", s) for s in sparsities]
    for name, structure, sparsity in [*pruned, ("nm24", "2:4", 0.5)]:
        kept, masks = prune(config, params, method="magnitude", sparsity=sparsity,
                            structure=structure, verbose=False)
        save(name, compact_from_masks(config, kept, masks, structure=structure))
    surrogate = standin_surrogate(params, rank_ratio, density)
    for budget in budgets:
        allocation = allocate(surrogate, budget, 0.5, params=params, relative_to="constrained")
        save(f"slr{budget:.0%}"[:-1], compact_from_surrogate(config, params, surrogate,
                                                              allocation))
    return {k: str(v) for k, v in out.items()}


def base_model(name: str) -> tuple[LlamaConfig, dict, tokenizers.Tokenizer]:
    """``(config, params, tokenizer)`` of the stand-ins' base: a pretrained model's weights, or a
    preset's random init (``nano`` for smoke runs) with a one-word tokenizer."""
    if name in PRETRAINED:
        loaded = load_model_source("", name)
        return loaded.config, loaded.params, loaded.tokenizer
    config = LlamaConfig.preset(name)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<eos>": 0}, unk_token="<eos>"))
    return config, init_params(config, jax.random.key(0))[1], tokenizer


def _parse_models(spec: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in spec.split(",") if item]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise ValueError(f"--models must be name=DIR,name=DIR,..., got {spec!r}")
    return dict(pairs)


def run(cfg: BenchSparseConfig) -> dict:
    """The benchmarks ``cfg.parts`` names, as one JSON-ready dict."""
    repeats = 3 if cfg.quick else cfg.repeats
    warmup = min(cfg.warmup, 1) if cfg.quick else cfg.warmup
    shapes = SHAPES[1:2] if cfg.quick else SHAPES
    tokens = [64] if cfg.quick else [int(t) for t in cfg.tokens.split(",")]
    parts = csv_items(cfg.parts)
    result = {"backend": jax.default_backend(), "impl": resolve_impl("auto"),
              "repeats": repeats, "warmup": warmup, "quick": cfg.quick, "parts": parts}
    if "spmm" in parts:
        token_counts = (1, 512) if cfg.quick else SPMM_TOKENS
        result["spmm"] = bench_spmm(shapes, (0.01, 0.1) if cfg.quick else DENSITIES,
                                    token_counts, repeats, warmup)
        result["densify_above_in_cache"] = {str(t): crossover(result["spmm"], t)
                                            for t in token_counts}
    if "sddmm" in parts:
        result["sddmm_memory_note"] = SDDMM_MEMORY_NOTE
        result["sddmm"] = bench_sddmm(SHAPES[2], (0.01,) if cfg.quick else SDDMM_DENSITIES, 512,
                                      repeats, warmup)
    if "models" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            models = _parse_models(cfg.models) if cfg.models else standin_models(
                Path(tmp), *base_model(cfg.standins), _floats(cfg.sparsities),
                _floats(cfg.budgets), cfg.rank_ratio, cfg.density)
            result["models"] = bench_models(models, tokens, repeats, warmup)
    if "crossover" in parts:
        token_counts = (1, 512) if cfg.quick else SPMM_TOKENS
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_model_crossover(Path(tmp), base_model(cfg.standins),
                                         (0.1, 0.5) if cfg.quick else MODEL_DENSITIES,
                                         token_counts, repeats, warmup)
        result["model_crossover"] = rows
        result["densify_above"] = {str(t): crossover(rows, t)
                                   for t in sorted({r["tokens"] for r in rows})}
    return result


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchSparseConfig, argv)
    return report(run(cfg), cfg.out)


if __name__ == "__main__":
    main()
