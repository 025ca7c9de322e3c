"""Smoke run of the sparse-kernel benchmark: the JSON it writes has every contender side by side,
the SDDMM values equal the dense gradient's, compact toy models keep fewer bytes. No timings are
asserted."""

import json

import pytest

from experiments import bench_sparse


def test_quick_run_writes_every_part(tmp_path):
    out = tmp_path / "bench.json"
    result = bench_sparse.main(["--quick", "true", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["parts"] == ["spmm", "sddmm", "models"]
    assert {(r["density"], r["tokens"]) for r in result["spmm"]} == {
        (d, t) for d in (0.01, 0.1) for t in (1, 512)}
    for row in result["spmm"]:
        assert row["speedup"] == pytest.approx(row["dense_s"] / row["spmm_s"])
    (sddmm,) = result["sddmm"]
    assert sddmm["max_abs_diff"] < 1e-3 and sddmm["nnz"] > 0
    models = {r["model"]: r for r in result["models"]}
    assert set(models) == {"dense", "sparse90", "nm24", "slr50"}
    assert models["dense"]["layouts"] == 0
    for name in ("sparse90", "nm24", "slr50"):  # every decoder linear compact, fewer bytes
        assert models[name]["layouts"] == 14
        assert models[name]["resident_bytes_vs_dense"] < 1, name


def test_parts_select_benchmarks_and_bad_parts_are_refused(tmp_path, capsys):
    result = bench_sparse.main(["--quick", "true", "--parts", "sddmm", "--out",
                                str(tmp_path / "b.json")])
    assert "sddmm" in result and "spmm" not in result and "models" not in result
    with pytest.raises(SystemExit):
        bench_sparse.main(["--parts", "spmm,gemm", "--out", str(tmp_path / "c.json")])
    assert "parts must be one of" in capsys.readouterr().err
