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
import optax
import pytest
from flax import nnx

from admm_jax.adapters import AdapterParam, adapt_params, lora_init
from admm_jax.core.tree import path_str
from admm_jax.data import prepare_corpus
from admm_jax.models.llama import LlamaConfig, init_params
from admm_jax.training import (
    OptimizerConfig,
    TrainConfig,
    make_train_step,
    merge_params,
    next_token_loss,
    per_client_loss,
    relative_lr_schedule,
    split_params,
    train,
    trainable_mask,
)
from admm_jax.training.checkpoint import Checkpointer, NonFiniteError, load_model, save_model

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


def small_cfg(lr: float = 3e-3, **kw) -> TrainConfig:
    defaults = dict(steps=8, batch_size=8, seq_len=32, log_every=1, eval_every=4,
                    eval_batches=2, checkpoint_every=4)
    return TrainConfig(**{**defaults, **kw}, optimizer=OptimizerConfig(lr=lr, warmup_steps=2))


MLP = r"layers/\d+/mlp/"


def _leaves(tree) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _batch(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, NANO.vocab_size, shape), jnp.int32)


def _spy(tx: optax.GradientTransformation, seen: list) -> optax.GradientTransformation:
    """``tx`` that records the leaf paths of the gradients it is handed (at trace time)."""
    def update(grads, state, params=None):
        seen.append(sorted(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]))
        return tx.update(grads, state, params)
    return optax.GradientTransformation(tx.init, update)


def test_frozen_base_step_matches_full_step_on_the_trainable_subset():
    """A step that trains only the MLP kernels: same loss and (with SGD) the same new MLP
    weights as a full step; every other weight bit-identical; gradients and Adam state exist
    for the MLP leaves only."""
    graphdef, params = init_params(NANO, jax.random.key(0))
    batch = _batch(0, (4, 17))
    before = _leaves(params)
    mlp = sorted(p for p in before if "/mlp/" in p)
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # the step donates its inputs

    full = make_train_step(graphdef, optax.sgd(0.5))
    p_full, _, m_full = full.step(copy(params), full.init(params), batch)
    seen: list = []
    sub = make_train_step(graphdef, _spy(optax.sgd(0.5), seen), trainable=MLP)
    p_sub, _, m_sub = sub.step(copy(params), sub.init(params), batch)

    assert float(m_sub["loss"]) == pytest.approx(float(m_full["loss"]), rel=1e-6)
    after_full, after_sub = _leaves(p_full), _leaves(p_sub)
    assert sorted(after_sub) == sorted(before)
    for path in before:
        if path in mlp:
            np.testing.assert_allclose(after_sub[path], after_full[path], rtol=1e-5, atol=1e-7)
            assert not np.array_equal(after_sub[path], before[path]), path
        else:
            np.testing.assert_array_equal(after_sub[path], before[path], err_msg=path)
    assert seen == [mlp]  # the optimizer never sees a frozen leaf

    adam = make_train_step(graphdef, optax.adam(1e-3), trainable=MLP)
    state = adam.init(params)
    mu = _leaves(state[0].mu)
    assert sorted(mu) == mlp
    n_mlp = sum(before[p].size for p in mlp)
    assert sum(x.size for x in jax.tree_util.tree_leaves(state)) == 2 * n_mlp + 1  # mu, nu, count


def test_lora_param_filter_trains_only_the_adapter():
    """An NNX Variable type as the filter: ``nnx.LoRAParam`` selects the adapter of a LoRA
    layer; the wrapped base kernel stays bit-identical."""
    model = nnx.LoRA(6, 2, 5, base_module=nnx.Linear(6, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    mask = trainable_mask(graphdef, params, nnx.LoRAParam)
    assert mask == {"base_module": {"bias": False, "kernel": False}, "lora_a": True,
                    "lora_b": True}
    x = jax.random.normal(jax.random.key(2), (8, 6))
    y = jax.random.normal(jax.random.key(3), (8, 5))

    def mse(g, p, batch):
        inputs, targets = batch
        return jnp.mean((nnx.merge(g, p)(inputs) - targets) ** 2)

    ts = make_train_step(graphdef, optax.adam(1e-2), loss_fn=mse, trainable=nnx.LoRAParam)
    opt_state = ts.init(params)
    assert sorted(_leaves(opt_state[0].mu)) == ["lora_a", "lora_b"]
    kernel = np.asarray(params["base_module"]["kernel"])
    p = jax.tree_util.tree_map(jnp.copy, params)
    losses = []
    for _ in range(20):
        p, opt_state, m = ts.step(p, opt_state, (x, y))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(np.asarray(p["base_module"]["kernel"]), kernel)
    assert not np.array_equal(np.asarray(p["lora_b"]), np.asarray(params["lora_b"]))


def test_split_merge_round_trip_and_bad_selections():
    graphdef, params = init_params(NANO, jax.random.key(0))
    trainable, frozen = split_params(params, trainable_mask(graphdef, params, MLP))
    assert all("/mlp/" in p for p in _leaves(trainable))
    assert not any("/mlp/" in p for p in _leaves(frozen))
    assert jax.tree_util.tree_structure(merge_params(trainable, frozen)) == \
        jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match="selects no parameter"):
        trainable_mask(graphdef, params, r"^nothing$")
    with pytest.raises(ValueError, match="structure of params"):
        trainable_mask(graphdef, params, {"embed": True})
    with pytest.raises(TypeError, match="tx must be"):
        make_train_step(graphdef, optax.sgd)
    with pytest.raises(TypeError, match="loss_fn"):
        make_train_step(graphdef, optax.sgd(0.1), loss_fn="ce")


def test_relative_lr_schedule_is_the_lr_schedule_over_its_peak():
    cfg = TrainConfig(steps=20, optimizer=OptimizerConfig(lr=3e-3, warmup_steps=4,
                                                          min_lr_ratio=0.25))
    eta = relative_lr_schedule(cfg)
    np.testing.assert_allclose([float(eta(t)) for t in (0, 2, 4, 20)], [0.0, 0.5, 1.0, 0.25],
                               rtol=1e-5, atol=1e-7)


def test_per_client_loss_gives_each_client_its_own_gradient():
    """Params stacked over 3 clients, batch [3, B, T+1]: one step of the summed, vmapped loss
    moves each client exactly as a single-client step on its own batch would."""
    graphdef, params = init_params(NANO, jax.random.key(0))
    clients = 3
    stacked = jax.tree_util.tree_map(
        lambda x: x + 0.01 * jnp.arange(clients, dtype=x.dtype).reshape(-1, *[1] * x.ndim),
        params)
    batches = _batch(1, (clients, 2, 17))
    ts = make_train_step(graphdef, optax.sgd(0.5), loss_fn=per_client_loss(), has_aux=True)
    new, _, metrics = ts.step(jax.tree_util.tree_map(jnp.copy, stacked), ts.init(stacked),
                              batches)
    assert metrics["client_loss"].shape == (clients,)
    single = make_train_step(graphdef, optax.sgd(0.5))
    for c in range(clients):
        own = jax.tree_util.tree_map(lambda x, c=c: x[c], stacked)
        ref, _, m = single.step(own, single.init(own), batches[c])
        assert float(metrics["client_loss"][c]) == pytest.approx(float(m["loss"]), rel=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(new)):
            np.testing.assert_allclose(np.asarray(b[c]), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(metrics["client_loss"].sum()), rel=1e-6)


def test_train_with_frozen_base_resumes_bit_exactly(corpus, tmp_path):
    """``train(trainable=...)``: checkpoints hold the optimizer state of the subset only, resume
    reproduces the uninterrupted run, frozen weights never move."""
    _, init = init_params(NANO, jax.random.key(9))
    kw = dict(trainable=MLP, init=init, progress=False)
    full = train(NANO, corpus, tmp_path / "full", small_cfg(), **kw)
    train(NANO, corpus, tmp_path / "split", small_cfg(), stop_after=4, **kw)
    resumed = train(NANO, corpus, tmp_path / "split", small_cfg(), **kw)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    start, end, last = _leaves(init), _leaves(full.params), _leaves(resumed.params)
    for path in start:
        np.testing.assert_array_equal(last[path], end[path])
        if "/mlp/" not in path:
            np.testing.assert_array_equal(end[path], start[path], err_msg=path)
    assert sorted(_leaves(full.opt_state[1][0].mu)) == sorted(p for p in start if "/mlp/" in p)


def test_train_an_adapted_graph_trains_only_adapters_and_resumes(corpus, tmp_path):
    """``train(graphdef=...)`` on a model with LoRA + sparse adapters: only adapter leaves move,
    the loss goes down, and a split run resumes into the adapted params' structure."""
    graphdef, init = init_params(NANO, jax.random.key(9))
    rng = np.random.default_rng(0)
    flat = rng.choice(NANO.dim * NANO.mlp_dim, 40, replace=False)
    inits = {"layers/0/mlp/up_proj": lora_init(NANO.dim, NANO.mlp_dim, 2, jax.random.key(1),
                                                rows=flat // NANO.mlp_dim,
                                                cols=flat % NANO.mlp_dim),
             "layers/1/attn/q_proj": lora_init(NANO.dim, NANO.dim, 3, jax.random.key(2))}
    graphdef, init = adapt_params(graphdef, init, inits)
    kw = dict(graphdef=graphdef, init=init, trainable=AdapterParam, progress=False)
    full = train(NANO, corpus, tmp_path / "full", small_cfg(lr=1e-2), **kw)
    train(NANO, corpus, tmp_path / "split", small_cfg(lr=1e-2), stop_after=4, **kw)
    resumed = train(NANO, corpus, tmp_path / "split", small_cfg(lr=1e-2), **kw)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert full.history[-1]["loss"] < full.history[0]["loss"]
    start, end = _leaves(init), _leaves(full.params)
    moved = {p for p in start if not np.array_equal(start[p], end[p])}
    assert moved and all("lora_" in p or "sparse/values" in p for p in moved), sorted(moved)
    assert any("sparse/values" in p for p in moved)
    with pytest.raises(ValueError, match="needs init="):
        train(NANO, corpus, tmp_path / "bad", small_cfg(), graphdef=graphdef)


def test_train_logs_aux_metrics_of_a_custom_loss(corpus, tmp_path):
    def loss_with_aux(graphdef, params, batch):
        loss = next_token_loss(graphdef, params, batch)
        return loss, {"perplexity": jnp.exp(loss)}

    result = train(NANO, corpus, tmp_path / "run", small_cfg(steps=2, eval_every=2),
                   loss_fn=loss_with_aux, has_aux=True, progress=False)
    for record in result.history:
        assert record["perplexity"] == pytest.approx(np.exp(record["loss"]), rel=1e-5)


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
    with pytest.raises(ValueError, match=r"incompatible train config.*optimizer\.lr"):
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
            "--runs_root", str(tmp_path / "runs"), "--name", "cli", "--arch", "max_seq_len", "64",
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
