"""Dense pretraining of any model preset on any corpus.

    python -m experiments.pretrain --model tiny --corpus shakespeare --train.steps 2000
    python -m experiments.pretrain --corpus path/to/texts/ --arch n_layers 2 dim 96 --name my-run

Writes ``runs/<name>/``: config.json, metrics.jsonl, checkpoints/, loss.png and summary.md.
Re-running with the same name resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from admm_jax._checks import check_int
from admm_jax._io import atomic_write_json
from admm_jax.data import prepare_corpus
from admm_jax.models.llama import LlamaConfig, abstract_params, count_params
from admm_jax.training import TrainConfig, train
from admm_jax.training.lm import unigram_perplexity
from experiments.cli import parse_config, to_dict
from experiments.runs import markdown_table, plot_training, run_dir


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Dense pretraining of a LLaMA-style model on a corpus."""

    name: str = "pretrain-tiny"
    """Run name: outputs go to RUNS_ROOT/NAME (re-running the same name resumes)."""
    model: str = "tiny"
    """Model preset (admm_jax.models.llama.PRESETS)."""
    corpus: str = "shakespeare"
    """Corpus name (shakespeare, kjv) or a directory / file of .txt documents."""
    vocab_size: int = 0
    """Tokenizer vocabulary (and model vocab_size) override; 0 = the preset's."""
    runs_root: str = "runs"
    """Directory that holds the run directories."""
    cache_dir: str = ""
    """Cache directory for tokenizers and token caches (default: the library's cache)."""
    arch: dict[str, int | float | bool | str] = dataclasses.field(default_factory=dict)
    """LlamaConfig field overrides of the preset as KEY VALUE pairs, e.g. n_layers 2 dim 96."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Training loop and AdamW settings."""

    def __post_init__(self):
        check_int("vocab_size", self.vocab_size, minimum=0)


def model_config_for(cfg: PretrainConfig) -> LlamaConfig:
    """The preset with ``arch`` overrides and, if given, the ``vocab_size`` override."""
    overrides = dict(cfg.arch)
    if cfg.vocab_size:
        overrides["vocab_size"] = cfg.vocab_size
    return LlamaConfig.preset(cfg.model, **overrides)


def main(argv: list[str] | None = None) -> float:
    cfg = parse_config(PretrainConfig, argv)
    model_config = model_config_for(cfg)
    out = run_dir(cfg.runs_root, cfg.name)
    corpus = prepare_corpus(cfg.corpus, vocab_size=model_config.vocab_size,
                            cache_dir=cfg.cache_dir or None)
    n_params = count_params(abstract_params(model_config)[1])
    print(f"[pretrain] {cfg.model}: {n_params:,} params; corpus {corpus.name}: "
          f"{len(corpus.train):,} train / {len(corpus.val):,} val tokens", file=sys.stderr)
    t0 = time.perf_counter()
    result = train(model_config, corpus, out, cfg.train)
    wall = time.perf_counter() - t0
    atomic_write_json(out / "config.json", {**to_dict(cfg), "model_config": model_config.to_dict()})
    plot_training(result.history, out / "loss.png", f"{cfg.name}: {cfg.model} on {corpus.name}")
    unigram = unigram_perplexity(corpus.train, corpus.val, corpus.vocab_size)
    final = result.history[-1] if result.history else {}
    rows = [["steps", cfg.train.steps],
            ["tokens seen", cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len],
            ["final train loss", final.get("loss", float("nan"))],
            ["validation perplexity", result.val_perplexity],
            ["unigram baseline perplexity", unigram],
            ["wall time this invocation (s)", wall]]
    (out / "summary.md").write_text(
        f"# {cfg.name}\n\n`python -m experiments.pretrain {' '.join(argv or sys.argv[1:])}`\n\n"
        + markdown_table(["quantity", "value"], rows) + "\n![loss](loss.png)\n")
    print(f"unigram perplexity: {unigram:.2f}")
    print(f"validation perplexity: {result.val_perplexity:.2f}")
    return result.val_perplexity


if __name__ == "__main__":
    main()
