"""End-to-end runs of the experiment scripts at toy scale: SALAAD vs RPCA and deployment, ELSA vs
one-shot pruning."""

import json

import jax
import numpy as np
import pytest

from admm_jax.data import corpus_meta, prepare_corpus
from admm_jax.models.llama import LlamaConfig, init_params
from admm_jax.training.checkpoint import save_model
from experiments import deploy, evaluate, salaad
from experiments import elsa as elsa_experiment


def write_texts(root, n_docs=6, seed=0):
    rng = np.random.default_rng(seed)
    words = ("the king and queen walk to the castle where a knight keeps watch over seven "
             "towers of stone while rivers run east toward the sea").split()
    root.mkdir(parents=True)
    for d in range(n_docs):
        (root / f"doc{d}.txt").write_text(" ".join(rng.choice(words, 2500)) + "\n")
    return root


def test_salaad_experiment_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("ADMM_JAX_CACHE", str(tmp_path / "cache"))
    texts = write_texts(tmp_path / "texts")
    result = salaad.main([
        "--name", "toy", "--model", "nano", "--corpus", str(texts),
        "--runs_root", str(tmp_path / "runs"), "--results", str(tmp_path / "salaad.md"),
        "--budgets", "0.7,1.0", "--rho", "0.1", "--rpca_max_iter", "20",
        "--train.steps", "6", "--train.batch_size", "4", "--train.seq_len", "32",
        "--train.log_every", "2", "--train.eval_every", "6", "--train.eval_batches", "2",
        "--train.checkpoint_every", "6", "--train.optimizer.warmup_steps", "1"])
    run = tmp_path / "runs" / "toy"
    for name in ("results.json", "summary.md", "budget.png", "blocks.png", "config.json"):
        assert (run / name).is_file(), name
    rows = result["budgets"]
    assert [r["budget"] for r in rows] == [0.7, 1.0]
    assert all(np.isfinite(r["salaad_ppl"]) and np.isfinite(r["rpca_ppl"]) for r in rows)
    budget_70 = int(0.7 * result["dense_params"])
    assert abs(rows[0]["salaad_params"] - budget_70) <= 1  # HPA hits the budget
    stored = json.loads((run / "results.json").read_text())
    assert stored["dense_params"] == result["dense_params"]
    assert "Command: `python -m experiments.salaad" in (tmp_path / "salaad.md").read_text()

    # the SALAAD checkpoint now carries a surrogate: the deploy CLI serves any budget from it
    ppl = deploy.main(["--checkpoint", str(run / "salaad"), "--budget", "0.7",
                       "--seq_len", "32", "--batch_size", "4", "--max_batches", "2"])
    assert np.isfinite(ppl)


def test_elsa_experiment_end_to_end(tmp_path, monkeypatch):
    """All four methods at one unstructured and one 2:4 setting on a nano checkpoint: exact
    sparsity, finite perplexities, checkpoints that the evaluate CLI reads, the summary."""
    monkeypatch.setenv("ADMM_JAX_CACHE", str(tmp_path / "cache"))
    texts = write_texts(tmp_path / "texts")
    corpus = prepare_corpus(str(texts), vocab_size=300)
    _, params = init_params(LlamaConfig.preset("nano"), jax.random.key(0))
    source = save_model(tmp_path / "nano", params, model_config=LlamaConfig.preset("nano"),
                        tokenizer=corpus.tokenizer, meta=corpus_meta(corpus))
    rows = elsa_experiment.main([
        "--name", "toy", "--checkpoint", str(source), "--corpus", str(texts),
        "--runs_root", str(tmp_path / "runs"), "--results", str(tmp_path / "elsa.md"),
        "--settings", "0.75,2:4", "--n_calibration", "4", "--calibration_len", "32",
        "--interval", "2", "--eval_seq_len", "32", "--eval_batch_size", "4",
        "--eval_batches", "2", "--train.steps", "6", "--train.batch_size", "4",
        "--train.seq_len", "32", "--train.optimizer.warmup_steps", "1", "--train.log_every", "2",
        "--train.eval_every", "6", "--train.eval_batches", "1", "--train.checkpoint_every", "6"])
    assert {(r["method"], r["setting"]) for r in rows} == {
        (m, s) for m in ("magnitude", "wanda", "sparsegpt", "elsa") for s in ("0.75", "2:4")}
    for row in rows:
        assert row["sparsity"] == (0.75 if row["setting"] == "0.75" else 0.5)
        assert np.isfinite(row["ppl"])
    summary = (tmp_path / "elsa.md").read_text()
    assert "Command: `python -m experiments.elsa" in summary and "ELSA-L" in summary
    assert (tmp_path / "elsa.png").is_file()
    elsa_row = next(r for r in rows if r["method"] == "elsa" and r["setting"] == "0.75")
    ppl = evaluate.main(["--checkpoint", elsa_row["checkpoint"], "--seq_len", "32",
                         "--batch_size", "4", "--max_batches", "2"])
    assert ppl == pytest.approx(elsa_row["ppl"], rel=1e-4)
