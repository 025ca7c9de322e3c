"""Kernel gradients for adapter initialisation: equal to autodiff of the whole model."""

import jax
import numpy as np
import pytest

from admm_jax.core.tree import flat_paths
from admm_jax.models.llama import LlamaConfig, init_params
from admm_jax.sparc.gradients import gradient_statistics, kernel_gradients
from admm_jax.training.lm import next_token_loss

NANO = LlamaConfig.preset("nano")
PATHS = ["layers/0/attn/q_proj/kernel", "layers/1/mlp/down_proj/kernel"]


@pytest.fixture(scope="module")
def model():
    graphdef, params = init_params(NANO, jax.random.key(0))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, NANO.vocab_size, (2, 17)) for _ in range(3)]
    return graphdef, params, batches


def test_kernel_gradients_equal_the_full_gradient_at_those_leaves(model):
    graphdef, params, batches = model
    full = flat_paths(jax.grad(lambda p: next_token_loss(graphdef, p, batches[0]))(params))
    got = kernel_gradients(graphdef, params, batches[0], PATHS)
    assert sorted(got) == sorted(PATHS)
    for path in PATHS:
        assert got[path].shape == params_shape(params, path)
        np.testing.assert_allclose(got[path], full[path], rtol=1e-5, atol=1e-7)
        assert np.abs(got[path]).max() > 0


def params_shape(params, path):
    return np.shape(flat_paths(params)[path])


def test_statistics_are_the_mean_and_mean_square_of_the_per_batch_gradients(model):
    graphdef, params, batches = model
    stats = gradient_statistics(graphdef, params, iter(batches), PATHS, n_samples=2)
    each = [kernel_gradients(graphdef, params, b, PATHS) for b in batches]
    assert stats.count == 3
    for path in PATHS:
        g = np.stack([np.asarray(e[path]) for e in each])
        np.testing.assert_allclose(stats.mean[path], g.mean(0), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(stats.mean_square[path], (g ** 2).mean(0), rtol=1e-5,
                                   atol=1e-12)
        np.testing.assert_allclose(stats.samples[path], g[:2], rtol=1e-6)
        assert not np.allclose(g[0], g[1])  # different batches, different gradients


def test_bad_paths_and_empty_batches_are_refused(model):
    graphdef, params, batches = model
    with pytest.raises(ValueError, match="no leaf 'layers/9/attn/q_proj/kernel'"):
        kernel_gradients(graphdef, params, batches[0], ["layers/9/attn/q_proj/kernel"])
    with pytest.raises(ValueError, match="not a 2-D kernel"):
        kernel_gradients(graphdef, params, batches[0], ["layers/0/attn_norm/scale"])
    with pytest.raises(ValueError, match="at least one batch"):
        gradient_statistics(graphdef, params, [], PATHS)
