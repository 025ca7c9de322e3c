"""Adapter initialisations from gradients: W₁ = W0 − (1/γ)·C_p(g) for LoRA-One and RA-SpaRC,
W₁ = W0 for LoRA and RoSA (RoSA's support = top-k squared gradients), equal trainable budgets,
Lemma A.3's effective learning rate ηλ, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from admm_jax.adapters import adapter_param_count, adapters_of, insert_adapters
from admm_jax.core.tree import flat_paths
from admm_jax.models.llama import Llama, LlamaConfig
from admm_jax.sparc import (
    adapter_inits,
    gradient_statistics,
    reconstruct,
    rosa_split,
    sparc_budget,
    sparc_compress,
    svd_compress,
)

NANO = LlamaConfig.preset("nano")
PATHS = ["layers/0/attn/q_proj/kernel", "layers/0/mlp/up_proj/kernel",
         "layers/1/mlp/down_proj/kernel"]
RANK, ALPHA, GAMMA = 2, 8.0, 40.0


@pytest.fixture(scope="module")
def stats():
    graphdef, state = nnx.split(Llama(NANO, rngs=nnx.Rngs(params=0)))
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, NANO.vocab_size, (2, 17)) for _ in range(4)]
    return gradient_statistics(graphdef, params, batches, PATHS, n_samples=1)


def _adapted(method, stats, **kw):
    model = Llama(NANO, rngs=nnx.Rngs(params=0))
    w0 = {p: np.asarray(x) for p, x in flat_paths(nnx.to_pure_dict(nnx.state(model))).items()}
    gradient = {p: stats.samples[p][0] for p in PATHS}
    inits = adapter_inits(method, gradient, rank=RANK, alpha=ALPHA, gamma=GAMMA,
                          key=jax.random.key(3), mean_square=stats.mean_square, **kw)
    insert_adapters(model, inits)
    return model, w0, gradient


@pytest.mark.parametrize("method", ["lora-one", "ra-sparc"])
def test_initial_weight_is_one_compressed_gradient_step(method, stats):
    model, w0, gradient = _adapted(method, stats)
    for path, adapter in adapters_of(model).items():
        g = np.asarray(gradient[f"{path}/kernel"])
        p = sparc_budget(g.shape, r_max=RANK)
        compressed = (reconstruct(sparc_compress(g, p)) if method == "ra-sparc" else
                      np.asarray(svd_compress(g, RANK).u @ svd_compress(g, RANK).v))
        expected = w0[f"{path}/kernel"] - compressed / GAMMA
        np.testing.assert_allclose(adapter.dense(), expected, rtol=1e-5, atol=1e-7)
        assert not np.allclose(adapter.dense(), w0[f"{path}/kernel"])
        assert adapter.scale == ALPHA / RANK


def test_ra_sparc_never_compresses_worse_than_lora_one(stats):
    """The SpaRC step is at least as close to the gradient step as LoRA-One's SVD step."""
    sparc, w0, gradient = _adapted("ra-sparc", stats)
    svd, _, _ = _adapted("lora-one", stats)
    for path, adapter in adapters_of(sparc).items():
        step = -np.asarray(gradient[f"{path}/kernel"]) / GAMMA
        err = {name: np.linalg.norm(a.dense() - w0[f"{path}/kernel"] - step)
               for name, a in (("sparc", adapter), ("svd", adapters_of(svd)[path]))}
        assert err["sparc"] <= err["svd"] * (1 + 1e-5), path


@pytest.mark.parametrize("method", ["lora", "rosa"])
def test_lora_and_rosa_start_at_the_pretrained_weights(method, stats):
    model, w0, _ = _adapted(method, stats)
    for path, adapter in adapters_of(model).items():
        np.testing.assert_array_equal(adapter.dense(), w0[f"{path}/kernel"])
        if method == "rosa":
            square = np.asarray(stats.mean_square[f"{path}/kernel"])
            r_lr, nnz = rosa_split(square.shape, RANK, 0.5)
            assert (adapter.rank, adapter.nnz) == (r_lr, nnz) == (1, sum(square.shape))
            kept = np.zeros(square.shape, bool)
            kept[np.asarray(adapter.sparse.rows), np.asarray(adapter.sparse.cols)] = True
            assert square[kept].min() >= square[~kept].max()  # the top-k squared gradients


def test_every_method_trains_the_same_number_of_parameters(stats):
    budget = sum(RANK * sum(np.shape(stats.mean[p])) for p in PATHS)
    counts = {m: adapter_param_count(_adapted(m, stats)[0])
              for m in ("lora", "lora-one", "rosa", "ra-sparc")}
    assert counts == dict.fromkeys(counts, budget)


def test_lemma_a3_effective_learning_rate_is_eta_lambda():
    """One SGD step of size η on (A, B) with W = W0 + λAB moves the conceptual factors
    A' = √λA, B' = √λB by −ηλ ∇_{A', B'} of the loss of W0 + A'B'."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    w0, x = jax.random.normal(k1, (6, 5)), jax.random.normal(k2, (7, 6))
    a, b = jax.random.normal(k3, (6, 2)), jax.random.normal(k4, (2, 5))
    lam, eta = 3.0, 0.01

    def loss(w):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    ga, gb = jax.grad(lambda a, b: loss(w0 + lam * a @ b), argnums=(0, 1))(a, b)
    ca, cb = jnp.sqrt(lam) * a, jnp.sqrt(lam) * b
    gca, gcb = jax.grad(lambda a, b: loss(w0 + a @ b), argnums=(0, 1))(ca, cb)
    np.testing.assert_allclose(jnp.sqrt(lam) * (a - eta * ga), ca - eta * lam * gca, rtol=1e-5)
    np.testing.assert_allclose(jnp.sqrt(lam) * (b - eta * gb), cb - eta * lam * gcb, rtol=1e-5)


def test_bad_input(stats):
    gradient = {p: stats.samples[p][0] for p in PATHS}
    with pytest.raises(ValueError, match="gamma"):
        adapter_inits("ra-sparc", gradient, rank=RANK, alpha=ALPHA, gamma=0.0)
    with pytest.raises(ValueError, match="alpha"):
        adapter_inits("lora-one", gradient, rank=RANK, alpha=-1.0)
    with pytest.raises(ValueError, match="PRNG key"):
        adapter_inits("lora", gradient, rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match="mean_square"):
        adapter_inits("rosa", gradient, rank=RANK, alpha=ALPHA, key=jax.random.key(0))
    with pytest.raises(ValueError, match="method"):
        adapter_inits("dora", gradient, rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match="kernel leaves"):
        adapter_inits("lora-one", {"layers/0/attn/q_proj": gradient[PATHS[0]]}, rank=RANK,
                      alpha=ALPHA)
