"""The README demo (a few minutes on a CPU): pretrain the ``tiny`` model on the bundled Shakespeare
corpus densely and with SALAAD, side by side, then deploy both at a sweep of parameter budgets
and print the perplexity-vs-budget table (:mod:`experiments.salaad` at a short budget).

    python -m experiments.demo [--steps 300] [--runs_root runs]
"""

from __future__ import annotations

import dataclasses

from experiments import salaad
from experiments.cli import parse_config


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """A short CPU demo of admm_jax."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    budgets: str = "0.35,0.4,0.6,1.0"
    runs_root: str = "runs"
    corpus: str = "shakespeare"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DemoConfig, argv)
    name = f"demo-{cfg.steps}"
    print(f"== admm_jax demo: dense vs SALAAD pretraining of the tiny preset ({cfg.steps} steps "
          "each), then elastic deployment ==")
    salaad.main([
        "--name", name, "--model", "tiny", "--corpus", cfg.corpus, "--runs_root", cfg.runs_root,
        "--results", f"{cfg.runs_root}/{name}/salaad.md", "--budgets", cfg.budgets,
        "--eval_batches", "16", "--train.steps", str(cfg.steps),
        "--train.batch_size", str(cfg.batch_size), "--train.seq_len", str(cfg.seq_len),
        "--train.warmup_steps", str(max(1, cfg.steps // 20)),
        "--train.eval_every", str(cfg.steps), "--train.checkpoint_every", str(cfg.steps)])
    print(f"perplexity-vs-budget curve: {cfg.runs_root}/{name}/budget.png "
          f"(summary: {cfg.runs_root}/{name}/summary.md)")


if __name__ == "__main__":
    main()
