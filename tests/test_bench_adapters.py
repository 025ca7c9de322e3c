"""The adapter benchmark: equal trainable budgets are exact, the sparse layer's gradient equals the
dense-scatter autograd one, and a ``--quick`` run writes the JSON report with every ratio."""

import json

import jax
import numpy as np
import pytest

from admm_jax.adapters import adapter_paths
from admm_jax.models.layouts import linear_specs
from admm_jax.models.llama import LlamaConfig, init_params
from experiments import bench_adapters as bench

NANO = LlamaConfig.preset("nano")
BUDGET = 0.05


@pytest.mark.parametrize("shape", bench.SHAPES + bench.QUICK_SHAPES + ((576, 192),))
@pytest.mark.parametrize("fraction", [0.005, 0.02, 0.3])
def test_equal_budget_is_exact(shape, fraction):
    m, n = shape
    split = bench.equal_budget(shape, fraction)
    assert split.params == split.r_max * (m + n) == split.rank * (m + n) + split.nnz
    assert split.rank == split.r_max // 2 >= 1
    assert split.r_max == max(2, round(fraction * m * n / (m + n)))


def test_equal_budget_values_and_errors():
    assert bench.equal_budget((576, 576), 0.02) == bench.Split(6, 3, 3456, 6912)
    assert bench.equal_budget((576, 1536), 0.005) == bench.Split(2, 1, 2112, 4224)
    with pytest.raises(ValueError, match="LoRA rank"):
        bench.equal_budget((64, 1), 0.5)
    with pytest.raises(ValueError, match="budget"):
        bench.equal_budget((64, 64), 0.0)


def test_parse_budgets_and_config_errors():
    assert bench.parse_budgets("0.005,0.02") == (0.005, 0.02)
    for spec in ("0.5,x", "0", "1.5"):
        with pytest.raises(ValueError, match="budget"):
            bench.parse_budgets(spec)
    with pytest.raises(ValueError, match="model"):
        bench.BenchAdaptersConfig(model="gpt5")
    with pytest.raises(ValueError, match="tokens"):
        bench.BenchAdaptersConfig(tokens=0)


def test_random_support_distinct_in_range():
    rows, cols = bench.random_support((7, 5), 20, np.random.default_rng(0))
    assert rows.shape == cols.shape == (20,)
    assert rows.min() >= 0 and rows.max() < 7 and cols.min() >= 0 and cols.max() < 5
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 20


def test_model_inits_split_every_projection():
    graphdef, params = init_params(NANO, jax.random.key(0))
    specs = linear_specs(NANO)
    lora = bench.model_inits(graphdef, params, BUDGET, "lora")
    sparse = bench.model_inits(graphdef, params, BUDGET, "sparse_lora")
    assert set(lora) == set(sparse) == set(adapter_paths(NANO))
    for path in lora:
        split = bench.equal_budget((specs[path].in_features, specs[path].out_features), BUDGET)
        assert lora[path].lora_a.shape[1] == split.r_max and lora[path].values.shape == (0,)
        assert sparse[path].lora_a.shape[1] == split.rank
        assert sparse[path].values.shape == (split.nnz,)
    with pytest.raises(ValueError, match="kind"):
        bench.model_inits(graphdef, params, BUDGET, "dense_scatter")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench_adapters.json"
    result = bench.main(["--quick", "true", "--budgets", str(BUDGET), "--out", str(out)])
    return result, json.loads(out.read_text())


def _expected_model_params():
    specs = linear_specs(NANO)
    return sum(bench.equal_budget((specs[p].in_features, specs[p].out_features), BUDGET).params
               for p in adapter_paths(NANO))


def test_quick_layer_rows(quick):
    result, written = quick
    assert written == json.loads(json.dumps(result))
    assert written["quick"] and written["repeats"] == 3
    rows = written["layer"]
    assert [tuple(r["shape"]) for r in rows] == list(bench.QUICK_SHAPES)
    for row in rows:
        split = bench.equal_budget(tuple(row["shape"]), BUDGET)
        assert row["trainable_params"] == dict.fromkeys(bench.LAYER_KINDS, split.params)
        assert (row["r_max"], row["rank"], row["nnz"]) == split[:3]
        assert set(row["seconds"]) == set(row["memory"]) == set(bench.LAYER_KINDS)
        for key in ("time_vs_lora", "temp_vs_lora", "peak_vs_lora", "footprint_vs_lora"):
            assert set(row[key]) == set(bench.LAYER_KINDS[1:])
        assert row["time_vs_lora"]["sparse_lora"] == pytest.approx(
            row["seconds"]["sparse_lora"] / row["seconds"]["lora"])
        for m in row["memory"].values():
            assert m["footprint_bytes"] == (m["argument_bytes"] + m["output_bytes"]
                                            - m["alias_bytes"] + m["temp_bytes"])
        # SDDMM backward and the dense xᵀg-then-gather autograd agree
        assert row["grad_max_abs_diff"] < 1e-4


def test_quick_model_rows(quick):
    _, written = quick
    model = written["model"]
    assert (model["name"], model["batch_size"], model["seq_len"]) == ("nano", 2, 16)
    assert model["adapted_linears"] == 7 * NANO.n_layers
    (row,) = model["rows"]
    assert row["trainable_params"] == dict.fromkeys(bench.MODEL_KINDS, _expected_model_params())
    assert set(row["step_s"]) == set(row["memory"]) == set(bench.MODEL_KINDS)
    for key in ("step_time_vs_lora", "temp_vs_lora", "peak_vs_lora", "footprint_vs_lora"):
        assert set(row[key]) == {"sparse_lora"}
    assert row["memory"]["sparse_lora"]["alias_bytes"] > 0  # params and state are donated


def test_quick_table(quick):
    result, _ = quick
    lines = bench.format_table(result).splitlines()
    assert len(lines) == 2 + len(result["layer"]) + len(result["model"]["rows"])
    assert "64x172 budget 5.00% lora r=2 | r=1 nnz=236" in lines[2]
