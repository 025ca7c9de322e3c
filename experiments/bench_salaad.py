"""SALAAD overhead benchmark, side by side in one process.

    python -m experiments.bench_salaad [--out results/bench_salaad.json]

(a) Amortized seconds per training step of ``clip → slr_admm → adamw`` (K = 2, subspace and
    exact SVD back-ends) against plain ``clip → adamw`` on the same model and batch.
(b) Time and relative error of the fast nuclear-norm prox (:func:`admm_jax.ops.prox.svt_subspace`,
    warm-started as in training) against the exact SVD prox (:func:`admm_jax.ops.prox.svt`) on
    1024×1024 and 2048×512 matrices at a 25 % rank cap.

Timings are medians over rounds in which the contenders run interleaved, so background load
affects both alike; every function is jitted and warmed up first.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from admm_jax._checks import check_int, check_real
from admm_jax.models.llama import LlamaConfig, init_params
from admm_jax.ops import prox
from admm_jax.salaad.split import slr_admm
from admm_jax.training import TrainConfig, adamw, make_train_step
from experiments.benchmarking import interleaved_medians, report
from experiments.cli import parse_config


@dataclasses.dataclass(frozen=True)
class BenchSalaadConfig:
    """SALAAD step overhead and fast-prox accuracy/speed."""

    out: str = "results/bench_salaad.json"
    """JSON report path."""
    model: str = "tiny"
    """Model preset of the train-step benchmark."""
    batch_size: int = 16
    """Sequences per train step."""
    seq_len: int = 128
    """Tokens per training sequence."""
    interval: int = 2
    """SALAAD stage-2 interval K."""
    steps_per_round: int = 10
    """Train steps per timed round (a multiple of the interval amortizes stage 2)."""
    rounds: int = 3
    """Interleaved timed rounds of the train steps (the median is reported)."""
    rank_cap_ratio: float = 0.25
    """Rank cap of the fast prox as a fraction of min(rows, cols)."""
    prox_rounds: int = 5
    """Interleaved timed rounds of the prox benchmark."""

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "interval", "steps_per_round", "rounds",
                     "prox_rounds"):
            check_int(name, getattr(self, name), minimum=1)
        check_real("rank_cap_ratio", self.rank_cap_ratio, low=0.0, high=1.0, low_open=True)


def bench_steps(cfg: BenchSalaadConfig) -> dict:
    model_config = LlamaConfig.preset(cfg.model)
    train_cfg = TrainConfig(batch_size=cfg.batch_size, seq_len=cfg.seq_len)
    graphdef, params0 = init_params(model_config, jax.random.key(0))
    batch = jnp.asarray(np.random.default_rng(0).integers(
        0, model_config.vocab_size, (cfg.batch_size, cfg.seq_len + 1)), jnp.int32)
    clip = optax.clip_by_global_norm(1.0)
    txs = {
        "adamw": optax.chain(clip, adamw(train_cfg)),
        "salaad_subspace": optax.chain(clip, slr_admm(1e-3, interval=cfg.interval,
                                                      svd="subspace"), adamw(train_cfg)),
        "salaad_exact": optax.chain(clip, slr_admm(1e-3, interval=cfg.interval, svd="exact"),
                                    adamw(train_cfg)),
    }
    runners = {}
    for name, tx in txs.items():
        train_step = make_train_step(graphdef, tx)
        state = {"p": jax.tree_util.tree_map(jnp.copy, params0)}
        state["o"] = train_step.init(state["p"])

        def run(step=train_step.step, state=state):
            for _ in range(cfg.steps_per_round):
                state["p"], state["o"], m = step(state["p"], state["o"], batch)
            return m["loss"]

        run()  # compile both branches of the stage-2 cond and warm up
        runners[name] = run
        print(f"[bench] compiled {name}", file=sys.stderr)
    med = interleaved_medians(runners, cfg.rounds)
    per_step = {k: v / cfg.steps_per_round for k, v in med.items()}
    return {"model": cfg.model, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
            "interval": cfg.interval, "seconds_per_step": per_step,
            "ratio_subspace_vs_adamw": per_step["salaad_subspace"] / per_step["adamw"],
            "ratio_exact_vs_adamw": per_step["salaad_exact"] / per_step["adamw"]}


def decaying_matrix(key, m: int, n: int) -> jax.Array:
    """A trained-weight-like matrix: singular values ∝ i^(-1/2) plus 5 % Gaussian noise."""
    k1, k2, k3 = jax.random.split(key, 3)
    r = min(m, n)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (m, r)))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (n, r)))
    s = 1.0 / jnp.sqrt(jnp.arange(1, r + 1, dtype=jnp.float32))
    x = (u * s) @ v.T
    return x + 0.05 * jnp.linalg.norm(x) / np.sqrt(m * n) * jax.random.normal(k3, (m, n))


def bench_prox(cfg: BenchSalaadConfig, m: int, n: int) -> dict:
    key = jax.random.key(m * 7 + n)
    x_prev = decaying_matrix(key, m, n)
    x = x_prev + 0.01 * jnp.linalg.norm(x_prev) / np.sqrt(m * n) * jax.random.normal(
        jax.random.fold_in(key, 1), (m, n))  # the next ADMM stage: a 1 % perturbation
    cap = max(1, round(cfg.rank_cap_ratio * min(m, n)))
    s_exact = jnp.linalg.svd(x, compute_uv=False)
    tau = float(s_exact[int(0.6 * cap)])  # threshold keeps ~60 % of the cap
    exact = jax.jit(lambda a: prox.svt(a, tau)[0])
    _, prev = prox.svt(x_prev, tau)  # warm start: the previous stage's factors
    fast = jax.jit(lambda a, p, k: prox.svt_subspace(a, tau, p, rank_cap=cap, key=k)[0])
    cold = jax.jit(lambda a, k: prox.svt_subspace(a, tau, None, rank_cap=cap, key=k)[0])
    sub = jax.random.key(3)
    ref = exact(x)
    warm_out, cold_out = fast(x, prev, sub), cold(x, sub)
    med = interleaved_medians({"exact": lambda: exact(x), "fast_warm": lambda: fast(x, prev, sub),
                               "fast_cold": lambda: cold(x, sub)}, cfg.prox_rounds)

    def rel(a):
        return float(jnp.linalg.norm(a - ref) / jnp.linalg.norm(ref))

    return {"shape": [m, n], "rank_cap": cap, "tau": tau,
            "kept_rank_exact": int(jnp.sum(s_exact > tau)), "seconds": med,
            "speedup_warm": med["exact"] / med["fast_warm"],
            "speedup_cold": med["exact"] / med["fast_cold"],
            "rel_error_warm": rel(warm_out), "rel_error_cold": rel(cold_out)}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchSalaadConfig, argv)
    result = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
              "jax": jax.__version__, "train_step": bench_steps(cfg),
              "prox": [bench_prox(cfg, 1024, 1024), bench_prox(cfg, 2048, 512)]}
    return report(result, cfg.out)


if __name__ == "__main__":
    main()
