"""Consensus ADMM on a language model: SISA and NSISA against AdamW and Muon at equal tokens.

    python -m experiments.pisa_lm                       # tiny LLaMA, 8 clients, 4 methods
    python -m experiments.pisa_lm --methods sisa,adamw --steps 100

Data: the documents of ``sources`` (default Shakespeare's plays and the King James Bible) share
one BPE tokenizer trained on their train documents (:func:`admm_jax.data.prepare_corpus` on the
union, document split ``val_fraction``). The train documents are dealt to ``clients_per_source``
clients per source as contiguous runs in the corpus's canonical order (the Bible's books in
canonical order: Law and History, Wisdom and Prophets, …, the New Testament; Shakespeare's plays
alphabetically), so every client holds text of one source and one region of it — heterogeneous
clients. The last ``tune_fraction`` of every client's tokens is its *tuning* split; the rest is
what it trains on.

Every method sees the same batches: at step ``t`` each client draws ``batch_size`` windows of
``seq_len + 1`` tokens from its own train tokens (a pure function of ``(seed, client, t)``):

* ``sisa`` / ``nsisa``: one stochastic gradient per client at the consensus point and one
  consensus update (:mod:`admm_jax.pisa`), the objective ``Σ_i F_i`` (``F_i`` client ``i``'s mean
  next-token loss); σ grows ×10 over the run (:func:`admm_jax.pisa.sigma_interval_for`), the
  counterpart of the centralised methods' cosine decay to 0.1 × the peak learning rate;
* ``adamw``: the library's AdamW recipe (:func:`admm_jax.training.adamw`: warm-up over the first
  10 % of the steps, cosine to 0.1 ×, weight decay 0.1 on matrices, clipping at 1) on the
  concatenation of the clients' batches;
* ``muon``: ``optax.contrib.muon`` on the same batches and schedule (Newton–Schulz on every
  matrix, as NSISA does; AdamW at ``muon_adam_lr`` for the other leaves).

So all methods consume ``clients × batch_size × seq_len`` tokens per step and ``steps`` steps.
Each method's hyperparameters are chosen from :data:`GRIDS` by the perplexity of the final model
on the clients' tuning splits (train documents; the geometric mean over clients, so every client
counts equally, as in the objective); the reported numbers are the perplexity on the held-out
validation documents per source and their geometric mean (``mean``; equal token counts per
source), with curves every ``eval_every`` steps. Rows are cached per setting in
``runs/<name>/rows/`` (``--rows_dir`` elsewhere, e.g. a committed folder, to resume on another
machine).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from admm_jax._checks import check_int, check_real
from admm_jax.data import (
    Document,
    eval_batches,
    load_documents,
    prepare_corpus,
    register_corpus,
    split_documents,
)
from admm_jax.data.corpora import corpus_id, is_registered
from admm_jax.models.llama import LlamaConfig, init_params
from admm_jax.pisa import consensus_params, nsisa, sigma_interval_for, sisa, stack_clients
from admm_jax.training import OptimizerConfig, TrainConfig, adamw, lr_schedule
from admm_jax.training.lm import make_nll_sum, next_token_loss, per_client_loss, perplexity
from experiments.cli import csv_items, parse_config, to_dict
from experiments.runs import cached_row, markdown_table, run_dir

CONSENSUS = {"sisa": sisa, "nsisa": nsisa}
#: the hyperparameter grid of every method (chosen on the clients' tuning splits). Each started
#: with the two middle settings, from a 40-step pilot; a third was added wherever the tuning choice
#: fell on an edge.
GRIDS: dict[str, list[dict[str, float]]] = {
    "adamw": [dict(lr=lr) for lr in (1e-3, 3e-3, 1e-2)],
    "muon": [dict(lr=lr) for lr in (0.01, 0.03, 0.1)],
    "sisa": [dict(sigma=0.1, rho=r) for r in (300.0, 1000.0, 3000.0, 10000.0)],
    "nsisa": [dict(sigma=0.1, rho=r) for r in (30.0, 100.0, 300.0)],
}
#: final σ / initial σ of the consensus methods (and peak / final lr of the others)
DECAY = 10.0
#: σ's growth factor per interval (the interval from :func:`admm_jax.pisa.sigma_interval_for`)
SIGMA_GROWTH = 1.25


@dataclasses.dataclass(frozen=True)
class LmConfig:
    """The consensus-ADMM language-model experiment (module docstring)."""

    name: str = "pisa-lm"
    runs_root: str = "runs"
    results: str = "results/pisa-lm.md"
    model: str = "tiny"
    """Model preset (its vocabulary is the tokenizer's)."""
    sources: str = "shakespeare,kjv"
    """Corpora (registered names or paths) whose documents the clients share out, one source per
    client."""
    clients_per_source: int = 2
    methods: str = ",".join(GRIDS)
    steps: int = 200
    batch_size: int = 4
    """Windows per client per step (every method; the centralised batch is clients × this)."""
    seq_len: int = 64
    seed: int = 0
    val_fraction: float = 0.05
    tune_fraction: float = 0.05
    eval_every: int = 25
    eval_batches: int = 8
    """Batches of 8 × ``seq_len`` per evaluation and validation domain."""
    tune_batches: int = 4
    """Batches of 8 × ``seq_len`` (at most) per client's tuning split, at the end of a run."""
    muon_adam_lr: float = 3e-3
    """Muon's AdamW learning rate for the leaves it does not orthogonalise."""
    rows_dir: str = ""
    """Directory of the per-setting row cache; empty = ``runs/<name>/rows``. Point it at a
    committed folder to resume the grid on another machine."""

    def __post_init__(self):
        for name in ("clients_per_source", "steps", "batch_size", "seq_len", "eval_every",
                     "eval_batches", "tune_batches"):
            check_int(name, getattr(self, name), 1)
        for name in ("val_fraction", "tune_fraction"):
            check_real(name, getattr(self, name), low=0.0, high=1.0, low_open=True,
                       high_open=True)
        check_real("muon_adam_lr", self.muon_adam_lr, low=0.0, low_open=True)
        sources = csv_items(self.sources)
        for s in sources:
            if not (is_registered(s) or Path(s).exists()):
                raise ValueError(f"source {s!r} is neither a registered corpus nor a path")
        if len({corpus_id(s) for s in sources}) != len(sources) or len(sources) < 2:
            raise ValueError(f"sources must name at least two distinct corpora, got {sources}")
        bad = [m for m in csv_items(self.methods) if m not in GRIDS]
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {sorted(GRIDS)}")


class ClientData(NamedTuple):
    """Token streams of the experiment: per client (train and tuning) and per validation domain.

    Attributes:
        train: per client, 1-D token ids of its train part.
        tune: per client, 1-D token ids of its tuning part.
        labels: per client, ``"<source> <first document> … <last document>"``.
        val: validation documents' tokens per source.
        vocab_size: the tokenizer's vocabulary.
    """

    train: list[np.ndarray]
    tune: list[np.ndarray]
    labels: list[str]
    val: dict[str, np.ndarray]
    vocab_size: int


def _register_union(sources: list[str]) -> str:
    """Registers the union of ``sources``, documents renamed ``<corpus_id>/<name>``."""
    labels = [corpus_id(s) for s in sources]
    name = "-".join(labels)

    def loader(root: Path) -> list[Document]:
        return [Document(f"{label}/{d.name}", d.text) for s, label in zip(sources, labels)
                for d in load_documents(s, root)]

    register_corpus(name, loader, overwrite=True)
    return name


def _encode(tokenizer, documents: list[Document], eos_id: int) -> np.ndarray:
    ids = [np.append(e.ids, eos_id) for e in tokenizer.encode_batch([d.text for d in documents])]
    return np.concatenate(ids).astype(np.int32)


def client_data(cfg: LmConfig, vocab_size: int) -> ClientData:
    """The clients' and validation token streams (module docstring)."""
    sources = csv_items(cfg.sources)
    union = prepare_corpus(_register_union(sources), vocab_size=vocab_size,
                           val_fraction=cfg.val_fraction, seed=0)
    documents = load_documents(union.source)
    train_docs, val_docs = split_documents(documents, cfg.val_fraction, 0)
    order = {d.name: i for i, d in enumerate(documents)}
    train, tune, labels, val = [], [], [], {}
    for source in map(corpus_id, sources):
        mine = sorted((d for d in train_docs if d.name.startswith(source + "/")),
                      key=lambda d: order[d.name])
        if len(mine) < cfg.clients_per_source:
            raise ValueError(f"{source} has {len(mine)} train documents, fewer than "
                             f"{cfg.clients_per_source} clients")
        for group in np.array_split(np.arange(len(mine)), cfg.clients_per_source):
            docs = [mine[i] for i in group]
            tokens = _encode(union.tokenizer, docs, union.eos_id)
            cut = len(tokens) - max(cfg.seq_len + 1, int(cfg.tune_fraction * len(tokens)))
            train.append(tokens[:cut])
            tune.append(tokens[cut:])
            labels.append(f"{source}: {docs[0].name.split('/', 1)[1]} … "
                          f"{docs[-1].name.split('/', 1)[1]} ({len(docs)} docs, "
                          f"{len(tokens):,} tokens)")
        held_out = [d for d in val_docs if d.name.startswith(source + "/")]
        if not held_out:
            raise ValueError(f"the document split (val_fraction {cfg.val_fraction}) holds out no "
                             f"document of {source}; raise --val_fraction")
        val[source] = _encode(union.tokenizer, held_out, union.eos_id)
    return ClientData(train, tune, labels, val, union.vocab_size)


def _geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def client_batch(data: ClientData, cfg: LmConfig, step: int) -> np.ndarray:
    """``int32[clients, batch_size, seq_len + 1]``: client ``i``'s windows of step ``step``."""
    out = []
    for i, tokens in enumerate(data.train):
        rng = np.random.default_rng([cfg.seed, i, step])
        starts = rng.integers(0, len(tokens) - cfg.seq_len, size=cfg.batch_size)
        out.append(np.stack([tokens[s:s + cfg.seq_len + 1] for s in starts]))
    return np.stack(out)


class Method(NamedTuple):
    """A method as ``init(params) -> carry``, ``step(carry, batch) -> (carry, loss)`` (jitted)
    and ``model(carry) -> params`` (the global model)."""

    init: Callable[[dict], Any]
    step: Callable[[Any, jax.Array], tuple[Any, jax.Array]]
    model: Callable[[Any], dict]


def _train_config(cfg: LmConfig, lr: float) -> TrainConfig:
    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                       optimizer=OptimizerConfig(lr=lr, min_lr_ratio=1.0 / DECAY,
                                                 warmup_steps=max(1, cfg.steps // 10)))


def centralised(graphdef, tx: optax.GradientTransformation) -> Method:
    """One step of ``tx`` on the mean loss of the clients' batches, concatenated."""

    def loss(params, batch):
        return next_token_loss(graphdef, params, batch.reshape(-1, batch.shape[-1]))

    @jax.jit
    def step(carry, batch):
        params, state = carry
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), value

    return Method(lambda p: (p, tx.init(p)), step, lambda carry: carry[0])


def consensus(graphdef, tx: optax.GradientTransformation, m: int) -> Method:
    """One gradient per client at the consensus point and one consensus update of ``tx``."""
    loss = per_client_loss()

    @jax.jit
    def step(carry, batch):
        params, state = carry
        (_, aux), grads = jax.value_and_grad(loss, argnums=1, has_aux=True)(
            graphdef, params, batch)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), aux["client_loss"].mean()

    return Method(lambda p: (stack_clients(p, m), tx.init(stack_clients(p, m))), step,
                  lambda carry: consensus_params(carry[0]))


def make_method(cfg: LmConfig, graphdef, method: str, hp: dict, m: int) -> Method:
    if method in CONSENSUS:
        interval = sigma_interval_for(cfg.steps, SIGMA_GROWTH, DECAY)
        tx = CONSENSUS[method](sigma=hp["sigma"], rho=hp["rho"], sigma_growth=SIGMA_GROWTH,
                               sigma_interval=interval)
        return consensus(graphdef, tx, m)
    train_cfg = _train_config(cfg, hp["lr"])
    if method == "adamw":
        return centralised(graphdef, adamw(train_cfg))
    tx = optax.contrib.muon(lr_schedule(train_cfg), adam_learning_rate=cfg.muon_adam_lr)
    return centralised(graphdef, optax.chain(optax.clip_by_global_norm(1.0), tx))


def run(cfg: LmConfig, data: ClientData, method: str, hp: dict) -> dict:
    """Train one setting; perplexities on the tuning splits and validation domains."""
    model_config = LlamaConfig.preset(cfg.model, vocab_size=data.vocab_size)
    graphdef, params = init_params(model_config, jax.random.key(cfg.seed))
    algo = make_method(cfg, graphdef, method, hp, len(data.train))
    nll_sum = make_nll_sum(graphdef)

    def ppl(tokens: np.ndarray, batches: int) -> float:
        return perplexity(nll_sum, params, eval_batches(
            tokens, batch_size=8, seq_len=cfg.seq_len, max_batches=batches))

    def evaluate(final: bool) -> dict:
        out = {d: ppl(tokens, cfg.eval_batches) for d, tokens in data.val.items()}
        out["mean"] = _geomean(list(out.values()))
        if final:  # every client's tuning split, clients weighted equally
            out["tune"] = _geomean([ppl(t, cfg.tune_batches) for t in data.tune])
        return out

    carry, curve, losses, train_s = algo.init(params), [], [], 0.0
    for t in range(cfg.steps):
        start = time.perf_counter()
        carry, loss = algo.step(carry, jnp.asarray(client_batch(data, cfg, t)))
        losses.append(float(loss))
        train_s += time.perf_counter() - start
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.steps:
            params = algo.model(carry)
            curve.append({"step": t + 1, "train_loss": float(np.mean(losses[-cfg.eval_every:])),
                          **evaluate(t + 1 == cfg.steps)})
            print(f"  {method} {hp} step {t + 1} ({train_s:.0f} s): " + ", ".join(
                f"{k} {v:.4g}" for k, v in curve[-1].items() if k != "step"),
                file=sys.stderr, flush=True)
    final = curve[-1]
    return {"curve": curve, "final": final, "train_s": train_s,
            "finite": bool(np.isfinite(final["tune"]) and np.isfinite(final["mean"]))}


def cell(cfg: LmConfig, data: ClientData, rows_dir: Path, method: str) -> dict:
    """Every grid setting of ``method``; the one with the lowest tuning perplexity."""
    common = {k: v for k, v in to_dict(cfg).items()
              if k not in ("name", "runs_root", "results", "methods", "rows_dir")}
    rows = []
    for hp in GRIDS[method]:
        tag = "-".join(f"{k}{v:g}" for k, v in hp.items())
        rows.append((hp, cached_row(rows_dir / f"{method}-{tag}.json",
                                    {**common, "method": method, "hp": hp},
                                    lambda hp=hp: run(cfg, data, method, hp))))
    score = [r["final"]["tune"] if r["finite"] else np.inf for _, r in rows]
    hp, best = rows[int(np.argmin(score))]
    print(f"{method}: chose {hp}; validation perplexity {best['final']['mean']:.2f}",
          file=sys.stderr, flush=True)
    return {"hp": hp, "best": best, "grid": [(h, r["final"]["tune"]) for h, r in rows]}


def summary_markdown(cfg: LmConfig, data: ClientData, cells: dict, command: str) -> str:
    m, domains = len(data.train), [*data.val, "mean"]
    tokens = cfg.steps * m * cfg.batch_size * cfg.seq_len
    out = ["# SISA / NSISA against AdamW and Muon on a language model\n",
           f"Command: `{command}`\n",
           f"`{cfg.model}` LLaMA, {m} clients by document source, {cfg.steps} steps × {m} × "
           f"{cfg.batch_size} × {cfg.seq_len} tokens = {tokens:,} tokens for every method. "
           f"Hyperparameters chosen on the clients' tuning splits (train documents) from "
           f"`experiments.pisa_lm.GRIDS`; validation perplexity on held-out documents.\n",
           "Clients:\n", *[f"{i}. {label}" for i, label in enumerate(data.labels)], ""]
    out.append(markdown_table(
        ["method", "chosen", "tuning ppl", *[f"val ppl ({d})" for d in domains]],
        [[meth, json.dumps(c["hp"]), c["best"]["final"]["tune"],
          *[c["best"]["final"][d] for d in domains]] for meth, c in cells.items()]))
    out.append("\nTuning perplexity of every grid setting:\n")
    out.append(markdown_table(["method", "setting", "tuning ppl"],
                              [[meth, json.dumps(h), v] for meth, c in cells.items()
                               for h, v in c["grid"]]))
    return "\n".join(out) + "\n"


def plot_curves(cells: dict, domains: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.6), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for method, c in cells.items():
            curve = c["best"]["curve"]
            ax.plot([p["step"] for p in curve], [p[domain] for p in curve], label=method)
        ax.set(title=f"validation ({domain})", xlabel="step", ylabel="perplexity", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(LmConfig, argv)
    root = run_dir(cfg.runs_root, cfg.name)
    data = client_data(cfg, LlamaConfig.preset(cfg.model).vocab_size)
    rows_dir = Path(cfg.rows_dir) if cfg.rows_dir else root / "rows"
    cells = {method: cell(cfg, data, rows_dir, method) for method in csv_items(cfg.methods)}
    summary = summary_markdown(cfg, data, cells, "python -m experiments.pisa_lm "
                               + shlex.join(argv))
    results = Path(cfg.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    plot = results.with_name(results.stem + "_curves.png")
    plot_curves(cells, [*data.val, "mean"], plot)
    summary += f"\n![validation perplexity per step]({plot.name})\n"
    (root / "summary.md").write_text(summary)
    results.write_text(summary)
    print(summary)
    return cells


if __name__ == "__main__":
    main()
