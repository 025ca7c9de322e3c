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
        assert row["auto_impl"] in ("xla", "densify")
        assert row["auto_s"] == row[f"{row['auto_impl']}_s"]
        assert row["speedup"] == pytest.approx(row["dense_s"] / row["auto_s"])
    assert set(result["densify_above_in_cache"]) == {"1", "512"}
    assert all(0.01 <= d <= 0.1 for d in result["densify_above_in_cache"].values())
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


def test_model_crossover_times_both_forms_of_the_same_model(tmp_path):
    result = bench_sparse.main(["--quick", "true", "--parts", "crossover", "--out",
                                str(tmp_path / "d.json")])
    rows = result["model_crossover"]
    assert {(r["density"], r["tokens"]) for r in rows} == {
        (d, t) for d in (0.1, 0.5) for t in (1, 128)}  # nano's max_seq_len caps 512
    assert all(r["xla_s"] > 0 and r["densify_s"] > 0 and r["dense_s"] > 0 for r in rows)
    assert set(result["densify_above"]) == {"1", "128"}
    assert all(0.1 <= d <= 0.5 for d in result["densify_above"].values())


def _timed(shape, density, xla_s, densify_s, tokens=8):
    return {"shape": list(shape), "density": density, "tokens": tokens, "xla_s": xla_s,
            "densify_s": densify_s}


def test_crossover_is_the_geometric_midpoint_of_the_switch_median_over_shapes():
    grid = (0.01, 0.04, 0.16, 0.64)
    rows = [_timed((4, 4), d, xla_s=d, densify_s=0.1) for d in grid]       # switch 0.04 → 0.16
    rows += [_timed((4, 8), d, xla_s=d, densify_s=0.02) for d in grid]     # switch 0.01 → 0.04
    rows += [_timed((8, 4), d, xla_s=d, densify_s=0.5) for d in grid]      # switch 0.16 → 0.64
    rows += [_timed((4, 4), 0.01, xla_s=1.0, densify_s=0.0, tokens=1)]     # other token count
    assert bench_sparse.crossover(rows, 8) == pytest.approx(0.08)  # median of .02, .08, .32
    # a late XLA win (noise) above the switch moves the crossover past it
    noisy = [_timed((4, 4), d, xla_s=0.05 if d == 0.64 else d, densify_s=0.1) for d in grid]
    assert bench_sparse.crossover(noisy, 8) == 0.64
    assert bench_sparse.crossover([_timed((4, 4), d, 1.0, 0.0) for d in grid], 8) == 0.01


def test_formats_and_memory_parts_compare_coo_bsr_and_dense(tmp_path):
    result = bench_sparse.main(["--quick", "true", "--parts", "formats,memory", "--out",
                                str(tmp_path / "f.json")])
    rows = result["formats"]
    assert {(r["sparsity"], r["tokens"], r["pass"]) for r in rows} == {
        (0.9, t, p) for t in (1, 512) for p in ("forward", "forward+backward")}
    for row in rows:
        for form in ("coo", "bsr16", "bsr32"):
            assert row[f"{form}_vs_dense"] == pytest.approx(row[f"{form}_s"] / row["dense_s"])
            assert row[f"{form}_auto"] in ("xla", "densify")
    for row in result["memory"]:  # the sparse backward's temporaries: below the dense gradient
        assert row["dense_gradient_bytes"] == 4 * 576 * 1536
        assert row["coo_vs_dense_gradient"] < 1 and row["bsr16_vs_dense_gradient"] < 1


def test_device_mode_is_refused_without_an_accelerator(tmp_path):
    with pytest.raises(ValueError, match="needs a GPU or TPU"):
        bench_sparse.main(["--device", "true", "--out", str(tmp_path / "g.json")])
    with pytest.raises(SystemExit):
        bench_sparse.main(["--crossover_structure", "2:4", "--out", str(tmp_path / "h.json")])


def test_device_crossover_times_each_format_against_its_densified_product():
    """The ``--device`` crossover part, run here on the CPU's sparse kernels at toy sizes."""
    out = bench_sparse.bench_device_crossover((64, 96), (0.1, 0.5), (1, 8), repeats=1, warmup=0)
    assert set(out) == {"coo", "block"}
    for part in out.values():
        assert {(r["density"], r["tokens"]) for r in part["rows"]} == {
            (d, t) for d in (0.1, 0.5) for t in (1, 8)}
        assert all(r["sparse_s"] > 0 and r["densify_s"] > 0 for r in part["rows"])
        assert set(part["densify_above"]) == {"1", "8"}
        assert all(0.1 <= d <= 0.5 for d in part["densify_above"].values())
