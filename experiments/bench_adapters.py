"""LoRA + sparse adapters against LoRA at equal trainable parameters, in one process; JSON report.

    python -m experiments.bench_adapters                          # (a) + (b), SmolLM2-135M
    python -m experiments.bench_adapters --budgets 0.005,0.02 --batch_size 4 --seq_len 128
    python -m experiments.bench_adapters --model tiny             # (b) on a random preset model
    python -m experiments.bench_adapters --quick true             # a smoke run in seconds

Budgets. A budget ``f`` is a trainable fraction of each adapted linear ``[m, n]``: LoRA gets the
rank ``r_max = max(2, round(f·m·n/(m+n)))``, i.e. ``p = r_max·(m+n)`` trainable scalars, and the
sparse + LoRA adapter (RA-SpaRC / RoSA at train time) splits the same ``p`` in half, rank
``r = ⌊r_max/2⌋`` and ``nnz = (r_max − r)·(m+n)`` sparse entries at random fixed positions (the
relation ``s = (r_max − r)(m+n)`` of RA-SpaRC App. C.2), so the counts are exactly equal
(:func:`equal_budget`).

(a) One adapter layer ``y = x W0 + λ·(x A) B + x·Mat(E)`` on the SmolLM2-135M shapes 576×576
(q/o), 576×1536 (gate/up) and 1536×576 (down) at ``--tokens`` (batch × seq) rows: the forward +
backward (``value_and_grad`` of ``⟨y, g⟩`` for a fixed random ``g``, w.r.t. the adapter
parameters only) of ``lora`` (:class:`~admm_jax.adapters.SparseLoRA` with ``nnz = 0``),
``sparse_lora`` (the same layer with ``r`` and ``nnz``: SpMM forward, SDDMM backward) and
``dense_scatter``, the naive autograd path of RA-SpaRC App. B.1 (RoSA-style: ``E`` scattered
into the dense ``[in, out]`` kernel, one matmul, so autograd forms the dense ``xᵀ g`` and gathers
``E``'s entries), with ``sparse_lora``'s parameters. Reported: seconds, XLA ``memory_analysis``
of each compiled program, the time and temporary-bytes ratios to ``lora``, and the largest
gradient difference of ``sparse_lora`` against ``dense_scatter`` (the same function).
(b) A full fine-tuning step of ``--model`` (:func:`admm_jax.training.step.make_train_step` with
``trainable=AdapterParam``, AdamW, ``--batch_size`` × ``--seq_len`` random tokens) with adapters
on all seven projections of every block, ``lora`` and ``sparse_lora`` per budget: trainable
count, step seconds, compiled memory and the ratios to ``lora``.

How to read it: ``time_vs_lora`` / ``step_time_vs_lora`` above 1 is the sparse adapter's time
overhead (goal ≤ 1.10, RA-SpaRC reports 1.05–1.35 on GPU). ``temp_vs_lora`` compares the
compiled programs' intermediates (``temp_bytes``, arguments and outputs excluded),
``peak_vs_lora`` XLA's peak bytes (which on CPU leave the intermediates out) and
``footprint_vs_lora`` arguments + outputs − donated + intermediates (the CPU stand-in for the
peak); the goal is a peak equal to LoRA's, and the sparse adapter's integer indices are extra
arguments of ``8·nnz`` bytes. ``dense_scatter``'s ratios show what the SDDMM backward saves.
The same ratios, rounded, are printed as a table after the JSON.
Every timing is a median over ``--repeats`` rounds in which all contenders alternate
(:func:`experiments.benchmarking.interleaved_medians`), after ``--warmup`` untimed calls.
``--quick`` uses the ``nano`` preset, 64×64 and 64×172 layers at 64 tokens, 2×16 token batches,
3 rounds and at most 1 warm-up.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from admm_jax._checks import check_choice, check_int, check_real
from admm_jax.adapters import (
    AdapterInit,
    AdapterParam,
    SparseLoRA,
    adapt_params,
    adapter_param_count,
    adapter_paths,
    lora_inits,
)
from admm_jax.models.config import PRESETS
from admm_jax.models.layouts import linear_specs
from admm_jax.models.llama import LlamaConfig, abstract_params, init_params
from admm_jax.models.pretrained import PRETRAINED
from admm_jax.training.step import make_train_step
from experiments.benchmarking import interleaved_medians, report
from experiments.cli import parse_config
from experiments.loading import load_model_source
from kernels import resolve_impl

SHAPES = ((576, 576), (576, 1536), (1536, 576))
QUICK_SHAPES = ((64, 64), (64, 172))
#: Contenders of (a); (b) has the first two. The first is the reference of every ratio.
LAYER_KINDS = ("lora", "sparse_lora", "dense_scatter")
MODEL_KINDS = LAYER_KINDS[:2]
ModelKind = Literal["lora", "sparse_lora"]
GOALS = {"step_time_vs_lora": "<= 1.10 (RA-SpaRC reports 1.05-1.35 on GPU)",
         "peak_vs_lora": "== 1.00 (RA-SpaRC Table 5: the same peak memory as LoRA; on CPU read "
                         "footprint_vs_lora)"}
MEMORY_NOTE = ("XLA memory_analysis of each compiled program: temp_bytes are its intermediates "
               "(excluding arguments and outputs, given apart; alias_bytes: outputs written into "
               "donated arguments), peak_bytes XLA's peak (on CPU it leaves temporaries out), "
               "footprint_bytes = argument + output - alias + temp (all live at once); "
               "*_vs_lora = contender / lora")


@dataclasses.dataclass(frozen=True)
class BenchAdaptersConfig:
    """Sparse + LoRA adapters against LoRA of equal trainable parameters (JSON to --out)."""

    out: str = "results/bench_adapters.json"
    """JSON report path."""
    quick: bool = False
    """Smoke run: nano model, small layers and batches, 3 rounds (see the module doc)."""
    budgets: str = "0.005,0.02"
    """Trainable fractions of each adapted linear's in·out, comma-separated, each in (0, 1)."""
    tokens: int = 512
    """Rows (batch × seq) of the layer benchmark (a)."""
    model: str = "smollm2"
    """Model of (b): a pretrained name (loaded offline) or a LlamaConfig preset (random weights)."""
    batch_size: int = 4
    """Sequences per fine-tuning step (b)."""
    seq_len: int = 128
    """Tokens per sequence of (b)."""
    lr: float = 1e-4
    """AdamW learning rate of (b)."""
    repeats: int = 10
    """Timed rounds per contender (medians)."""
    warmup: int = 2
    """Untimed calls per contender first."""

    def __post_init__(self):
        for name in ("tokens", "batch_size", "seq_len", "repeats"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("warmup", self.warmup, minimum=0)
        check_real("lr", self.lr, low=0.0, low_open=True)
        check_choice("model", self.model, tuple(sorted(PRETRAINED)) + tuple(sorted(PRESETS)))
        parse_budgets(self.budgets)


def parse_budgets(spec: str) -> tuple[float, ...]:
    """``"0.005,0.02"`` → ``(0.005, 0.02)``; ``ValueError`` unless each is a number in (0, 1)."""
    try:
        budgets = tuple(float(b) for b in spec.split(","))
    except ValueError:
        raise ValueError(f"budgets must be comma-separated fractions, got {spec!r}") from None
    for b in budgets:
        check_real("budget", b, low=0.0, high=1.0, low_open=True, high_open=True)
    return budgets


class Split(NamedTuple):
    """Equal trainable budgets ``p = r_max·(m+n) = rank·(m+n) + nnz`` of one ``[m, n]`` linear.

    Attributes: ``r_max`` (LoRA's rank), ``rank`` and ``nnz`` (the sparse + LoRA adapter's),
    ``params`` (= p).
    """

    r_max: int
    rank: int
    nnz: int
    params: int


def equal_budget(shape: tuple[int, int], fraction: float) -> Split:
    """The LoRA rank ``r_max = max(2, round(f·m·n/(m+n)))`` for a trainable fraction ``f`` of
    ``m·n`` and the half/half sparse + LoRA split of the same ``p = r_max·(m+n)``: ``rank =
    ⌊r_max/2⌋``, ``nnz = (r_max − rank)·(m+n)`` (RA-SpaRC App. C.2's ``s = (r_max − r)(m+n)``).

    Raises ``ValueError`` if ``r_max`` exceeds ``min(m, n)``."""
    m, n = shape
    fraction = check_real("budget", fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    r_max = check_int(f"LoRA rank of budget {fraction} on {m}x{n}",
                      max(2, round(fraction * m * n / (m + n))), maximum=min(m, n))
    rank = r_max // 2
    return Split(r_max, rank, (r_max - rank) * (m + n), r_max * (m + n))


def random_support(shape: tuple[int, int], nnz: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)``: ``nnz`` distinct positions of an ``[m, n]`` kernel, uniformly drawn."""
    flat = rng.choice(shape[0] * shape[1], nnz, replace=False)
    return (flat // shape[1]).astype(np.int32), (flat % shape[1]).astype(np.int32)


def _random_adapter(shape: tuple[int, int], rank: int, nnz: int,
                    rng: np.random.Generator) -> AdapterInit:
    """Non-zero factors and values (so every gradient is non-trivial) at random positions."""
    def normal(*size):
        return 0.1 * rng.standard_normal(size).astype(np.float32)

    m, n = shape
    return AdapterInit(normal(m, rank), normal(rank, n), normal(nnz),
                       *random_support(shape, nnz, rng))


def _memory(compiled: jax.stages.Compiled) -> dict:
    """Temporary, argument, output, aliased (donated) and peak bytes of a compiled program
    (XLA's ``memory_analysis``) and ``footprint = argument + output − alias + temp``."""
    a = compiled.memory_analysis()
    out = {"temp_bytes": a.temp_size_in_bytes, "argument_bytes": a.argument_size_in_bytes,
           "output_bytes": a.output_size_in_bytes, "alias_bytes": a.alias_size_in_bytes,
           "peak_bytes": a.peak_memory_in_bytes}
    out = {k: int(v) for k, v in out.items()}
    out["footprint_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                              + out["temp_bytes"])
    return out


def _memory_ratios(memory: dict[str, dict]) -> dict[str, dict]:
    """``{temp, peak, footprint}_vs_lora`` of per-contender :func:`_memory` dicts."""
    return {f"{key}_vs_lora": _vs({k: m[f"{key}_bytes"] for k, m in memory.items()})
            for key in ("temp", "peak", "footprint")}


def _vs(values: dict[str, float]) -> dict[str, float | None]:
    """Each contender's value over the first one's (``lora``), the first left out; ``None``
    where the reference is 0."""
    ref, *rest = values
    return {k: values[k] / values[ref] if values[ref] else None for k in rest}


def _module_loss(graphdef: nnx.GraphDef, adapter, rest, x, g):
    """``⟨layer(x), g⟩`` of the adapter layer ``nnx.merge(graphdef, adapter, rest)``."""
    return jnp.vdot(nnx.merge(graphdef, adapter, rest)(x), g)


def _scatter_loss(params: dict, frozen: dict, x, g, *, scale: float):
    """``⟨x (W0 + Mat(E)) + λ·(x A) B, g⟩`` with ``Mat(E)`` scattered into the dense kernel:
    autograd's ``∂/∂E`` is the dense ``xᵀ g`` gathered at ``(rows, cols)`` (App. B.1's naive
    path, as in RoSA)."""
    w = frozen["kernel"].at[frozen["rows"], frozen["cols"]].add(params["values"])
    y = x @ w + ((x @ params["lora_a"]) * scale) @ params["lora_b"]
    return jnp.vdot(y, g)


def _layer_programs(shape, split: Split, x, g, rng) -> dict[str, tuple[Callable, tuple]]:
    """``{kind: (loss value_and_grad over argument 0, args)}`` of the three (a) contenders."""
    base = nnx.Linear(*shape, use_bias=False, rngs=nnx.Rngs(0))
    layers = {"lora": SparseLoRA(base, _random_adapter(shape, split.r_max, 0, rng)),
              "sparse_lora": SparseLoRA(base, _random_adapter(shape, split.rank, split.nnz, rng))}
    programs = {}
    for kind, layer in layers.items():
        graphdef, adapter, rest = nnx.split(layer, AdapterParam, ...)
        programs[kind] = (jax.value_and_grad(functools.partial(_module_loss, graphdef)),
                          (adapter, rest, x, g))
    layer = layers["sparse_lora"]
    params = {"lora_a": layer.lora_a[...], "lora_b": layer.lora_b[...],
              "values": layer.sparse.values[...]}
    frozen = {"kernel": base.kernel[...], "rows": layer.sparse.rows[...].astype(jnp.int32),
              "cols": layer.sparse.cols[...].astype(jnp.int32)}
    programs["dense_scatter"] = (jax.value_and_grad(functools.partial(
        _scatter_loss, scale=layer.scale)), (params, frozen, x, g))
    return programs


def _grad_diff(sparse_grads, scatter_grads: dict) -> float:
    """Largest ``|Δ|`` between ``sparse_lora``'s and ``dense_scatter``'s adapter gradients."""
    pure = nnx.to_pure_dict(sparse_grads)
    pairs = ((pure["lora_a"], scatter_grads["lora_a"]), (pure["lora_b"], scatter_grads["lora_b"]),
             (pure["sparse"]["values"], scatter_grads["values"]))
    return max(float(jnp.max(jnp.abs(a - b), initial=0.0)) for a, b in pairs)


def bench_layer(shape: tuple[int, int], fraction: float, tokens: int, repeats: int,
                warmup: int, seed: int = 0) -> dict:
    """(a) on one ``[in, out]`` layer and budget: per contender its trainable count, seconds
    and compiled memory; the time / temp / peak ratios to ``lora``; the gradient difference."""
    split = equal_budget(shape, fraction)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((tokens, shape[0])), jnp.float32)
    g = jnp.asarray(rng.standard_normal((tokens, shape[1])), jnp.float32)
    programs = _layer_programs(shape, split, x, g, rng)
    compiled = {k: jax.jit(fn).lower(*args).compile() for k, (fn, args) in programs.items()}
    seconds = interleaved_medians({k: functools.partial(compiled[k], *args)
                                   for k, (_, args) in programs.items()}, repeats, warmup)
    memory = {k: _memory(c) for k, c in compiled.items()}
    counts = {k: sum(int(np.size(v)) for v in jax.tree.leaves(args[0]))
              for k, (_, args) in programs.items()}
    grads = {k: compiled[k](*programs[k][1])[1] for k in ("sparse_lora", "dense_scatter")}
    return {"shape": list(shape), "tokens": tokens, "budget": fraction,
            "trainable_fraction": split.params / (shape[0] * shape[1]), **split._asdict(),
            "trainable_params": counts, "seconds": seconds, "memory": memory,
            "time_vs_lora": _vs(seconds), **_memory_ratios(memory),
            "grad_max_abs_diff": _grad_diff(grads["sparse_lora"], grads["dense_scatter"])}


def base_model(name: str) -> tuple[LlamaConfig, nnx.GraphDef, dict]:
    """``(config, graphdef, params)`` of a pretrained model (:func:`load_model_source`) or of
    a :class:`LlamaConfig` preset with random weights."""
    if name in PRETRAINED:
        loaded = load_model_source("", name)
        return loaded.config, abstract_params(loaded.config)[0], loaded.params
    config = LlamaConfig.preset(name)
    return (config, *init_params(config, jax.random.key(0)))


def model_inits(graphdef: nnx.GraphDef, params: dict, fraction: float, kind: ModelKind,
                seed: int = 0) -> dict[str, AdapterInit]:
    """Standard-LoRA initialisations (``B = 0``, ``E = 0``) of every projection of every block
    at budget ``fraction`` (:func:`equal_budget` per linear): rank ``r_max`` for ``lora``, rank
    ``r`` and ``nnz`` random fixed positions for ``sparse_lora``."""
    check_choice("kind", kind, MODEL_KINDS)
    model = nnx.merge(graphdef, params)
    specs, rng = linear_specs(model.config), np.random.default_rng(seed)
    ranks, indices = {}, {}
    for path in adapter_paths(model.config):
        shape = (specs[path].in_features, specs[path].out_features)
        split = equal_budget(shape, fraction)
        ranks[path] = split.r_max if kind == "lora" else split.rank
        if kind == "sparse_lora":
            indices[path] = random_support(shape, split.nnz, rng)
    return lora_inits(model, ranks, jax.random.key(seed), indices=indices)


def _step_fn(graphdef: nnx.GraphDef, params: dict, fraction: float, kind: ModelKind, lr: float,
             batch: jax.Array) -> tuple[Callable, dict, int]:
    """``(run, compiled memory, trainable count)`` of one adapted model's train step; ``run``
    advances its own copy of the params and optimizer state (the step donates them)."""
    adapted, p = adapt_params(graphdef, params, model_inits(graphdef, params, fraction, kind))
    train = make_train_step(adapted, optax.adamw(lr), trainable=AdapterParam)
    p = jax.tree.map(jnp.copy, p)
    state = {"params": p, "opt_state": train.init(p)}
    step = train.step.lower(state["params"], state["opt_state"], batch).compile()

    def run():
        state["params"], state["opt_state"], metrics = step(
            state["params"], state["opt_state"], batch)
        return metrics["loss"]

    return run, _memory(step), adapter_param_count(nnx.merge(adapted, state["params"]))


def bench_model(graphdef: nnx.GraphDef, params: dict, fractions: Sequence[float],
                batch: jax.Array, lr: float, repeats: int, warmup: int) -> list[dict]:
    """(b): per budget and contender the trainable count, step seconds and compiled memory of
    the adapted model's train step, and the step time / temp / peak ratios to ``lora``."""
    rows = []
    for fraction in fractions:
        runs, memory, counts = {}, {}, {}
        for kind in MODEL_KINDS:
            runs[kind], memory[kind], counts[kind] = _step_fn(graphdef, params, fraction, kind,
                                                              lr, batch)
        seconds = interleaved_medians(runs, repeats, warmup)
        rows.append({"budget": fraction, "trainable_params": counts, "step_s": seconds,
                     "memory": memory, "step_time_vs_lora": _vs(seconds),
                     **_memory_ratios(memory)})
    return rows


def _cells(row: dict, kind: str, time_key: str) -> str:
    """``kind``'s time / temp / peak / footprint ratios to ``lora`` in one table cell."""
    ratios = [row[time_key][kind]] + [row[f"{k}_vs_lora"][kind]
                                      for k in ("temp", "peak", "footprint")]
    return f"{kind} " + " ".join("n/a" if r is None else f"{r:.2f}x" for r in ratios)


def format_table(result: dict) -> str:
    """The ratios to LoRA (time, temp, peak, footprint bytes) of a :func:`run` result as text."""
    head = "time, temp, peak, footprint vs lora"
    lines = [f"(a) one adapter layer, {result['layer'][0]['tokens']} tokens: {head}"]
    for row in result["layer"]:
        cells = "  ".join(_cells(row, k, "time_vs_lora") for k in LAYER_KINDS[1:])
        lines.append(f"  {row['shape'][0]}x{row['shape'][1]} budget {row['budget']:.2%} "
                     f"lora r={row['r_max']} | r={row['rank']} nnz={row['nnz']}  {cells}")
    model = result["model"]
    lines.append(f"(b) {model['name']} train step, {model['batch_size']}x{model['seq_len']} "
                 f"tokens: {head}")
    for row in model["rows"]:
        lines.append(f"  budget {row['budget']:.2%} trainable {row['trainable_params']['lora']}  "
                     + _cells(row, "sparse_lora", "step_time_vs_lora"))
    return "\n".join(lines)


def run(cfg: BenchAdaptersConfig) -> dict:
    """Both benchmarks of ``cfg`` as one JSON-ready dict."""
    repeats = 3 if cfg.quick else cfg.repeats
    warmup = min(cfg.warmup, 1) if cfg.quick else cfg.warmup
    tokens, name = (64, "nano") if cfg.quick else (cfg.tokens, cfg.model)
    batch_size, seq_len = (2, 16) if cfg.quick else (cfg.batch_size, cfg.seq_len)
    budgets = parse_budgets(cfg.budgets)
    layer = [bench_layer(shape, b, tokens, repeats, warmup)
             for shape in (QUICK_SHAPES if cfg.quick else SHAPES) for b in budgets]
    config, graphdef, params = base_model(name)
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds {name}'s max_seq_len {config.max_seq_len}")
    specs, paths = linear_specs(config), adapter_paths(config)
    batch = jnp.asarray(np.random.default_rng(1).integers(
        0, config.vocab_size, (batch_size, seq_len + 1)), jnp.int32)
    return {"backend": jax.default_backend(), "impl": resolve_impl("auto"), "repeats": repeats,
            "warmup": warmup, "quick": cfg.quick, "goals": GOALS, "memory_note": MEMORY_NOTE,
            "layer": layer,
            "model": {"name": name, "batch_size": batch_size, "seq_len": seq_len, "lr": cfg.lr,
                      "optimizer": "adamw", "adapted_linears": len(paths),
                      "adapted_linear_params": sum(specs[p].in_features * specs[p].out_features
                                                   for p in paths),
                      "rows": bench_model(graphdef, params, budgets, batch, cfg.lr, repeats,
                                          warmup)}}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchAdaptersConfig, argv)
    result = report(run(cfg), cfg.out)
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
