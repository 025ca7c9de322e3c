"""The README demo: pretrain the ``tiny`` model on the bundled Shakespeare corpus for a few minutes
on CPU and report its validation perplexity next to the unigram baseline.

    python -m experiments.demo [--steps 300] [--runs_root runs]
"""

from __future__ import annotations

import dataclasses

from experiments import pretrain
from experiments.cli import parse_config


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """A short CPU demo of admm_jax."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    runs_root: str = "runs"
    corpus: str = "shakespeare"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DemoConfig, argv)
    name = f"demo-tiny-{cfg.steps}"
    print(f"== admm_jax demo: dense pretraining of the tiny preset ({cfg.steps} steps) ==")
    pretrain.main([
        "--name", name, "--model", "tiny", "--corpus", cfg.corpus,
        "--runs_root", cfg.runs_root, "--train.steps", str(cfg.steps),
        "--train.batch_size", str(cfg.batch_size), "--train.seq_len", str(cfg.seq_len),
        "--train.warmup_steps", str(max(1, cfg.steps // 20)),
        "--train.eval_every", str(cfg.steps), "--train.eval_batches", "0",
        "--train.checkpoint_every", str(cfg.steps)])
    print(f"run written to {cfg.runs_root}/{name}/ (summary.md, loss.png, checkpoints/)")


if __name__ == "__main__":
    main()
