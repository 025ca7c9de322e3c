"""Throughput baseline: tokens/s of the ``tiny`` train step and of a SmolLM2-135M forward pass.

    python -m experiments.bench_train [--out results/bench_train.json]

Each measurement compiles once, warms up, then times ``repeats`` calls with
``block_until_ready``; the median is reported. Later benchmarks (SALAAD, ELSA) compare their
step time against these numbers measured the same way. Writes JSON.
"""

from __future__ import annotations

import dataclasses
import platform

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax._checks import check_int
from admm_jax.models.llama import (
    LlamaConfig,
    abstract_params,
    count_params,
    forward,
    init_params,
)
from admm_jax.models.pretrained import load_smollm2
from admm_jax.training import TrainConfig, default_optimizer, make_train_step
from experiments.benchmarking import interleaved_medians, report
from experiments.cli import parse_config


@dataclasses.dataclass(frozen=True)
class BenchTrainConfig:
    """Tokens/s of the tiny train step and of a SmolLM2 forward pass."""

    out: str = "results/bench_train.json"
    """JSON report path."""
    batch_size: int = 32
    """Sequences per tiny train step."""
    seq_len: int = 128
    """Tokens per tiny training sequence."""
    smollm2_batch: int = 4
    """Sequences per SmolLM2 forward pass."""
    smollm2_seq_len: int = 256
    """Tokens per SmolLM2 sequence."""
    repeats: int = 10
    """Timed calls per measurement (the median is reported)."""
    warmup: int = 2
    """Untimed calls before timing (after compilation)."""

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "smollm2_batch", "smollm2_seq_len", "repeats"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("warmup", self.warmup, minimum=0)


def bench_tiny_train_step(cfg: BenchTrainConfig) -> dict:
    model_config = LlamaConfig.preset("tiny")
    train_cfg = TrainConfig(batch_size=cfg.batch_size, seq_len=cfg.seq_len)
    graphdef, params = init_params(model_config, jax.random.key(0))
    tx = default_optimizer(train_cfg)
    train_step = make_train_step(graphdef, tx)
    state = {"params": params, "opt_state": train_step.init(params)}
    batch = jnp.asarray(np.random.default_rng(0).integers(
        0, model_config.vocab_size, (cfg.batch_size, cfg.seq_len + 1)), jnp.int32)

    def run():
        state["params"], state["opt_state"], m = train_step.step(state["params"],
                                                                 state["opt_state"], batch)
        return m["loss"]

    seconds = interleaved_medians({"step": run}, cfg.repeats, cfg.warmup)["step"]
    return {"params": count_params(params), "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len, "step_seconds": seconds,
            "tokens_per_s": cfg.batch_size * cfg.seq_len / seconds}


def bench_smollm2_forward(cfg: BenchTrainConfig) -> dict:
    model = load_smollm2()
    graphdef, _ = abstract_params(model.config)
    fwd = jax.jit(lambda p, t: forward(graphdef, p, t))
    tokens = jnp.asarray(np.random.default_rng(0).integers(
        0, model.config.vocab_size, (cfg.smollm2_batch, cfg.smollm2_seq_len)), jnp.int32)
    seconds = interleaved_medians({"forward": lambda: fwd(model.params, tokens)}, cfg.repeats,
                                  cfg.warmup)["forward"]
    return {"params": count_params(model.params), "batch_size": cfg.smollm2_batch,
            "seq_len": cfg.smollm2_seq_len, "forward_seconds": seconds,
            "tokens_per_s": cfg.smollm2_batch * cfg.smollm2_seq_len / seconds}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchTrainConfig, argv)
    result = {
        "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
        "device_count": jax.device_count(), "machine": platform.machine(),
        "jax": jax.__version__,
        "tiny_train_step": bench_tiny_train_step(cfg),
        "smollm2_forward": bench_smollm2_forward(cfg),
    }
    return report(result, cfg.out)


if __name__ == "__main__":
    main()
