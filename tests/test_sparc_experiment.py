"""End to end run of ``python -m experiments.sparc`` at toy scale (nano preset, random init):
the compressor table and unimodality study, the four fine-tuning methods at one equal budget,
γ from the training-data grid, merged = adapted model, the summary, and a rerun served entirely
from the cache."""

import json
import math
import shutil

import numpy as np
import pytest

from admm_jax.models.llama import LlamaConfig
from experiments import sparc, sparc_report
from tests.test_experiments import write_texts

NANO = LlamaConfig.preset("nano")
RANK = 2


def _argv(tmp_path, texts, other):
    return ["--name", "toy", "--model", "nano", "--corpus", str(texts),
            "--transfer_corpus", str(other), "--compressor_corpora", f"{texts},{other}",
            "--runs_root", str(tmp_path / "runs"), "--results", str(tmp_path / "sparc.md"),
            "--compressor_ranks", "3", "--n_gradients", "2", "--grad_batch_size", "2",
            "--grad_seq_len", "32", "--ranks", str(RANK), "--gammas", "1,10,100",
            "--gamma_batches", "1", "--eval_seq_len", "32", "--eval_batch_size", "4",
            "--eval_batches", "2", "--train.steps", "4", "--train.batch_size", "2",
            "--train.seq_len", "32", "--train.log_every", "1", "--train.eval_every", "4",
            "--train.eval_batches", "1", "--train.checkpoint_every", "4",
            "--train.optimizer.warmup_steps", "1", "--train.optimizer.lr", "1e-3"]


def _budget(rank):
    """Σ rank·(in + out) over the seven projections of nano's blocks."""
    kv = NANO.dim * NANO.n_kv_heads // NANO.n_heads
    per_block = 2 * (2 * NANO.dim) + 2 * (NANO.dim + kv) + 3 * (NANO.dim + NANO.mlp_dim)
    return rank * per_block * NANO.n_layers


def _check_compressors(rows, corpora):
    assert [(r["corpus"], r["rank"]) for r in rows] == [(c, 3) for c in corpora]
    for row in rows:
        assert row["budget_fraction"] == pytest.approx(_budget(3) / (NANO.n_layers * (
            2 * NANO.dim**2 + 2 * NANO.dim * NANO.dim * NANO.n_kv_heads // NANO.n_heads
            + 3 * NANO.dim * NANO.mlp_dim)))
        # SpaRC is at most as far from each gradient as either pure compressor
        errors = {k: row[k]["rel_sq_error"] for k in ("sparc", "svd", "topk")}
        assert errors["sparc"] <= min(errors["svd"], errors["topk"]) * (1 + 1e-5)
        assert all(math.isfinite(row[k]["metric"]) for k in errors)
        assert len(row["kernels"]) == 7 * NANO.n_layers
        for study in row["kernels"].values():
            curve = np.array(study["curve"])
            assert len(curve) == study["r_max"] + 1 and np.all(np.isfinite(curve))
            assert curve[study["scan_rank"]] == curve.min()
            # r = 0 of the one-step projection is Top_p itself
            assert study["topk_error"] == pytest.approx(curve[0], rel=1e-5)
            assert study["sparc_error"] <= min(study["svd_error"], curve[0]) * (1 + 1e-5)
            assert study["bisect_excess"] == pytest.approx(
                curve[study["bisect_rank"]] / curve.min() - 1, abs=1e-6)
            assert study["bisect_excess"] >= 0


def _check_finetune(rows, pretrained):
    assert [r["method"] for r in rows] == ["lora", "lora-one", "rosa", "ra-sparc"]
    assert {r["trainable"] for r in rows} == {_budget(RANK)}
    assert all(math.isfinite(v) for v in pretrained["ppl"].values())
    grid = [1.0, 10.0, 100.0]
    for row in rows:
        assert set(row["after_ppl"]) == {"ppl", "transfer_ppl"}
        assert all(math.isfinite(v) for v in row["after_ppl"].values())
        # the merged dense model scores as the adapted one
        assert row["after_ppl"]["ppl"] == pytest.approx(row["adapted_ppl"], rel=1e-4)
        assert row["step_seconds"] > 0 and math.isfinite(row["final_train_loss"])
        # the logged curve: one point per step (log_every 1), ending at the final loss
        assert [s for s, _ in row["train_curve"]] == [1, 2, 3, 4]
        assert row["train_curve"][-1][1] == row["final_train_loss"]
        if row["method"] in ("lora-one", "ra-sparc"):
            losses = {float(g): v for g, v in row["gamma_losses"].items()}
            assert sorted(losses) == grid
            assert row["gamma"] == min(losses, key=losses.get)
            assert row["init_ppl"]["ppl"] != pytest.approx(pretrained["ppl"]["ppl"], rel=1e-6)
        else:
            assert "gamma" not in row and "init_ppl" not in row
    by = {r["method"]: r for r in rows}
    # init time: no gradient for LoRA, one for LoRA-One / RA-SpaRC, n_gradients for RoSA
    assert by["lora"]["gradient_seconds"] == 0.0
    assert by["rosa"]["gradient_seconds"] == pytest.approx(2 * by["lora-one"]["gradient_seconds"])
    assert by["ra-sparc"]["gradient_seconds"] == by["lora-one"]["gradient_seconds"] > 0
    ranks = rows[-1]["ranks"]
    assert len(ranks) == 7 * NANO.n_layers and all(0 <= r <= RANK for r in ranks.values())


def test_sparc_experiment_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("ADMM_JAX_CACHE", str(tmp_path / "cache"))
    texts = write_texts(tmp_path / "texts")
    other = write_texts(tmp_path / "other", seed=1)
    argv = _argv(tmp_path, texts, other)
    result = sparc.main(argv)
    _check_compressors(result["compressors"], [str(texts), str(other)])
    _check_finetune(result["finetune"], result["pretrained"])

    run = tmp_path / "runs" / "toy"
    for name in ("summary.md", "results.json", "config.json", "rank_per_layer.png",
                 "curves.png"):
        assert (run / name).is_file(), name
    for name in ("sparc_rank_per_layer.png", "sparc_curves.png"):
        assert (tmp_path / name).is_file(), name
    summary = (tmp_path / "sparc.md").read_text()
    assert summary == (run / "summary.md").read_text()
    assert "Command: `python -m experiments.sparc --name toy --model nano" in summary
    for heading in ("Table 4 layout", "App. C.2", "### Budget r = 2 (4,624 trainable", "γ search",
                    "| RA-SpaRC | 4,624 |", "| SpaRC (r = 3,"):
        assert heading in summary, heading
    assert json.loads((run / "results.json").read_text())["finetune"] == result["finetune"]

    # a rerun computes nothing: every row comes from the cache, identical
    def fail(*args):
        raise AssertionError("recomputed a cached row")

    monkeypatch.setattr(sparc, "compressor_row", fail)
    monkeypatch.setattr(sparc, "finetune_row", fail)
    again = sparc.main(argv)
    for part in ("compressors", "pretrained", "finetune"):
        assert again[part] == result[part], part
    # --part finetune still reports the cached compressor rows
    assert sparc.main([*argv, "--part", "finetune"])["compressors"] == result["compressors"]
    # the row cache moved to a committed folder resumes a run of another name (another machine)
    rows = tmp_path / "rows"
    shutil.copytree(run / "compressors", rows / "compressors")
    for path in [run / "pretrained.json", *run.glob("*-r*.json")]:
        shutil.copy(path, rows / path.name)
    moved = sparc.main([*argv, "--name", "elsewhere", "--rows_dir", str(rows)])
    for part in ("compressors", "pretrained", "finetune"):
        assert moved[part] == result[part], part


def test_train_dir_resumes_only_under_its_key(tmp_path):
    (tmp_path / "train").mkdir()
    sparc.fresh_train_dir(tmp_path, {"a": 1})
    sparc.fresh_train_dir(tmp_path, {"a": 1})
    assert (tmp_path / "train").is_dir()
    sparc.fresh_train_dir(tmp_path, {"a": 2})
    assert not (tmp_path / "train").exists()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="gammas"):
        sparc.SparcConfig(gammas="4,-1")
    with pytest.raises(ValueError, match="methods"):
        sparc.SparcConfig(methods="lora,dora")
    with pytest.raises(ValueError, match="ranks must be a comma-separated list of int"):
        sparc.SparcConfig(ranks="4,x")
    with pytest.raises(ValueError, match="model"):
        sparc.SparcConfig(model="gpt9")


def test_gamma_table_orders_the_grid_numerically():
    # a row read back from the JSON cache has its γ keys sorted as text: "1.0" < "16.0" < "4.0"
    row = {"method": "ra-sparc", "rank": 4, "gamma": 4.0, "w0_gamma_loss": 3.4,
           "gamma_search_seconds": 1.0,
           "gamma_losses": {"1.0": 7.3, "16.0": 3.3, "4.0": 3.2}}
    table = sparc_report.gamma_table([row])
    header = table.splitlines()[0]
    assert header.index("γ = 1.0") < header.index("γ = 4.0") < header.index("γ = 16.0")
    assert "3.2000*" in table and "edge of the grid" not in table  # 4 is interior
    assert "edge of the grid" in sparc_report.gamma_table([{**row, "gamma": 16.0}])
