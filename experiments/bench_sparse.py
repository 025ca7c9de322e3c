"""Sparse kernels and compact models against dense, side by side in one process; JSON report.

    python -m experiments.bench_sparse                       # (a) + (b) + (c) on toy stand-ins
    python -m experiments.bench_sparse --parts models --standins smollm2 --sparsities 0.5,0.9 \
        --budgets 0.3,0.5,0.7                                 # (c) on SmolLM2 stand-ins
    python -m experiments.bench_sparse --models dense=runs/x/model,elsa90=runs/x-c --tokens 1,512
    python -m experiments.bench_sparse --parts crossover --standins smollm2 --repeats 5 \
        --out results/bench_sparse_crossover.json            # (d): COO_CROSSOVER.cpu's source
    python -m experiments.bench_sparse --parts formats,memory --out results/bench_block.json
    python -m experiments.bench_sparse --parts blockmodel --standins smollm2 --tokens 1,512 \
        --out results/bench_block_model.json                # (g)
    python -m experiments.bench_sparse --device true --out results/bench_sparse_<gpu>.json
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

(d) The crossover that ``kernels.COO_CROSSOVER.cpu`` holds (``densify_above``): the
``--standins`` model magnitude-pruned to 3–70 % density, its forward with every sparse product in
the XLA form against every one densified (a :class:`kernels.DensifyRule` set on the
layers), at 1–512 tokens.

(e) Formats: dense ``x @ W`` against COO and BSR (16 × 16 and 32 × 32 tiles) at the same
sparsity (50 / 70 / 90 %) on the SmolLM2 layer shapes, at 1 and 512 tokens, forward and forward
+ backward (both gradients), each sparse form in the platform's sparse kernel (XLA on CPU,
Pallas on GPU / TPU), and which form the default :class:`kernels.DensifyRule` would run.
(f) Backward memory: the compiled temporaries of a 576 × 1536 layer's forward + backward, COO and
BSR16 at 1–10 % density and 1–2,048 tokens, against the dense gradient's ``4·n_in·n_out`` bytes.
(g) Block model: SmolLM2 pruned by SparseGPT to ``--block_sparsity`` unstructured and in 16 × 16
blocks, held-out perplexity of both and the compact (COO / BSR16) forward against dense.
(h) ``--device true`` on a GPU or TPU: (e), (f) and, per format, the sparse kernel against the
densified product at 1–50 % density and 1–512 tokens with its crossover per token count — the
measurement that replaces :class:`kernels.DensifyRule`'s GPU / TPU estimates.

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
from flax import nnx

from admm_jax._checks import check_choice, check_int, check_real
from admm_jax.data import calibration_samples, eval_batches, prepare_corpus
from admm_jax.models.compact import compact_from_masks, resident_bytes
from admm_jax.models.linears import BlockSparseLinear, SparseLinear
from admm_jax.models.llama import PRESETS, LlamaConfig, abstract_params, forward, init_params
from admm_jax.models.pretrained import PRETRAINED
from admm_jax.ops.structures import Block, parse_structure
from admm_jax.pruning import prune
from admm_jax.salaad.compact import compact_from_surrogate
from admm_jax.salaad.hpa import allocate
from admm_jax.salaad.surrogate import block_surrogate
from admm_jax.training.checkpoint import checkpoint_bytes, load_model, model_graphdef, save_model
from admm_jax.training.lm import make_nll_sum, perplexity
from experiments.benchmarking import interleaved_medians, report
from experiments.cli import csv_items, parse_config
from experiments.loading import load_model_source
from kernels import (
    DensifyRule,
    block_from_dense,
    from_dense,
    resolve_impl,
    sddmm,
    sparse_matmul,
)

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))
DENSITIES = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.3, 0.5)
SPMM_TOKENS = (1, 8, 64, 512)
SDDMM_DENSITIES = (0.001, 0.005, 0.01, 0.02, 0.05)
MODEL_DENSITIES = (0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
FORMAT_SPARSITIES = (0.5, 0.7, 0.9)
FORMAT_TOKENS = (1, 512)
MEMORY_DENSITIES = (0.01, 0.02, 0.05, 0.1)
MEMORY_TOKENS = (1, 64, 512, 2048)
PARTS = ("spmm", "sddmm", "models", "crossover", "formats", "memory", "blockmodel")
SPARSE_ONLY = DensifyRule.constant(1.0)  # never densify: the platform's sparse kernels


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
    """Comma-separated benchmarks to run: spmm (a), sddmm (b), models (c), crossover (d),
    formats (e), memory (f), blockmodel (g)."""
    device: bool = False
    """Run on the present GPU or TPU: (e) and (f) with its Pallas kernels and the per-format
    crossovers (h) behind kernels.DensifyRule (refused on a CPU-only machine)."""
    crossover_structure: str = "unstructured"
    """Structure of (d)'s pruned models: unstructured (COO layers) or block16 / block32 (BSR)."""
    crossover_densities: str = ",".join(map(str, MODEL_DENSITIES))
    """Densities of (d)'s pruned models."""
    crossover_tokens: str = ",".join(map(str, SPMM_TOKENS))
    """Sequence lengths of (d)."""
    corpus: str = "shakespeare"
    """Corpus of (g): calibration from its train split, perplexity on its validation split."""
    block_sparsity: float = 0.9
    """Sparsity of (g)'s SparseGPT models (unstructured and 16 × 16 blocks)."""

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
        check_real("block_sparsity", self.block_sparsity, low=0.0, high=1.0, high_open=True)
        for density in _floats(self.crossover_densities):
            check_real("crossover_densities", density, low=0.0, high=1.0, low_open=True)
        for tokens in csv_items(self.crossover_tokens):
            check_int("crossover_tokens", int(tokens), minimum=1)
        if self.crossover_structure != "unstructured" and not isinstance(
                parse_structure(self.crossover_structure), Block):
            raise ValueError(f"crossover_structure must be 'unstructured' or 'blockB' (e.g. "
                             f"'block16'), got {self.crossover_structure!r}")


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


def crossover(rows: list[dict], tokens: int, sparse_key: str = "xla_s") -> float:
    """The density above which ``"densify"`` beats the sparse form (``rows[i][sparse_key]``) at
    ``tokens``: per shape (model rows have the empty shape: one group), the geometric mean of the
    last grid density where the sparse form wins and the next one (the grid's end if one form
    wins everywhere); the median over shapes."""
    points = []
    for shape in sorted({tuple(r["shape"]) for r in rows}):
        grid = sorted((r for r in rows if tuple(r["shape"]) == shape and r["tokens"] == tokens),
                      key=lambda r: r["density"])
        wins = [r["densify_s"] < r[sparse_key] for r in grid]
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


FORCE = {"xla": SPARSE_ONLY, "densify": DensifyRule.constant(0.0)}  # rules forcing one form


def with_rule(graphdef: nnx.GraphDef, params, rule: DensifyRule) -> nnx.GraphDef:
    """``graphdef`` with every compact sparse layer's dispatch rule set to ``rule``."""
    model = nnx.merge(graphdef, params)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, (SparseLinear, BlockSparseLinear)):
            module.rule = rule
    return nnx.split(model)[0]


def bench_model_crossover(root: Path, base, densities, token_counts, repeats: int,
                          warmup: int, structure: str = "unstructured") -> list[dict]:
    """(d): the whole model's forward with every projection kernel magnitude-pruned to each
    ``densities`` (compact: COO for ``"unstructured"``, BSR for ``"block16"`` …), run once with
    every sparse product in the XLA form and once densified (the layers'
    :class:`kernels.DensifyRule`), against the dense model: rows ``{density, tokens, dense_s,
    xla_s, densify_s}``. Unlike (a) the weights of 210 layers do not fit in cache, as in real
    use; ``kernels.COO_CROSSOVER.cpu`` and ``kernels.BLOCK_CROSSOVER.cpu`` are this part's
    crossovers."""
    config, params, tokenizer = base
    dense = functools.partial(_forward, model_graphdef(load_model(
        save_model(root / "dense", params, model_config=config, tokenizer=tokenizer))))
    rows = []
    for density in densities:
        kept, masks = prune(config, params, method="magnitude", sparsity=1 - density,
                            structure=structure, verbose=False)
        model = compact_from_masks(config, kept, masks, structure=structure)
        loaded = load_model(save_model(root / f"d{density:g}", model.params, model_config=config,
                                       tokenizer=tokenizer, layouts=model.layouts))
        graphdef = model_graphdef(loaded)
        for tokens in token_counts:
            seq = jnp.asarray(np.random.default_rng(5).integers(
                0, config.vocab_size, (1, min(tokens, config.max_seq_len))), jnp.int32)
            fns = {"dense": functools.partial(jax.jit(dense), params, seq)}
            for form, rule in FORCE.items():
                jitted = jax.jit(functools.partial(_forward, with_rule(graphdef, loaded.params,
                                                                       rule)))
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


def random_formats(shape: tuple[int, int], sparsity: float, seed: int) -> dict:
    """The same-sparsity contenders of (e): a dense ``W``, a random unstructured COO support and
    random ``b × b`` block supports (b = 16, 32) keeping ``1 − sparsity`` of the tiles."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    out = {"dense": jnp.asarray(w), "coo": from_dense(w, rng.random(shape) >= sparsity)}
    for b in (16, 32):
        grid = (-(-shape[0] // b), -(-shape[1] // b))
        keep = np.kron(rng.random(grid) >= sparsity, np.ones((b, b), bool))
        out[f"bsr{b}"] = block_from_dense(w, keep[:shape[0], :shape[1]], block_size=b)
    return out


def _product(w, rule: DensifyRule):
    """``x ↦ x @ W`` for a dense array or a sparse matrix (the platform's sparse kernel)."""
    if isinstance(w, jax.Array):
        return lambda x, w: x @ w
    return lambda x, w: sparse_matmul(x, w, rule=rule)


def _values(w):
    return w if isinstance(w, jax.Array) else w.values


def _with_backward(product):
    """``(x, W, dy) ↦ (∂/∂x, ∂/∂values)`` of ``⟨x @ W, dy⟩``: the forward and both gradients
    (a sparse ``W``'s indices are not differentiated)."""
    def loss(x, values, w, dy):
        w = values if isinstance(w, jax.Array) else w.with_values(values)
        return jnp.sum(product(x, w) * dy)

    grad = jax.grad(loss, argnums=(0, 1))
    return lambda x, w, dy: grad(x, _values(w), w, dy)


def bench_formats(shapes, sparsities, token_counts, repeats: int, warmup: int,
                  rule: DensifyRule = SPARSE_ONLY) -> list[dict]:
    """(e): dense ``x @ W`` against COO and BSR (b = 16, 32) at the same sparsity, forward and
    forward + backward, each sparse form in the platform's sparse kernel (``rule``): rows
    ``{shape, sparsity, tokens, pass, dense_s, coo_s, bsr16_s, bsr32_s, <form>_vs_dense,
    <form>_auto}`` (``_auto``: what the default rule would run there)."""
    rows = []
    for shape in shapes:
        for sparsity in sparsities:
            ws = random_formats(shape, sparsity, seed=0)
            for tokens in token_counts:
                x = jax.random.normal(jax.random.key(1), (tokens, shape[0]))
                dy = jax.random.normal(jax.random.key(2), (tokens, shape[1]))
                for name, wrap, args in (("forward", lambda f: f, (x,)),
                                         ("forward+backward", _with_backward, (x, dy))):
                    fns = {k: functools.partial(jax.jit(wrap(_product(w, rule))), args[0], w,
                                                *args[1:]) for k, w in ws.items()}
                    t = interleaved_medians(fns, repeats, warmup)
                    row = {"shape": list(shape), "sparsity": sparsity, "tokens": tokens,
                           "pass": name, **{f"{k}_s": v for k, v in t.items()}}
                    for k, w in ws.items():
                        if k != "dense":
                            row[f"{k}_vs_dense"] = t[k] / t["dense"]
                            row[f"{k}_auto"] = resolve_impl(
                                density=w.density, tokens=tokens,
                                fmt="block" if k.startswith("bsr") else "coo")
                    rows.append(row)
                    print(f"{shape} {sparsity:.0%} {tokens} tok {name}: " + ", ".join(
                        f"{k} {v * 1e3:.2f} ms" for k, v in t.items()), flush=True)
    return rows


MEMORY_NOTE = ("temp_bytes: compiled intermediates (XLA memory_analysis temp_size_in_bytes) of "
               "the layer's forward + backward (jax.grad of <x @ W, dy> in x and W), arguments "
               "and outputs excluded; dense_gradient_bytes = 4·n_in·n_out, the dense gradient "
               "x^T dy the sparse backward never forms")


def bench_backward_memory(shape, densities, token_counts,
                          rule: DensifyRule = SPARSE_ONLY) -> list[dict]:
    """(f): compiled temporaries of a layer's forward + backward for COO and BSR16 at each
    density and token count, against the dense gradient's bytes (:data:`MEMORY_NOTE`)."""
    rows, grad_bytes = [], 4 * shape[0] * shape[1]
    for density in densities:
        ws = random_formats(shape, 1 - density, seed=3)
        for tokens in token_counts:
            x = jnp.zeros((tokens, shape[0]))
            dy = jnp.zeros((tokens, shape[1]))
            row = {"shape": list(shape), "density": density, "tokens": tokens,
                   "dense_gradient_bytes": grad_bytes}
            for k in ("dense", "coo", "bsr16"):
                temp = _memory(_with_backward(_product(ws[k], rule)), x, ws[k], dy)["temp_bytes"]
                row[f"{k}_temp_bytes"] = temp
                row[f"{k}_vs_dense_gradient"] = temp / grad_bytes
            rows.append(row)
    return rows


def bench_block_model(root: Path, name: str, corpus: str, sparsity: float, token_counts,
                      repeats: int, warmup: int, n_eval_batches: int = 4) -> dict:
    """(g): the pretrained ``name`` pruned by SparseGPT to ``sparsity`` unstructured and in
    16 × 16 blocks (32 × 256 calibration tokens of ``corpus``'s train split), each stored compact
    (COO / BSR16): held-out perplexity on ``n_eval_batches`` × 8 × 256 validation tokens, and the
    forward latency and bytes against the dense model (:func:`bench_models`)."""
    loaded = load_model_source("", name)
    config, params, tokenizer = loaded.config, loaded.params, loaded.tokenizer
    data = prepare_corpus(corpus, tokenizer=tokenizer)
    calibration = calibration_samples(data, 32, 256, seed=0)
    windows = list(eval_batches(data.val, batch_size=8, seq_len=min(256, config.max_seq_len),
                                max_batches=n_eval_batches))
    nll_sum = make_nll_sum(abstract_params(config)[0])
    ppl = {"dense": perplexity(nll_sum, params, windows)}
    models = {"dense": str(save_model(root / "dense", params, model_config=config,
                                      tokenizer=tokenizer))}
    for label, structure in (("coo", "unstructured"), ("bsr16", "block16")):
        kept, masks = prune(config, params, calibration, method="sparsegpt", sparsity=sparsity,
                            structure=structure, verbose=False)
        ppl[label] = perplexity(nll_sum, kept, windows)
        model = compact_from_masks(config, kept, masks, structure=structure)
        models[label] = str(save_model(root / label, model.params, model_config=config,
                                       tokenizer=tokenizer, layouts=model.layouts))
        print(f"sparsegpt {structure} {sparsity:.0%}: perplexity {ppl[label]:.1f}", flush=True)
    return {"model": name, "corpus": corpus, "method": "sparsegpt", "sparsity": sparsity,
            "eval_tokens": sum(int(np.prod(w.shape)) for w in windows), "perplexity": ppl,
            "forward": bench_models(models, token_counts, repeats, warmup)}


def bench_device_crossover(shape, densities, token_counts, repeats: int,
                           warmup: int) -> dict:
    """(h, ``--device``): per format, the platform's sparse kernel against the densified product
    at each density and token count, and the crossover density per token count
    (:func:`crossover`) — the measurement behind :class:`kernels.DensifyRule`'s GPU/TPU tables."""
    out = {}
    for fmt, form in (("coo", "coo"), ("block", "bsr16")):
        rows = []
        for density in densities:
            w = random_formats(shape, 1 - density, seed=6)[form]
            for tokens in token_counts:
                x = jax.random.normal(jax.random.key(1), (tokens, shape[0]))
                fns = {k: functools.partial(jax.jit(_product(w, rule)), x, w)
                       for k, rule in (("sparse", SPARSE_ONLY),
                                       ("densify", DensifyRule.constant(0.0)))}
                t = interleaved_medians(fns, repeats, warmup)
                rows.append({"shape": list(shape), "density": density, "tokens": tokens,
                             "sparse_s": t["sparse"], "densify_s": t["densify"]})
        out[fmt] = {"rows": rows, "densify_above": {
            str(t): crossover(rows, t, sparse_key="sparse_s") for t in token_counts}}
    return out


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
    if cfg.device:
        if jax.default_backend() == "cpu":
            raise ValueError("--device true needs a GPU or TPU; this machine's JAX backend is "
                             "cpu (run the CPU parts without --device)")
        parts = ["formats", "memory", "device_crossover"]
    result = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
              "impl": resolve_impl("auto"), "repeats": repeats, "warmup": warmup,
              "quick": cfg.quick, "parts": parts}
    if "formats" in parts:
        result["formats"] = bench_formats(shapes, (0.9,) if cfg.quick else FORMAT_SPARSITIES,
                                          FORMAT_TOKENS, repeats, warmup)
    if "memory" in parts:
        result["memory_note"] = MEMORY_NOTE
        result["memory"] = bench_backward_memory(SHAPES[2], (0.01,) if cfg.quick else
                                                 MEMORY_DENSITIES, (1, 64) if cfg.quick else
                                                 MEMORY_TOKENS)
    if "device_crossover" in parts:
        result["device_crossover"] = bench_device_crossover(
            SHAPES[2], (0.01, 0.1) if cfg.quick else DENSITIES, (1, 512) if cfg.quick else
            SPMM_TOKENS, repeats, warmup)
    if "blockmodel" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            result["blockmodel"] = bench_block_model(
                Path(tmp), cfg.standins, cfg.corpus, cfg.block_sparsity, tokens, repeats, warmup,
                n_eval_batches=1 if cfg.quick else 4)
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
        token_counts = (1, 512) if cfg.quick else [int(t) for t in
                                                   csv_items(cfg.crossover_tokens)]
        densities = (0.1, 0.5) if cfg.quick else _floats(cfg.crossover_densities)
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_model_crossover(Path(tmp), base_model(cfg.standins), densities,
                                         token_counts, repeats, warmup, cfg.crossover_structure)
        result["crossover_structure"] = cfg.crossover_structure
        result["model_crossover"] = rows
        result["densify_above"] = {str(t): crossover(rows, t)
                                   for t in sorted({r["tokens"] for r in rows})}
    return result


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchSparseConfig, argv)
    return report(run(cfg), cfg.out)


if __name__ == "__main__":
    main()
