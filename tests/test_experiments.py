"""End-to-end runs of the experiment scripts at toy scale: SALAAD vs RPCA and deployment."""

import json

import numpy as np

from experiments import deploy, salaad


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
        "--train.checkpoint_every", "6", "--train.warmup_steps", "1"])
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
