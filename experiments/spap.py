"""SPAP on SmolLM2-135M: structured GLU pruning at 10–50 % MLP sparsity against the neuron
baselines, physically shrunk models, and their forward speed against dense.

    python -m experiments.spap                                   # CPU preset (SmolLM2-135M)
    python -m experiments.spap --sparsities 0.3 --methods spap,mag-neuron+refit

For every sparsity and method (``--methods``): prune every decoder block's MLP on calibration
windows of ``corpus``'s train split (:func:`admm_jax.pruning.prune`, sequential — later blocks see
the earlier blocks pruned), shrink the MLPs physically (:func:`admm_jax.spap.shrink_mlp`) and score
the shrunk model's perplexity on the validation documents of ``corpus`` and of
``transfer_corpus``. Methods:

* ``spap``: SPAP with its documented defaults (:data:`admm_jax.spap.SPAP_DEFAULTS`), uniform
  width per block; ``spap-global``: one neuron budget for the whole model
  (:func:`admm_jax.spap.global_prune`, widths from the within-layer-normalised scores);
* ``mag-neuron``, ``flap``, ``wanda-neuron``: the column-magnitude, FLAP fluctuation (with its
  bias compensation folded into the kept down rows) and Wanda-sp scores; ``+refit`` adds the
  closed-form least-squares refit of ``down_proj``.

Speed: the uniform SPAP model of every sparsity (every uniform method gives the same shapes) is
saved as a checkpoint (``runs/<name>/spap-<s>/``, loadable by ``python -m experiments.evaluate
--checkpoint DIR``) and timed against the dense model in one process
(:func:`experiments.bench_sparse.bench_models`: interleaved medians, XLA memory analysis) at
batch 1 × ``bench_tokens``; the FLOP ratio is XLA's cost analysis of the same forwards, so
``speed-up / FLOP ratio`` says how much of the saved arithmetic becomes time.

Diagnostic (:func:`removed_energy`): per baseline score, the share of each dense block's
neuron output energy ``‖H_i‖²‖W_i‖²`` that its pruned neurons carry.

Rows are cached per (method, sparsity) in ``runs/<name>/rows/`` (``--rows_dir`` elsewhere, e.g.
a committed folder, so that the sweep resumes on another machine; the speed comparison then
times models of the same widths when a SPAP checkpoint was not kept, see
:func:`shrunk_checkpoint`). ``--cached_only true`` renders the tables from the rows the cache
holds, missing ones as –, without computing them (the speed and energy parts still run).
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax._checks import check_int, check_real
from admm_jax.data import calibration_samples, corpus_meta, eval_batches
from admm_jax.models.llama import abstract_params, forward
from admm_jax.ops.projection import topk_mask
from admm_jax.pruning import capture_blocks, prune
from admm_jax.spap import SCORES, global_prune, glu_stats, kept_neurons, neuron_scores, shrink_mlp
from admm_jax.spap.methods import neurons_kept
from admm_jax.training import load_model
from admm_jax.training.checkpoint import save_model
from admm_jax.training.lm import make_nll_sum, perplexity
from experiments.bench_sparse import bench_models
from experiments.cli import csv_items, parse_config, to_dict
from experiments.loading import load_with_domains
from experiments.runs import cached_row, markdown_table, run_dir, stored_row

METHODS = ("spap", "spap-global", "mag-neuron", "mag-neuron+refit", "flap", "flap+refit",
           "wanda-neuron", "wanda-neuron+refit")


@dataclasses.dataclass(frozen=True)
class SpapConfig:
    """The SPAP experiment (module docstring)."""

    name: str = "spap-smollm2"
    runs_root: str = "runs"
    results: str = "results/spap.md"
    model: str = "smollm2"
    checkpoint: str = ""
    corpus: str = "shakespeare"
    """Calibration (train split) and first evaluation domain (validation documents)."""
    transfer_corpus: str = "kjv"
    sparsities: str = "0.1,0.2,0.3,0.4,0.5"
    methods: str = ",".join(METHODS)
    n_calibration: int = 32
    """Calibration windows; 32 × 256 = 8,192 tokens per block, enough for the refit's
    1,536-wide least squares (below ~2k tokens it overfits)."""
    calibration_len: int = 256
    eval_seq_len: int = 256
    eval_batch_size: int = 8
    eval_batches: int = 8
    bench_tokens: str = "1,512"
    """Sequence lengths (batch 1) of the speed comparison."""
    bench_repeats: int = 10
    rows_dir: str = ""
    """Directory of the per-(method, sparsity) row cache; empty = ``runs/<name>/rows``. Point it
    at a committed folder to resume the sweep on another machine."""
    cached_only: bool = False
    """Render the tables from the cached rows only; a missing (method, sparsity) shows as –."""

    def __post_init__(self):
        for s in _floats(self.sparsities):
            check_real("sparsities", s, low=0.0, high=1.0, high_open=True)
        bad = [m for m in csv_items(self.methods) if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {list(METHODS)}")
        for name in ("n_calibration", "calibration_len", "bench_repeats"):
            check_int(name, getattr(self, name), 1)


def _floats(csv: str) -> list[float]:
    return [float(s) for s in csv_items(csv)]


def pruned_model(model, calibration: np.ndarray, method: str, sparsity: float):
    """``(config, params)`` of the physically shrunk model of ``method`` at ``sparsity``."""
    if method == "spap-global":
        result = global_prune(model.config, model.params, calibration, method="spap",
                              sparsity=sparsity)
        params, masks = result.params, result.masks
    else:
        base = method.removesuffix("+refit")
        options = {} if base == "spap" else {"refit": method.endswith("+refit")}
        params, masks = prune(model.config, model.params, calibration, method=base,
                              sparsity=sparsity, **options)
    return shrink_mlp(model.config, params, kept_neurons(masks, model.config.n_layers))


def n_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def forward_flops(config, params, tokens: int) -> float:
    """XLA's FLOP count of one forward at batch 1 × ``tokens``."""
    graphdef = abstract_params(config)[0]
    seq = jnp.zeros((1, min(tokens, config.max_seq_len)), jnp.int32)
    cost = jax.jit(lambda p, s: forward(graphdef, p, s)).lower(params, seq).compile()
    analysis = cost.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


class Context:
    """What every row shares: the config, the pretrained model, corpora, calibration windows."""

    def __init__(self, cfg: SpapConfig):
        self.cfg, self.root = cfg, run_dir(cfg.runs_root, cfg.name)
        self.model, self.corpus, self.domains = load_with_domains(
            cfg.checkpoint, cfg.model, cfg.corpus, cfg.transfer_corpus)
        self.calibration = calibration_samples(self.corpus, cfg.n_calibration,
                                               cfg.calibration_len, seed=0)
        self.key = {k: v for k, v in to_dict(cfg).items()
                    if k not in ("name", "runs_root", "results", "sparsities", "methods",
                                 "bench_tokens", "bench_repeats", "rows_dir", "cached_only")}
        self.rows = Path(cfg.rows_dir) if cfg.rows_dir else self.root / "rows"

    def perplexities(self, config, params) -> dict[str, float]:
        nll_sum = make_nll_sum(abstract_params(config)[0])
        return {name: perplexity(nll_sum, params, eval_batches(
            tokens, batch_size=self.cfg.eval_batch_size, seq_len=self.cfg.eval_seq_len,
            max_batches=self.cfg.eval_batches or None)) for name, tokens in self.domains.items()}

    def save(self, directory: Path, config, params, extra: dict) -> None:
        save_model(directory, params, model_config=config, tokenizer=self.model.tokenizer,
                   meta={**corpus_meta(self.corpus), **extra})


def row(ctx: Context, method: str, sparsity: float) -> dict | None:
    """Perplexities and parameter count of one (method, sparsity); the uniform SPAP model is
    also saved for the speed comparison. With ``cached_only``: the cached row or ``None``."""

    def compute():
        config, params = pruned_model(ctx.model, ctx.calibration, method, sparsity)
        if method == "spap":
            ctx.save(ctx.root / f"spap-{sparsity:g}", config, params,
                     {"spap": {"method": method, "sparsity": sparsity}})
        out = {**ctx.perplexities(config, params), "params": n_params(params),
               "mlp_dims": list(config.mlp_dim) if isinstance(config.mlp_dim, tuple)
               else [config.mlp_dim] * config.n_layers}
        print(f"{method}@{sparsity:g}: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()
                                                      if k.endswith("ppl")),
              file=sys.stderr, flush=True)
        return out

    path = ctx.rows / f"{method}-{sparsity:g}.json"
    key = {**ctx.key, "method": method, "sparsity": sparsity}
    return stored_row(path, key) if ctx.cfg.cached_only else cached_row(path, key, compute)


def removed_energy(ctx: Context, sparsities: list[float]) -> dict[str, list[float]]:
    """Per baseline score and sparsity, one share per block of the dense MLP's output energy
    that the score's pruned neurons carry: ``Σ_{i∉K} e_i / Σ_i e_i`` with ``e_i = ‖H_i‖² ‖W_i‖²``
    (neuron ``i``'s own contribution ``‖H_i W_iᵀ‖²_F``, cross terms left out), on the dense
    model's calibration activations. A score that drops neurons with small weights but large
    activations shows up here before any refit can repair it."""
    shares: dict[str, list[float]] = {f"{score}@{s:g}": [] for score in SCORES
                                      for s in sparsities}

    def record(block):
        w = block.params["mlp"]["down_proj"]["kernel"]
        energy = np.asarray(jnp.diagonal(block.stats.gram) * jnp.sum(jnp.square(w), axis=1))
        for score in SCORES:
            importance = neuron_scores(score, w, block.stats, block.n_tokens)
            for s in sparsities:
                keep = np.asarray(topk_mask(importance, neurons_kept(energy.size, s)))
                shares[f"{score}@{s:g}"].append(float(energy[~keep].sum() / energy.sum()))
        return block.params

    capture_blocks(ctx.model.config, ctx.model.params, ctx.calibration, record, stats=glu_stats,
                   verbose=False)
    return shares


def energy_markdown(shares: dict[str, list[float]]) -> str:
    """The :func:`removed_energy` table: mean and largest share over the blocks."""
    rows = []
    for name, per_block in shares.items():
        score, sparsity = name.split("@")
        worst = int(np.argmax(per_block))
        rows.append([score, f"{float(sparsity):.0%}", float(np.mean(per_block)),
                     float(per_block[worst]), worst])
    return ("\n## Dense MLP output energy in the pruned neurons\n\n"
            "Share `Σ_{i pruned} ‖H_i‖²‖W_i‖² / Σ_i ‖H_i‖²‖W_i‖²` of each block's neurons' own "
            "output energy on the calibration tokens, dense model, by baseline score.\n\n"
            + markdown_table(["score", "MLP sparsity", "mean over blocks", "largest",
                              "block of largest"], rows))


def _saved(directory: Path) -> bool:
    return (directory / "model.json").exists() or any(directory.glob("*/model.json"))


def shrunk_checkpoint(ctx: Context, sparsity: float) -> Path:
    """The uniform SPAP checkpoint of ``sparsity`` (saved by its row), or — when that row came
    from the cache without its checkpoint — a model of the same widths from the magnitude
    selection (``mag-neuron``, seconds instead of SPAP's minutes): the forward's time, memory and
    FLOPs depend on the widths only."""
    spap = ctx.root / f"spap-{sparsity:g}"
    if _saved(spap):
        return spap
    same_widths = ctx.root / f"widths-{sparsity:g}"
    if not _saved(same_widths):
        config, params = pruned_model(ctx.model, ctx.calibration, "mag-neuron", sparsity)
        ctx.save(same_widths, config, params, {"widths_of": {"sparsity": sparsity}})
    return same_widths


def speed_rows(ctx: Context, sparsities: list[float]) -> list[dict]:
    """Forward time, memory and FLOPs of the shrunk uniform models against dense (one process)."""
    dense = ctx.root / "dense"
    if not _saved(dense):
        ctx.save(dense, ctx.model.config, ctx.model.params, {})
    models = {"dense": str(dense)} | {f"spap@{s:g}": str(shrunk_checkpoint(ctx, s))
                                      for s in sparsities}
    tokens = [int(t) for t in csv_items(ctx.cfg.bench_tokens)]
    rows = bench_models(models, tokens, ctx.cfg.bench_repeats, warmup=2)
    flops = {}
    for name, directory in models.items():
        m = load_model(directory)
        for t in tokens:
            flops[name, t] = forward_flops(m.config, m.params, t)
    for r in rows:
        r["flops"] = flops[r["model"], r["tokens"]]
        r["speedup"] = 1.0 / r["forward_s_vs_dense"]
        r["flop_ratio"] = flops["dense", r["tokens"]] / r["flops"]
        r["speedup_over_flop_ratio"] = r["speedup"] / r["flop_ratio"]
        r["checkpoint"] = Path(models[r["model"]]).name
    return rows


def _first_params(rows: list[dict | None]) -> str:
    return next((f"{r['params']:,}" for r in rows if r), "–")


def summary_markdown(ctx: Context, rows: dict, speed: list[dict], energy: dict,
                     command: str) -> str:
    cfg = ctx.cfg
    sparsities, methods = _floats(cfg.sparsities), csv_items(cfg.methods)
    names = {"ppl": Path(cfg.corpus).name, "transfer_ppl": Path(cfg.transfer_corpus).name}
    dense = rows["dense"]
    out = [f"# SPAP on {cfg.model}\n", f"Command: `{command}`\n",
           f"Calibration: {cfg.n_calibration} × {cfg.calibration_len} tokens of "
           f"`{cfg.corpus}` (train split). Dense: " + ", ".join(
               f"{names[k]} {dense[k]:.2f}" for k in names if k in dense)
           + f", {dense['params']:,} parameters.\n"]
    for key, label in names.items():
        if key not in dense:
            continue
        out.append(f"\n## {label} perplexity\n")
        out.append(markdown_table(
            ["MLP sparsity", "params", *methods],
            [[f"{s:.0%}", _first_params([rows[m, s] for m in methods]),
              *[rows[m, s][key] if rows[m, s] else "–" for m in methods]]
             for s in sparsities]))
    if speed:
        out.append("\n## Forward speed against dense (batch 1)\n")
        out.append("Timed checkpoint: `spap-<s>` is the uniform SPAP model its row saved; "
                   "`widths-<s>` stands in for it when the row came from the cache (same "
                   "per-layer widths, magnitude selection: time, memory and FLOPs depend on the "
                   "widths only).\n")
        out.append(markdown_table(
            ["model", "checkpoint", "tokens", "forward s", "speed-up", "FLOP ratio",
             "speed-up / FLOP ratio", "peak bytes vs dense"],
            [[r["model"], r["checkpoint"], r["tokens"], r["forward_s"], r["speedup"],
              r["flop_ratio"], r["speedup_over_flop_ratio"], r["peak_bytes_vs_dense"]]
             for r in speed]))
    out.append(energy_markdown(energy))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(SpapConfig, argv)
    ctx = Context(cfg)
    rows = {"dense": cached_row(ctx.rows / "dense.json", ctx.key, lambda: {
        **ctx.perplexities(ctx.model.config, ctx.model.params),
        "params": n_params(ctx.model.params)})}
    sparsities = _floats(cfg.sparsities)
    for s in sparsities:
        for m in csv_items(cfg.methods):
            rows[m, s] = row(ctx, m, s)
    speed = speed_rows(ctx, sparsities) if "spap" in csv_items(cfg.methods) else []
    energy = cached_row(ctx.rows / "energy.json", {**ctx.key, "sparsities": cfg.sparsities},
                        lambda: {"shares": removed_energy(ctx, sparsities)})["shares"]
    summary = summary_markdown(ctx, rows, speed, energy, "python -m experiments.spap "
                               + shlex.join(argv))
    (ctx.root / "summary.md").write_text(summary)
    Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.results).write_text(summary)
    print(summary)
    return {"rows": {f"{k[0]}@{k[1]:g}" if isinstance(k, tuple) else k: v
                     for k, v in rows.items()}, "speed": speed, "energy": energy}


if __name__ == "__main__":
    main()
