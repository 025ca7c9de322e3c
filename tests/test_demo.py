"""The README demo (experiments.demo) end to end at toy scale, on a nano checkpoint."""

import json

import jax
import numpy as np
import pytest

from admm_jax.data import corpus_meta, prepare_corpus
from admm_jax.models.llama import LlamaConfig, init_params
from admm_jax.training.checkpoint import save_model
from experiments import demo, evaluate
from tests.test_experiments import write_texts

METHODS = ("magnitude", "wanda", "sparsegpt")


@pytest.fixture
def nano_checkpoint(tmp_path, monkeypatch):
    """``(checkpoint dir, text dir)``: a random nano model with a tokenizer trained on the texts."""
    monkeypatch.setenv("ADMM_JAX_CACHE", str(tmp_path / "cache"))
    texts = write_texts(tmp_path / "texts")
    corpus = prepare_corpus(str(texts), vocab_size=300)
    config = LlamaConfig.preset("nano")
    _, params = init_params(config, jax.random.key(0))
    source = save_model(tmp_path / "nano", params, model_config=config,
                        tokenizer=corpus.tokenizer, meta=corpus_meta(corpus))
    return source, texts


def test_demo_end_to_end(tmp_path, nano_checkpoint, capsys):
    """Every method at one unstructured and one 2:4 setting: the files, exact sparsity, finite
    perplexities, a dense row that the evaluate CLI reproduces, the printed pointers."""
    source, texts = nano_checkpoint
    result = demo.main([
        "--checkpoint", str(source), "--corpus", str(texts), "--runs_root", str(tmp_path / "runs"),
        "--settings", "0.75,2:4", "--n_calibration", "4", "--calibration_len", "32",
        "--eval_seq_len", "32", "--eval_batch_size", "4", "--eval_batches", "2"])
    root = tmp_path / "runs" / "demo"
    for name in ("summary.md", "perplexity.png", "results.json"):
        assert (root / name).is_file(), name
    rows = result["rows"]
    assert json.loads((root / "results.json").read_text())["rows"] == rows
    assert [(r["method"], r["setting"]) for r in rows] == [("dense", "dense")] + [
        (m, s) for s in ("0.75", "2:4") for m in METHODS]
    for row in rows[1:]:
        assert row["sparsity"] == (0.75 if row["setting"] == "0.75" else 0.5)
    assert all(np.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows)
    assert result["eval_tokens"] == 2 * 4 * 32

    dense = evaluate.main(["--checkpoint", str(source), "--corpus", str(texts), "--seq_len", "32",
                           "--batch_size", "4", "--max_batches", "2"])
    assert rows[0]["ppl"] == pytest.approx(dense, rel=1e-5)

    printed = capsys.readouterr().out
    assert (root / "summary.md").read_text() in printed
    assert f"Picture: {root / 'perplexity.png'}" in printed
    assert "python -m experiments.demo --full true" in printed


def test_demo_full_runs_the_full_size_experiments(monkeypatch):
    """``--full true`` runs experiments.elsa and then experiments.salaad with their defaults."""
    calls = []
    monkeypatch.setattr(demo.elsa_experiment, "main", lambda argv: calls.append(("elsa", argv)))
    monkeypatch.setattr(demo.salaad_experiment, "main",
                        lambda argv: calls.append(("salaad", argv)))
    assert demo.main(["--full", "true"]) is None
    assert calls == [("elsa", []), ("salaad", [])]


@pytest.mark.parametrize("field, value, message", [
    ("methods", "magnitude,obs", "obs"),
    ("settings", "0.5,1.5", "1.5"),
    ("settings", "4:2", "4:2"),
    ("n_calibration", 0, "n_calibration"),
    ("eval_batches", -1, "eval_batches"),
])
def test_demo_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        demo.DemoConfig(**{field: value})


def test_demo_cli_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--methods", "magnitude,obs"])
    assert exc.value.code == 2
    assert "obs" in capsys.readouterr().err
