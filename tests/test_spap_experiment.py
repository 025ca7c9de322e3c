"""experiments.spap end to end on a nano checkpoint: every row finite and shrunk to the
requested widths, the saved SPAP model evaluable on its own, the speed rows against dense."""

import shutil

import numpy as np
from test_experiments import nano_checkpoint

from experiments import evaluate, spap


def test_spap_experiment_end_to_end(tmp_path, monkeypatch):
    base, texts, other, config = nano_checkpoint(tmp_path, monkeypatch)
    argv = ["--checkpoint", str(base), "--corpus", str(texts),
            "--transfer_corpus", str(other), "--runs_root", str(tmp_path / "runs"),
            "--results", str(tmp_path / "spap.md"), "--sparsities", "0.25,0.5",
            "--methods", "spap,spap-global,mag-neuron,mag-neuron+refit,flap", "--n_calibration",
            "8", "--calibration_len", "32", "--eval_seq_len", "32", "--eval_batches", "2",
            "--bench_tokens", "16", "--bench_repeats", "2"]
    result = spap.main(argv)
    n = config.mlp_dim
    dense = result["rows"]["dense"]["params"]
    for s in (0.25, 0.5):
        kept = n - round(s * n)
        for m in ("spap", "spap-global", "mag-neuron", "mag-neuron+refit", "flap"):
            row = result["rows"][f"{m}@{s:g}"]
            assert np.isfinite(row["ppl"]) and np.isfinite(row["transfer_ppl"])
            if m == "spap-global":  # one budget for the model: widths vary, the total does not
                assert abs(sum(row["mlp_dims"]) - config.n_layers * kept) <= config.n_layers
            else:
                assert row["mlp_dims"] == [kept] * config.n_layers
            # three MLP kernels of dim × width per block are all that shrink
            assert row["params"] == dense - 3 * config.dim * (config.n_layers * n
                                                              - sum(row["mlp_dims"]))
    speed = {r["model"]: r for r in result["speed"]}
    assert set(speed) == {"dense", "spap@0.25", "spap@0.5"}
    assert speed["spap@0.5"]["flops"] < speed["spap@0.25"]["flops"] < speed["dense"]["flops"]
    ppl = evaluate.main(["--checkpoint", str(tmp_path / "runs" / "spap-smollm2" / "spap-0.5"),
                         "--corpus", str(other), "--seq_len", "32", "--max_batches", "2"])
    assert np.isfinite(ppl)
    assert "| 50% |" in (tmp_path / "spap.md").read_text()
    for score in ("magnitude", "wanda", "flap"):  # pruned sets grow with the sparsity
        low, high = (np.asarray(result["energy"][f"{score}@{s}"]) for s in ("0.25", "0.5"))
        assert low.shape == (config.n_layers,)
        assert np.all(0 < low) and np.all(low <= high) and np.all(high < 1)

    # rows resumed from a cache without their SPAP checkpoint: the speed part times a model of
    # the same widths (same FLOPs), built by the magnitude selection; --cached_only renders a
    # row missing from the cache as – and does not compute it
    root = tmp_path / "runs" / "spap-smollm2"
    shutil.rmtree(root / "spap-0.5")
    (root / "rows" / "flap-0.5.json").unlink()
    rerun = spap.main([*argv, "--cached_only", "true"])
    assert rerun["rows"]["flap@0.5"] is None and not (root / "rows" / "flap-0.5.json").exists()
    assert rerun["rows"]["spap@0.5"] == result["rows"]["spap@0.5"]
    assert "| 50% | {:,} |".format(dense - 3 * config.dim * (config.n_layers * n - sum(
        result["rows"]["spap@0.5"]["mlp_dims"]))) in (tmp_path / "spap.md").read_text()
    assert (tmp_path / "spap.md").read_text().count(" – |") == 2  # both domains' tables
    again = {r["model"]: r for r in rerun["speed"]}
    assert (root / "widths-0.5" / "model.json").exists() or any(
        (root / "widths-0.5").glob("*/model.json"))
    assert again["spap@0.5"]["flops"] == speed["spap@0.5"]["flops"]
    assert [speed["spap@0.5"]["checkpoint"], again["spap@0.5"]["checkpoint"],
            again["spap@0.25"]["checkpoint"]] == ["spap-0.5", "widths-0.5", "spap-0.25"]
    assert "| spap@0.5 | widths-0.5 |" in (tmp_path / "spap.md").read_text()
