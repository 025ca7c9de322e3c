"""Checkpoints of models whose every layer has its own width (a structurally pruned model):
train a few steps, save, load, evaluate; the loaded model is the trained one."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from admm_jax.data import eval_batches, prepare_corpus
from admm_jax.models.llama import LlamaConfig, abstract_params
from admm_jax.training import OptimizerConfig, TrainConfig, train
from admm_jax.training.checkpoint import MODEL_FILE, Checkpointer, load_model, save_model
from admm_jax.training.lm import make_nll_sum, perplexity

WORDS = ("the king and queen walk to the castle where a knight keeps watch over seven towers of "
         "stone while rivers run east toward the sea").split()

#: every block has its own MLP width and head counts
CONFIG = LlamaConfig(vocab_size=320, dim=32, n_layers=3, n_heads=(4, 2, 2), n_kv_heads=(2, 1, 2),
                     mlp_dim=(80, 24, 48), max_seq_len=32, head_dim=8)
TRAIN = TrainConfig(steps=6, batch_size=4, seq_len=16, log_every=3, eval_every=6, eval_batches=3,
                    checkpoint_every=6, optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2))


def write_texts(root, n_docs=6, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for d in range(n_docs):
        (root / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS, 1500)) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("per_layer")
    corpus = prepare_corpus(write_texts(base / "texts"), vocab_size=300, cache_dir=base / "cache")
    result = train(CONFIG, corpus, base / "run", TRAIN, progress=False)
    return corpus, result, base / "run"


def val_perplexity(config: LlamaConfig, params, corpus) -> float:
    batches = eval_batches(corpus.val, batch_size=TRAIN.batch_size, seq_len=TRAIN.seq_len,
                           max_batches=TRAIN.eval_batches)
    return perplexity(make_nll_sum(abstract_params(config)[0]), params, batches)


def test_train_save_load_evaluate_per_layer_widths(trained):
    corpus, result, run = trained
    assert result.history[0]["loss"] > result.history[-1]["loss"]
    stored = json.loads((run / "checkpoints" / MODEL_FILE).read_text())["model_config"]
    assert stored["mlp_dim"] == [80, 24, 48] and stored["n_kv_heads"] == [2, 1, 2]

    loaded = load_model(run)
    assert loaded.config == CONFIG and loaded.step == TRAIN.steps
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params),
                    jax.tree_util.tree_leaves(result.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.params["layers"][1]["mlp"]["down_proj"]["kernel"].shape == (24, 32)

    in_memory = val_perplexity(CONFIG, result.params, corpus)
    assert val_perplexity(loaded.config, loaded.params, corpus) == in_memory
    assert in_memory == pytest.approx(result.val_perplexity, rel=1e-6)


def test_save_model_round_trip_and_config_guard(trained, tmp_path):
    corpus, result, _ = trained
    directory = save_model(tmp_path / "pruned", result.params, model_config=CONFIG,
                           tokenizer=corpus.tokenizer, meta={"note": "per-layer"})
    loaded = load_model(directory)
    assert loaded.meta["note"] == "per-layer" and loaded.config == CONFIG
    np.testing.assert_array_equal(loaded.params["layers"][2]["attn"]["k_proj"]["kernel"],
                                  result.params["layers"][2]["attn"]["k_proj"]["kernel"])
    # reopening with the same per-layer config is accepted, another width is refused by name
    Checkpointer(directory, model_config=CONFIG, tokenizer=corpus.tokenizer).close()
    other = LlamaConfig(**{**CONFIG.to_dict(), "mlp_dim": [80, 24, 40]})
    with pytest.raises(ValueError, match=r"mlp_dim: stored \[80, 24, 48\] vs requested "
                                         r"\[80, 24, 40\]"):
        Checkpointer(directory, model_config=other, tokenizer=corpus.tokenizer)


def test_on_disk_format_ids_are_stable():
    """Checkpoints and surrogates written by earlier versions must keep loading: their format
    ids are file-format constants, not module paths (they survived the package restructure)."""
    from admm_jax.salaad import surrogate
    from admm_jax.training import checkpoint

    assert checkpoint.FORMAT == "admm_jax.checkpoint.v1"
    assert surrogate.FORMAT == "admm_jax.surrogate.v1"
