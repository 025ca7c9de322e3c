"""End-to-end runs of the experiment scripts at toy scale: SALAAD vs RPCA and deployment, ELSA vs
one-shot pruning."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from admm_jax.core import path_str
from admm_jax.data import corpus_meta, prepare_corpus
from admm_jax.models.compact import dense_params
from admm_jax.models.llama import LlamaConfig, init_params
from admm_jax.training import OptimizerConfig, TrainConfig
from admm_jax.training.checkpoint import load_model, save_model
from experiments import deploy, elsa_cache, evaluate, salaad, salaad_pretrained
from experiments import elsa as elsa_experiment


def write_texts(root, n_docs=6, seed=0):
    rng = np.random.default_rng(seed)
    words = ("the king and queen walk to the castle where a knight keeps watch over seven "
             "towers of stone while rivers run east toward the sea").split()
    root.mkdir(parents=True)
    for d in range(n_docs):
        (root / f"doc{d}.txt").write_text(" ".join(rng.choice(words, 2500)) + "\n")
    return root


def nano_checkpoint(tmp_path, monkeypatch):
    """A random nano model saved as a checkpoint with the tokenizer of a small corpus:
    ``(checkpoint dir, corpus dir, second-domain dir, config)``."""
    monkeypatch.setenv("ADMM_JAX_CACHE", str(tmp_path / "cache"))
    texts = write_texts(tmp_path / "texts")
    other = write_texts(tmp_path / "other", seed=1)
    corpus = prepare_corpus(str(texts), vocab_size=300)
    config = LlamaConfig.preset("nano", vocab_size=300)
    _, params = init_params(config, jax.random.key(0))
    save_model(tmp_path / "base", params, model_config=config, tokenizer=corpus.tokenizer)
    return tmp_path / "base", texts, other, config


def test_salaad_decoupled_pull_follows_the_lr_schedule_when_asked():
    """With zero gradients AdamW moves nothing, so the first update is the pull alone: η₀·ρ·(X −
    Z + U) with Z = L₀ (a rank-15 % truncation, not X) — zero under the warm-up's η₀ = 0, not
    under a constant η."""
    params = {"kernel": jax.random.normal(jax.random.key(0), (24, 16))}
    grads = jax.tree.map(np.zeros_like, params)
    train = TrainConfig(steps=10, optimizer=OptimizerConfig(lr=1e-3, warmup_steps=3))

    def first_update(schedule):
        cfg = salaad.SalaadConfig(decoupled_schedule=schedule, ramp_factor=1.0, train=train)
        tx = salaad.salaad_optimizer(cfg, n_layers=1, mask="kernel")
        return tx.update(grads, tx.init(params), params)[0]["kernel"]

    assert float(np.abs(first_update("constant")).max()) > 1e-3
    np.testing.assert_array_equal(first_update("lr"), 0.0)


def test_salaad_sparse_structure_flag_reaches_the_split():
    """``--sparse_structure block16`` makes the optimizer's S whole 16 × 16 tiles at every
    stage 2 (some kept, some cut once β has grown); a structure that S cannot take is refused
    when the config is built."""
    params = {"kernel": jax.random.normal(jax.random.key(1), (40, 36))}
    grads = jax.tree.map(np.zeros_like, params)
    cfg = salaad.SalaadConfig(sparse_structure="block16", ramp_factor=1.0, interval=1,
                              controller=salaad.ControllerConfig(beta_step=0.5),
                              train=TrainConfig(steps=4))

    def per_tile(mask):  # entries per 16 × 16 tile of the zero-padded 48 × 48 grid
        return np.pad(mask, ((0, 8), (0, 12))).reshape(3, 16, 3, 16).sum(axis=(1, 3))

    inside = per_tile(np.ones((40, 36), bool))
    tx = salaad.salaad_optimizer(cfg, n_layers=1, mask="kernel")
    state, kept = tx.init(params), []
    for _ in range(4):
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        (_, sparse), = salaad.slr_components(state).values()
        nonzero = per_tile(np.asarray(sparse) != 0)
        assert np.all((nonzero == 0) | (nonzero == inside))  # each tile whole or empty
        kept.append(int((nonzero > 0).sum()))
    assert any(0 < k < 9 for k in kept), kept
    with pytest.raises(ValueError, match="sparse_structure must be"):
        salaad.SalaadConfig(sparse_structure="2:4")


def test_salaad_experiment_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("ADMM_JAX_CACHE", str(tmp_path / "cache"))
    texts = write_texts(tmp_path / "texts")
    result = salaad.main([
        "--name", "toy", "--model", "nano", "--corpus", str(texts),
        "--runs_root", str(tmp_path / "runs"), "--results", str(tmp_path / "salaad.md"),
        "--budgets", "0.7,1.0", "--rho", "0.1", "--rpca_max_iter", "20",
        "--fisher_windows", "4", "--ramp_center", "3", "--ramp_width", "1",
        "--train.steps", "6", "--train.batch_size", "4", "--train.seq_len", "32",
        "--train.log_every", "2", "--train.eval_every", "6", "--train.eval_batches", "2",
        "--train.checkpoint_every", "6", "--train.optimizer.warmup_steps", "1"])
    run = tmp_path / "runs" / "toy"
    for name in ("results.json", "summary.md", "budget.png", "blocks.png", "curves.png",
                 "config.json"):
        assert (run / name).is_file(), name
    rows = result["budgets"]
    assert [r["budget"] for r in rows] == [0.7, 1.0]
    labels = ["salaad-hpa", "salaad-sensitivity", "rpca-hpa", "rpca-sensitivity"]
    assert result["labels"] == labels
    assert all(np.isfinite(r[f"{label}_ppl"]) for r in rows for label in labels)
    # budgets are fractions of the constrained blocks (2 layers × 7 kernels + the embedding)
    nano = LlamaConfig.preset("nano")
    constrained = nano.vocab_size * nano.dim + 2 * (
        nano.dim * nano.dim * 2 + 2 * nano.dim * nano.dim * nano.n_kv_heads // nano.n_heads
        + 3 * nano.dim * nano.mlp_dim)
    assert result["constrained_params"] == constrained
    budget_70 = result["dense_params"] - constrained + int(0.7 * constrained)
    assert rows[0]["fraction_of_all"] == pytest.approx(budget_70 / result["dense_params"])
    for label in labels:  # both allocations spend the budget (to within one sparse entry)
        assert budget_70 - 2 <= rows[0][f"{label}_params"] <= budget_70, label
    assert result["targets"]["blocks"] == 15
    stored = json.loads((run / "results.json").read_text())
    assert stored["dense_params"] == result["dense_params"]
    assert "Command: `python -m experiments.salaad" in (tmp_path / "salaad.md").read_text()

    # the SALAAD checkpoint now carries a surrogate: the deploy CLI serves any budget from it
    ppl = deploy.main(["--checkpoint", str(run / "salaad"), "--budget", "0.7",
                       "--seq_len", "32", "--batch_size", "4", "--max_batches", "2"])
    assert np.isfinite(ppl)
    # ... and the sensitivity-aware allocation, from Fisher windows of the run's own corpus
    metas = {}
    for strategy in ("homomorphic", "sensitivity"):
        deploy.main(["--checkpoint", str(run / "salaad"), "--budget", "0.7", "--relative_to",
                     "constrained", "--strategy", strategy, "--fisher_windows", "4",
                     "--fisher_seq_len", "32", "--out", str(tmp_path / strategy),
                     "--seq_len", "32", "--batch_size", "4", "--max_batches", "2"])
        metas[strategy] = load_model(tmp_path / strategy).meta["hpa"]
        assert metas[strategy]["strategy"] == strategy
        assert budget_70 - 2 <= metas[strategy]["params"] <= budget_70
    assert metas["sensitivity"]["params"] == rows[0]["salaad-sensitivity_params"]
    assert (metas["sensitivity"]["ranks"], metas["sensitivity"]["n_sparse"]) != (
        metas["homomorphic"]["ranks"], metas["homomorphic"]["n_sparse"])


def _dense(checkpoint):
    """The dense params of a (possibly compact) checkpoint."""
    loaded = load_model(checkpoint)
    return dense_params(loaded.config, loaded.layouts, loaded.params)


def _flat(params):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_elsa_experiment_end_to_end(tmp_path, monkeypatch):
    """One-shot, masked fine-tuning, the three ELSA variants and dense+ft at one unstructured and
    one 2:4 setting on a nano checkpoint, scored on two domains: exact sparsity (kept by the
    fine-tuning), finite perplexities, tokens seen, checkpoints the evaluate CLI reads, the
    cache."""
    monkeypatch.setenv("ADMM_JAX_CACHE", str(tmp_path / "cache"))
    texts = write_texts(tmp_path / "texts")
    other = write_texts(tmp_path / "other", seed=1)
    corpus = prepare_corpus(str(texts), vocab_size=300)
    _, params = init_params(LlamaConfig.preset("nano"), jax.random.key(0))
    source = save_model(tmp_path / "nano", params, model_config=LlamaConfig.preset("nano"),
                        tokenizer=corpus.tokenizer, meta=corpus_meta(corpus))
    methods = ("magnitude", "sparsegpt", "sparsegpt+ft", "elsa", "elsa-paper", "elsa-global")

    def args(methods, settings):
        return ["--name", "toy", "--checkpoint", str(source), "--corpus", str(texts),
                "--transfer_corpus", str(other), "--runs_root", str(tmp_path / "runs"),
                "--results", str(tmp_path / "elsa.md"), "--settings", settings,
                "--global_settings", "0.75", "--methods", ",".join(methods),
                "--n_calibration", "4", "--calibration_len", "32", "--interval", "2",
                "--eval_seq_len", "32", "--eval_batch_size", "4", "--eval_batches", "2",
                "--train.steps", "6", "--train.batch_size", "4", "--train.seq_len", "32",
                "--train.optimizer.warmup_steps", "1", "--train.log_every", "2",
                "--train.eval_every", "6", "--train.eval_batches", "1",
                "--train.checkpoint_every", "6"]

    argv = args(methods, "0.75,2:4")
    rows = elsa_experiment.main(argv)
    by = {(r["method"], r["setting"]): r for r in rows}
    expected = {(m, s) for m in methods for s in ("0.75", "2:4")} - {("elsa-global", "2:4")}
    assert set(by) == expected | {("dense", "dense"), ("dense+ft", "dense")}
    for row in rows:
        pruned = row["setting"] != "dense"
        assert row["sparsity"] == ((0.75 if row["setting"] == "0.75" else 0.5) if pruned else 0)
        assert np.isfinite(row["ppl"]) and np.isfinite(row["transfer_ppl"])
        assert row["ppl"] != row["transfer_ppl"]  # two different domains
        assert row["command"] == "python -m experiments.elsa " + " ".join(argv)
        trained = row["method"].startswith("elsa") or row["method"].endswith("+ft")
        assert row["train_tokens"] == (6 * 4 * 32 if trained else 0)  # equal for ELSA and +ft
        assert row["calibration_tokens"] == (4 * 32 if "sparsegpt" in row["method"] else 0)
    for setting in ("0.75", "2:4"):  # masked fine-tuning moves the kept weights only
        oneshot = by[("sparsegpt", setting)]
        masks = np.load(Path(oneshot["checkpoint"]).parent / "masks.npz")
        before = _flat(_dense(oneshot["checkpoint"]))
        after = _flat(_dense(by[("sparsegpt+ft", setting)]["checkpoint"]))
        assert len(masks.files) == 7 * LlamaConfig.preset("nano").n_layers
        for path in masks.files:
            pruned = ~masks[path]
            assert np.all(before[path][pruned] == 0) and np.all(after[path][pruned] == 0)
            assert np.any(after[path] != before[path])
        assert by[("sparsegpt+ft", setting)]["seconds"] > oneshot["seconds"]
    for (method, setting), row in by.items():  # pruned rows are saved compact
        layouts = load_model(row["checkpoint"]).layouts
        assert len(layouts) == (0 if setting == "dense" else 7 * LlamaConfig.preset("nano")
                                .n_layers), (method, setting)
        if setting != "dense":
            assert {type(lay).__name__ for lay in layouts.values()} == (
                {"SparseLayout"} if setting == "0.75" else {"NMLayout"}), (method, setting)
            record = row["compact"]
            assert record["resident_bytes"] < record["dense_resident_bytes"]
            assert record["structure"] == ("unstructured" if setting == "0.75" else "2:4")
    for method in ("elsa", "elsa-paper", "elsa-global"):
        row = by[(method, "0.75")]
        assert np.isfinite(row["residual"]) and 0 <= row["projection_gap"] < 1
        assert (Path(row["checkpoint"]).parent / "training.png").is_file()
    summary = (tmp_path / "elsa.md").read_text()
    table = summary.split("## Every checkpoint")[1].split("Commands")[0]
    assert table.count("\n| ") - 1 == len(rows)  # one table line per row (and the header)
    for text in ("python -m experiments.elsa", "ELSA-L", "ppl other", "ppl texts",
                 "SparseGPT+ft", "How the hyperparameters were chosen"):
        assert text in summary, text
    assert (tmp_path / "elsa.png").is_file()
    ppl = evaluate.main(["--checkpoint", by[("elsa", "0.75")]["checkpoint"], "--seq_len", "32",
                         "--batch_size", "4", "--max_batches", "2"])
    assert ppl == pytest.approx(by[("elsa", "0.75")]["ppl"], rel=1e-4)

    # a rerun reads every row from the cache (same wall times); another format recomputes
    assert elsa_experiment.main(argv) == rows
    monkeypatch.setattr(elsa_cache, "RESULT_FORMAT", "elsa-result-test")
    (again,) = [r for r in elsa_experiment.main(args(["magnitude"], "0.75"))
                if r["method"] == "magnitude"]
    assert again["config"]["format"] == "elsa-result-test"
    assert again["command"] != by[("magnitude", "0.75")]["command"]
    table = (tmp_path / "elsa.md").read_text().split("## Every checkpoint")[1].split("Commands")[0]
    assert table.count("\n| ") - 1 == 3  # dense, dense+ft, magnitude: rows of the old format left


def test_salaad_pretrained_experiment_end_to_end(tmp_path, monkeypatch):
    """SALAAD continued from a (nano) checkpoint against post-hoc RPCA with and without the same
    training and SparseGPT: every row at equal parameter counts, finite, cached."""
    base, texts, other, _ = nano_checkpoint(tmp_path, monkeypatch)
    argv = ["--checkpoint", str(base), "--corpus", str(texts),
            "--transfer_corpus", str(other), "--runs_root", str(tmp_path / "runs"),
            "--results", str(tmp_path / "out.md"), "--budgets", "0.4,0.8",
            "--rpca_max_iter", "10", "--fisher_windows", "2", "--n_calibration", "4",
            "--calibration_len", "32", "--eval_seq_len", "32", "--eval_batches", "2",
            "--train.steps", "4", "--train.seq_len", "32", "--train.log_every", "2",
            "--train.eval_every", "4", "--train.checkpoint_every", "4", "--ramp_center", "2",
            "--ramp_width", "1", "--interval", "2"]  # a stage 2 within 4 steps: a dense S, so
    result = salaad_pretrained.main(argv)       # both budgets truncate the surrogate
    labels = ["salaad-hpa", "salaad-sensitivity", "rpca-hpa", "rpca-sensitivity",
              "rpca+ft-hpa", "rpca+ft-sensitivity", "sparsegpt"]
    assert result["labels"] == labels
    constrained = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 172)  # q, o + k, v + mlp
    assert result["constrained"] == constrained
    for budget in (0.4, 0.8):
        target = result["dense"] - constrained + int(budget * constrained)
        for label in labels:
            row = result["rows"][f"{label}@{budget}"]
            assert np.isfinite(row["ppl"]) and np.isfinite(row["transfer_ppl"])
            # equal parameter counts: the allocations to within one sparse entry, SparseGPT to
            # its per-block rounding of the kept count (≤ ½ entry = 1 parameter per block)
            slack = 2 if label != "sparsegpt" else 14
            assert abs(row["params"] - target) <= slack, (label, budget)
    summary = (tmp_path / "out.md").read_text()
    assert "Command: `python -m experiments.salaad_pretrained" in summary
    assert summary.count("| 40% |") == 2  # one table per domain
    evals = json.loads((tmp_path / "runs" / "salaad-smollm2" / "evals.json").read_text())
    assert set(evals["rows"]) >= {"dense", "dense+ft", "salaad-X", "sparsegpt@0.4"}
    again = salaad_pretrained.main(argv)  # everything cached: same rows
    assert again["rows"] == result["rows"]
