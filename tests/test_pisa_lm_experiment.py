"""experiments.pisa_lm end to end on nano: clients hold whole documents of one source, every
method sees the same batches, the chosen setting is the tuning argmin, perplexity falls."""

import numpy as np
import pytest
from test_experiments import write_texts

from experiments import pisa_lm


def _sources(tmp_path, monkeypatch):
    monkeypatch.setenv("ADMM_JAX_CACHE", str(tmp_path / "cache"))
    return [str(write_texts(tmp_path / "north", n_docs=8)),
            str(write_texts(tmp_path / "south", n_docs=8, seed=1))]


def _argv(tmp_path, sources):
    return ["--model", "nano", "--sources", ",".join(sources), "--runs_root",
            str(tmp_path / "runs"), "--results", str(tmp_path / "pisa-lm.md"), "--steps", "8",
            "--batch_size", "2", "--seq_len", "16", "--eval_every", "4", "--eval_batches", "1",
            "--tune_batches", "1", "--val_fraction", "0.25"]


def test_clients_hold_one_source_and_see_their_own_windows(tmp_path, monkeypatch):
    sources = _sources(tmp_path, monkeypatch)
    cfg = pisa_lm.parse_config(pisa_lm.LmConfig, _argv(tmp_path, sources))
    data = pisa_lm.client_data(cfg, 512)
    assert len(data.train) == len(data.tune) == 4
    assert [label.split(":")[0] for label in data.labels] == ["north"] * 2 + ["south"] * 2
    assert set(data.val) == {"north", "south"}
    batch = pisa_lm.client_batch(data, cfg, step=3)
    assert batch.shape == (4, 2, 17)
    np.testing.assert_array_equal(batch, pisa_lm.client_batch(data, cfg, step=3))
    for tokens, windows in zip(data.train, batch):
        for w in windows:  # every window is a contiguous crop of the client's own train tokens
            starts = np.flatnonzero(tokens[:len(tokens) - 16] == w[0])
            assert any(np.array_equal(tokens[s:s + 17], w) for s in starts)


def test_pisa_lm_end_to_end(tmp_path, monkeypatch):
    sources = _sources(tmp_path, monkeypatch)
    monkeypatch.setattr(pisa_lm, "GRIDS", {
        "adamw": [dict(lr=1e-4), dict(lr=1e-2)], "muon": [dict(lr=0.03)],
        "sisa": [dict(sigma=0.1, rho=100.0)], "nsisa": [dict(sigma=0.1, rho=10.0)]})
    argv = _argv(tmp_path, sources)
    vocab = pisa_lm.client_data(pisa_lm.parse_config(pisa_lm.LmConfig, argv), 512).vocab_size
    cells = pisa_lm.main(argv)
    assert set(cells) == {"adamw", "muon", "sisa", "nsisa"}
    for method, cell in cells.items():
        final = cell["best"]["final"]
        assert np.isfinite(final["mean"]) and np.isfinite(final["tune"])
        # the near-uniform init scores ≈ the vocabulary; eight steps of every method beat it
        assert final["mean"] < 0.8 * vocab, (method, final["mean"], vocab)
        assert [p["step"] for p in cell["best"]["curve"]] == [4, 8]
    grid = cells["adamw"]["grid"]
    assert cells["adamw"]["hp"] == min(grid, key=lambda hv: hv[1])[0]
    text = (tmp_path / "pisa-lm.md").read_text()
    assert "| nsisa |" in text and "pisa-lm_curves.png" in text


@pytest.mark.parametrize("field, message", [
    (dict(sources="shakespeare"), "at least two distinct"),
    (dict(sources="shakespeare,no/such/dir"), "neither a registered corpus"),
    (dict(methods="sgd"), "unknown methods"),
    (dict(tune_fraction=1.5), "tune_fraction"),
])
def test_bad_config(field, message):
    with pytest.raises(ValueError, match=message):
        pisa_lm.LmConfig(**field)
