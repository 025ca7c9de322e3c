"""Training loop, checkpoints and resume: loss goes down, resume is bit-exact, data parallelism
matches one device, bad resumes are refused, SIGKILL during a save loses nothing committed."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax.data import prepare_corpus
from admm_jax.models.llama import LlamaConfig, init_params
from admm_jax.training.checkpoint import Checkpointer, NonFiniteError, load_model, save_model
from admm_jax.training.loop import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
NANO = LlamaConfig.preset("nano", max_seq_len=64)
WORDS = ("the king and queen walk to the castle where a knight keeps watch over "
         "seven towers of stone while rivers run east toward the sea").split()


def write_corpus(root: Path, n_docs: int = 12, seed: int = 0) -> Path:
    """Documents of sentences from a small grammar: learnable structure, a few thousand tokens."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        sentences = []
        for _ in range(60):
            start = rng.integers(0, len(WORDS) - 8)
            sentences.append(" ".join(WORDS[start:start + rng.integers(4, 8)]).capitalize() + ".")
        (root / f"doc{d:02d}.txt").write_text(" ".join(sentences) + "\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    return prepare_corpus(write_corpus(base / "texts"), vocab_size=300, cache_dir=base / "cache")


def small_cfg(**kw) -> TrainConfig:
    defaults = dict(steps=8, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, log_every=1,
                    eval_every=4, eval_batches=2, checkpoint_every=4)
    return TrainConfig(**{**defaults, **kw})


def test_loss_goes_down(corpus, tmp_path):
    result = train(NANO, corpus, tmp_path / "run", small_cfg(steps=80, log_every=10, eval_every=40,
                                                             checkpoint_every=80), progress=False)
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < losses[0] - 1.5, losses
    assert result.val_perplexity < np.exp(losses[0]) / 3
    assert (tmp_path / "run" / "checkpoints" / "80").is_dir()


def test_resume_is_bit_exact(corpus, tmp_path):
    full = train(NANO, corpus, tmp_path / "full", small_cfg(), progress=False)
    first = train(NANO, corpus, tmp_path / "split", small_cfg(), stop_after=4, progress=False)
    assert [r["loss"] for r in first.history] == [r["loss"] for r in full.history[:4]]
    resumed = train(NANO, corpus, tmp_path / "split", small_cfg(), progress=False)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    for a, b in zip(jax.tree_util.tree_leaves(full.params),
                    jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_incompatible_resume_is_refused_and_touches_nothing(corpus, tmp_path):
    run = tmp_path / "run"
    train(NANO, corpus, run, small_cfg(), stop_after=4, progress=False)
    before = _snapshot(run)
    with pytest.raises(ValueError, match=r"incompatible train config.*lr"):
        train(NANO, corpus, run, small_cfg(lr=1e-2), progress=False)
    with pytest.raises(ValueError, match=r"incompatible model config.*n_layers"):
        train(dataclasses.replace(NANO, n_layers=3), corpus, run, small_cfg(steps=8),
              progress=False)
    assert _snapshot(run) == before


def test_bad_train_inputs(corpus, tmp_path):
    with pytest.raises(ValueError, match="max_seq_len"):
        train(NANO, corpus, tmp_path / "a", small_cfg(seq_len=65), progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        train(dataclasses.replace(NANO, vocab_size=100), corpus, tmp_path / "b", small_cfg(),
              progress=False)
    with pytest.raises(ValueError, match="steps"):
        small_cfg(steps=0)


def test_data_parallel_matches_single_device(tmp_path, run_on_cpu_devices):
    script = textwrap.dedent(f"""
        import json, sys, jax
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from admm_jax.data import prepare_corpus
        from admm_jax.training.sharding import data_mesh
        from admm_jax.training.loop import train
        from test_train import NANO, small_cfg, write_corpus
        assert jax.device_count() == 8, jax.devices()
        base = Path({str(tmp_path)!r})
        corpus = prepare_corpus(write_corpus(base / "texts"), vocab_size=300,
                                cache_dir=base / "cache")
        out = {{}}
        for n in (1, 8):
            r = train(NANO, corpus, base / f"run{{n}}", small_cfg(steps=4),
                      mesh=data_mesh(jax.devices()[:n]), progress=False)
            out[n] = [h["loss"] for h in r.history]
        print(json.dumps(out))
    """)
    stdout = run_on_cpu_devices(script, 8, timeout=600)
    losses = json.loads(stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(losses["8"], losses["1"], rtol=1e-5)


def test_nonfinite_params_are_never_checkpointed(corpus, tmp_path):
    _, params = init_params(NANO, jax.random.key(0))
    ckpt = Checkpointer(tmp_path / "ck", model_config=NANO, tokenizer=corpus.tokenizer)
    ckpt.save(1, params)
    ckpt.wait()
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["final_norm"]["scale"] = bad["final_norm"]["scale"].at[0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match="final_norm"):
        ckpt.save(2, bad)
    ckpt.wait()
    assert ckpt.latest_step() == 1
    ckpt.close()


def test_save_load_model_round_trip(corpus, tmp_path):
    _, params = init_params(NANO, jax.random.key(5))
    save_model(tmp_path / "m", params, model_config=NANO, tokenizer=corpus.tokenizer, step=7,
               meta={"note": "x"})
    loaded = load_model(tmp_path / "m")
    assert loaded.config == NANO and loaded.step == 7 and loaded.meta["note"] == "x"
    assert loaded.tokenizer.to_str() == corpus.tokenizer.to_str()
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not an admm_jax checkpoint"):
        load_model(tmp_path)


def test_sigkill_during_save_keeps_previous_checkpoint(corpus, tmp_path):
    """Kill a process that saves ~40 MB checkpoints back to back at several moments; whatever
    the moment, the latest committed step loads and holds exactly the values saved at that step."""
    tok = tmp_path / "tok.json"
    tok.write_text(corpus.tokenizer.to_str())
    cfg = dataclasses.replace(NANO, vocab_size=20000, dim=256, mlp_dim=512)  # ~40 MB of params
    script = textwrap.dedent(f"""
        import sys, jax, jax.numpy as jnp
        sys.path.insert(0, {str(REPO)!r})
        from admm_jax.training.checkpoint import Checkpointer
        from admm_jax.data import load_tokenizer
        from admm_jax.models.llama import LlamaConfig, abstract_params
        cfg = LlamaConfig.from_dict({cfg.to_dict()!r})
        _, abstract = abstract_params(cfg)
        ckpt = Checkpointer(sys.argv[1], model_config=cfg, tokenizer=load_tokenizer({str(tok)!r}),
                            max_to_keep=3)
        for step in range(1, 1000):
            params = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, step, s.dtype), abstract)
            ckpt.save(step, params)
            print(step, flush=True)
    """)
    for i, delay in enumerate((0.0, 0.4, 1.1)):
        directory = tmp_path / f"ck{i}"
        proc = subprocess.Popen([sys.executable, "-c", script, str(directory)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # a save starts only after the previous one committed: once step 2 has been handed to
        # orbax, step 1 is on disk and step 2 (or 3) is being written when the kill lands
        assert proc.stdout is not None
        while proc.stdout.readline().strip() != "2":
            assert proc.poll() is None, "the saving process died before its second save"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        loaded = load_model(directory)
        assert loaded.step >= 1
        for leaf in jax.tree_util.tree_leaves(loaded.params):
            assert float(leaf.min()) == float(leaf.max()) == loaded.step


def test_pretrain_cli_then_evaluate(tmp_path, monkeypatch):
    from experiments import evaluate, pretrain

    texts = write_corpus(tmp_path / "texts")
    monkeypatch.setenv("ADMM_JAX_CACHE", str(tmp_path / "cache"))
    args = ["--model", "nano", "--corpus", str(texts), "--vocab_size", "300",
            "--runs_root", str(tmp_path / "runs"), "--name", "cli", "--arch.max_seq_len", "64",
            "--train.steps", "6", "--train.batch_size", "4", "--train.seq_len", "32",
            "--train.eval_batches", "0", "--train.log_every", "2"]
    val_ppl = pretrain.main(args)
    run = tmp_path / "runs" / "cli"
    for name in ("config.json", "metrics.jsonl", "summary.md", "loss.png", "train_config.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["model_config"]["max_seq_len"] == 64
    ppl = evaluate.main(["--checkpoint", str(run), "--seq_len", "32", "--batch_size", "4"])
    assert ppl == pytest.approx(val_ppl, rel=1e-5)
    with pytest.raises(SystemExit):
        pretrain.main(["--train.stepz", "3"])
