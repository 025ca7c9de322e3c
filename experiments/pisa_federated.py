"""Federated digits: PISA, SISA and NSISA against FedAvg, FedProx and centralised Adam.

    python -m experiments.pisa_federated            # 3 partitions × 6 methods × 3 seeds
    python -m experiments.pisa_federated --partitions one-label --seeds 0

scikit-learn's 8×8 digits (1,797 images, 10 classes) are split once (seed 0, stratified) into a
test set (``test_fraction``), a validation set (``val_fraction`` of the rest) and the fit set the
``clients`` share, partitioned three ways:

* ``iid``: a random equal split;
* ``dirichlet``: per class, client shares drawn from Dirichlet(``dirichlet_alpha``) (redrawn until
  every client holds at least ``batch_size`` images);
* ``one-label``: client ``i`` holds every image of class ``i`` (needs 10 clients).

The model is a one-hidden-layer MLP (``hidden`` tanh units). Every method runs ``rounds``
communication rounds from the same initialisation:

* ``pisa`` / ``sisa`` / ``nsisa``: one stochastic gradient per client per round (a batch of
  ``batch_size`` of its own images) and one consensus update (:mod:`admm_jax.pisa`); client ``i``'s
  loss is weighted by ``m·n_i/n`` so that ``Σ_i F_i`` is the loss of the whole fit set;
* ``fedavg``: ``local_steps`` SGD steps per client per round from the global model, then the
  average weighted by ``n_i/n`` (McMahan et al., 2017); ``fedprox``: the same with the proximal
  term ``μ/2‖w − w_global‖²`` in every local step (Li et al., 2020);
* ``adam``: centralised Adam, one step per round on ``clients × batch_size`` images drawn from the
  whole fit set — the consensus methods' gradient evaluations per round.

Hyperparameters are chosen per partition and method from :data:`GRIDS` by validation accuracy
(mean of the last three evaluations) on seed 0 only; the chosen setting then runs on every seed
(initialisation, partition and batches change with the seed; the test split never does) and the
table reports final test accuracy, mean ± std over seeds. Rows are cached per setting in
``runs/<name>/rows/``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from admm_jax._checks import check_int, check_real
from admm_jax.pisa import client_value_and_grad, consensus_params, nsisa, pisa, sisa, stack_clients
from experiments.cli import csv_items, parse_config, to_dict
from experiments.runs import cached_row, markdown_table, run_dir

CONSENSUS = {"pisa": pisa, "sisa": sisa, "nsisa": nsisa}
#: the hyperparameter grid of every method (chosen on validation accuracy, seed 0)
GRIDS: dict[str, list[dict[str, float]]] = {
    "pisa": [dict(sigma=s, rho=r) for s in (0.01, 0.03, 0.1, 0.3, 1.0) for r in (1.0, 10.0)],
    "sisa": [dict(sigma=s, rho=r) for s in (0.1, 1.0) for r in (30.0, 100.0, 300.0, 1000.0)],
    "nsisa": [dict(sigma=s, rho=r) for s in (0.1, 1.0) for r in (3.0, 10.0, 30.0, 100.0, 300.0)],
    "fedavg": [dict(lr=lr) for lr in (0.03, 0.1, 0.3, 1.0, 3.0)],
    "fedprox": [dict(lr=lr, mu=mu) for lr in (0.1, 0.3, 1.0, 3.0) for mu in (0.01, 0.1)],
    "adam": [dict(lr=lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)],
}
PARTITIONS = ("iid", "dirichlet", "one-label")


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
    """The federated digits experiment (module docstring)."""

    name: str = "pisa-federated"
    runs_root: str = "runs"
    results: str = "results/pisa.md"
    partitions: str = ",".join(PARTITIONS)
    methods: str = ",".join(GRIDS)
    clients: int = 10
    dirichlet_alpha: float = 0.1
    rounds: int = 200
    batch_size: int = 32
    """Images per client per gradient (every method)."""
    local_steps: int = 5
    """FedAvg / FedProx local SGD steps per round."""
    hidden: int = 64
    seeds: str = "0,1,2"
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    eval_every: int = 10

    def __post_init__(self):
        for name in ("clients", "rounds", "batch_size", "local_steps", "hidden", "eval_every"):
            check_int(name, getattr(self, name), 1)
        check_real("dirichlet_alpha", self.dirichlet_alpha, low=0.0, low_open=True)
        for name in ("test_fraction", "val_fraction"):
            check_real(name, getattr(self, name), low=0.0, high=1.0, low_open=True,
                       high_open=True)
        for p in csv_items(self.partitions):
            if p not in PARTITIONS:
                raise ValueError(f"unknown partition {p!r}; choose from {PARTITIONS}")
        for m in csv_items(self.methods):
            if m not in GRIDS:
                raise ValueError(f"unknown method {m!r}; choose from {sorted(GRIDS)}")


class Split(NamedTuple):
    """Features ``f32[n, 64]`` in [0, 1] and labels ``int32[n]`` of the fit, val and test sets."""

    fit: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def digits_split(cfg: FederatedConfig) -> Split:
    """The fixed stratified fit / val / test split of scikit-learn's digits (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=cfg.test_fraction, stratify=y, random_state=0)
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_rest, y_rest, test_size=cfg.val_fraction, stratify=y_rest, random_state=0)
    return Split((x_fit, y_fit), (x_val, y_val), (x_test, y_test))


def partition(labels: np.ndarray, cfg: FederatedConfig, kind: str,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Index arrays of the fit set per client (module docstring)."""
    m = cfg.clients
    if kind == "iid":
        return np.array_split(rng.permutation(len(labels)), m)
    classes = np.unique(labels)
    if kind == "one-label":
        if m != len(classes):
            raise ValueError(f"the one-label partition needs {len(classes)} clients, got {m}")
        return [np.flatnonzero(labels == c) for c in classes]
    for _ in range(1000):
        parts = [[] for _ in range(m)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(m, cfg.dirichlet_alpha))) * len(idx))
            for i, chunk in enumerate(np.split(idx, cuts.astype(int)[:-1])):
                parts[i].extend(chunk)
        if min(len(p) for p in parts) >= cfg.batch_size:
            return [np.sort(np.asarray(p, np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({cfg.dirichlet_alpha}) partition gave every client "
                     f"{cfg.batch_size} images in 1000 draws; lower --batch_size")


def init_mlp(key: jax.Array, hidden: int, n_in: int = 64, n_out: int = 10) -> dict:
    """Glorot-normal weights, zero biases."""
    k1, k2 = jax.random.split(key)
    init = jax.nn.initializers.glorot_normal()
    return {"w1": init(k1, (n_in, hidden)), "b1": jnp.zeros(hidden),
            "w2": init(k2, (hidden, n_out)), "b2": jnp.zeros(n_out)}


def logits(params: dict, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def loss(params: dict, batch: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    """``weight · mean cross-entropy`` of one batch ``(x, y, weight)``."""
    x, y, weight = batch
    return weight * optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def accuracy(params: dict, data: tuple[np.ndarray, np.ndarray]) -> float:
    return float(jnp.mean(jnp.argmax(logits(params, jnp.asarray(data[0])), -1) == data[1]))


class Clients(NamedTuple):
    """The fit set on device and each client's padded index list ``int[m, max n_i]``."""

    x: jax.Array
    y: jax.Array
    index: jax.Array
    sizes: jax.Array

    def batch(self, key: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
        """``size`` images per client, drawn with replacement from its own: ``[m, size, ...]``."""
        m = self.index.shape[0]
        picks = jax.random.randint(key, (m, size), 0, self.sizes[:, None])
        idx = self.index[jnp.arange(m)[:, None], picks]
        return self.x[idx], self.y[idx]


def make_clients(fit: tuple[np.ndarray, np.ndarray], parts: list[np.ndarray]) -> Clients:
    width = max(len(p) for p in parts)
    index = np.stack([np.pad(p, (0, width - len(p)), mode="edge") for p in parts])
    return Clients(jnp.asarray(fit[0]), jnp.asarray(fit[1]), jnp.asarray(index),
                   jnp.asarray([len(p) for p in parts]))


Round = Callable[[Any, jax.Array], Any]


def consensus_round(method: str, hp: dict, clients: Clients, cfg: FederatedConfig
                    ) -> tuple[Callable[[dict], Any], Round, Callable[[Any], dict]]:
    """``(init, round, model)`` of PISA / SISA / NSISA: one gradient per client per round."""
    tx = CONSENSUS[method](sigma=hp["sigma"], rho=hp["rho"])
    sizes = clients.sizes.astype(jnp.float32)
    weight = cfg.clients * sizes / jnp.sum(sizes)  # Σ_i F_i = the fit set's loss
    grad = client_value_and_grad(loss)

    def init(params):
        params = stack_clients(params, cfg.clients)
        return params, tx.init(params)

    def step(carry, key):
        params, state = carry
        x, y = clients.batch(key, cfg.batch_size)
        updates, state = tx.update(grad(params, (x, y, weight))[1], state, params)
        return optax.apply_updates(params, updates), state

    return init, step, lambda carry: consensus_params(carry[0])


def local_sgd_round(hp: dict, clients: Clients, cfg: FederatedConfig
                    ) -> tuple[Callable[[dict], Any], Round, Callable[[Any], dict]]:
    """FedAvg (``mu`` absent or 0) / FedProx: ``local_steps`` SGD steps per client, then the
    average weighted by client size."""
    lr, mu = hp["lr"], hp.get("mu", 0.0)
    share = clients.sizes / jnp.sum(clients.sizes)

    def local(w_global, x, y):
        def sgd(w, batch):
            g = jax.grad(loss)(w, (*batch, 1.0))
            return jax.tree.map(lambda p, gp, p0: p - lr * (gp + mu * (p - p0)), w, g,
                                w_global), None
        return jax.lax.scan(sgd, w_global, (x, y))[0]

    def step(w, key):
        keys = jax.random.split(key, cfg.local_steps)
        x, y = jax.vmap(lambda k: clients.batch(k, cfg.batch_size))(keys)  # [E, m, B, ...]
        local_models = jax.vmap(local, in_axes=(None, 1, 1))(w, x, y)
        return jax.tree.map(lambda p: jnp.tensordot(share, p, axes=1), local_models)

    return (lambda params: params), step, lambda w: w


def adam_round(hp: dict, clients: Clients, cfg: FederatedConfig
               ) -> tuple[Callable[[dict], Any], Round, Callable[[Any], dict]]:
    """Centralised Adam: one step per round on ``clients × batch_size`` fit-set images."""
    tx = optax.adam(hp["lr"])
    n = clients.x.shape[0]

    def step(carry, key):
        params, state = carry
        idx = jax.random.randint(key, (cfg.clients * cfg.batch_size,), 0, n)
        g = jax.grad(loss)(params, (clients.x[idx], clients.y[idx], 1.0))
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    return (lambda params: (params, tx.init(params))), step, lambda carry: carry[0]


def run(cfg: FederatedConfig, split: Split, kind: str, method: str, hp: dict,
        seed: int) -> dict:
    """Validation and test accuracy of the global model every ``eval_every`` rounds."""
    rng = np.random.default_rng(seed)
    clients = make_clients(split.fit, partition(split.fit[1], cfg, kind, rng))
    if method in CONSENSUS:
        init, step, model = consensus_round(method, hp, clients, cfg)
    elif method == "adam":
        init, step, model = adam_round(hp, clients, cfg)
    else:
        init, step, model = local_sgd_round(hp, clients, cfg)
    key, init_key = jax.random.split(jax.random.key(seed))
    carry = init(init_mlp(init_key, cfg.hidden))
    chunk = jax.jit(lambda c, keys: jax.lax.scan(lambda c, k: (step(c, k), None), c, keys)[0])
    rounds, val, test = [], [], []
    for start in range(0, cfg.rounds, cfg.eval_every):
        n = min(cfg.eval_every, cfg.rounds - start)
        carry = chunk(carry, jax.random.split(jax.random.fold_in(key, start), n))
        params = model(carry)
        rounds.append(start + n)
        val.append(accuracy(params, split.val))
        test.append(accuracy(params, split.test))
    finite = all(bool(np.isfinite(x).all()) for x in jax.tree_util.tree_leaves(params))
    return {"rounds": rounds, "val": val, "test": test, "finite": finite}


def cell(cfg: FederatedConfig, split: Split, root: Path, kind: str, method: str
         ) -> dict:
    """The tuned setting of ``method`` on partition ``kind`` and its runs on every seed."""
    common = {k: v for k, v in to_dict(cfg).items()
              if k not in ("name", "runs_root", "results", "partitions", "methods", "seeds")}

    def row(hp, seed):
        key = {**common, "partition": kind, "method": method, "hp": hp, "seed": seed}
        tag = "-".join(f"{k}{v:g}" for k, v in hp.items())
        return cached_row(root / "rows" / f"{kind}-{method}-{tag}-s{seed}.json", key,
                          lambda: run(cfg, split, kind, method, hp, seed))

    tuning = [(hp, row(hp, 0)) for hp in GRIDS[method]]
    best_hp, _ = max(tuning, key=lambda t: float(np.mean(t[1]["val"][-3:])))
    runs = [row(best_hp, int(s)) for s in csv_items(cfg.seeds)]
    final = [r["test"][-1] for r in runs]
    print(f"{kind:>9} {method:>7}: {best_hp} test {np.mean(final):.3f} ± {np.std(final):.3f}",
          file=sys.stderr, flush=True)
    return {"hp": best_hp, "test": final, "curves": [r["test"] for r in runs],
            "rounds": runs[0]["rounds"]}


def summary_markdown(cfg: FederatedConfig, cells: dict, command: str) -> str:
    kinds, methods = csv_items(cfg.partitions), csv_items(cfg.methods)
    out = ["# PISA / SISA / NSISA on federated digits\n", f"Command: `{command}`\n",
           f"{cfg.clients} clients, {cfg.rounds} rounds, batch {cfg.batch_size} per client, "
           f"MLP 64-{cfg.hidden}-10, Dirichlet α = {cfg.dirichlet_alpha}, FedAvg/FedProx "
           f"{cfg.local_steps} local steps per round. Hyperparameters chosen per partition on "
           f"validation accuracy (seed 0) from `experiments.pisa_federated.GRIDS`; final test "
           f"accuracy, mean ± std over seeds {cfg.seeds}.\n"]
    out.append(markdown_table(
        ["method", *kinds],
        [[m, *[f"{np.mean(cells[k][m]['test']):.3f} ± {np.std(cells[k][m]['test']):.3f}"
               for k in kinds]] for m in methods]))
    out.append("\nChosen hyperparameters:\n")
    out.append(markdown_table(["method", *kinds],
                              [[m, *[json.dumps(cells[k][m]["hp"]) for k in kinds]]
                               for m in methods]))
    out.append("\nThe language-model experiment (SISA / NSISA against AdamW and Muon) is in "
               "`pisa-lm.md` (`python -m experiments.pisa_lm`).\n")
    return "\n".join(out) + "\n"


def plot_curves(cfg: FederatedConfig, cells: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    kinds = csv_items(cfg.partitions)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for method, c in cells[kind].items():
            ax.plot(c["rounds"], np.mean(c["curves"], axis=0), label=method)
        ax.set(title=kind, xlabel="communication round", ylabel="test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    import shlex

    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(FederatedConfig, argv)
    root = run_dir(cfg.runs_root, cfg.name)
    split = digits_split(cfg)
    cells = {kind: {m: cell(cfg, split, root, kind, m) for m in csv_items(cfg.methods)}
             for kind in csv_items(cfg.partitions)}
    summary = summary_markdown(cfg, cells, "python -m experiments.pisa_federated "
                               + shlex.join(argv))
    results = Path(cfg.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    plot = results.with_name(results.stem + "_federated.png")
    plot_curves(cfg, cells, plot)
    summary += f"\n![test accuracy per round]({plot.name})\n"
    (root / "summary.md").write_text(summary)
    results.write_text(summary)
    print(summary)
    return cells


if __name__ == "__main__":
    main()
