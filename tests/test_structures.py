"""Sparsity structures: parsing, identity under jit/dict keys, and the masks they produce."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax.ops.structures import (
    NM,
    Channel,
    Unstructured,
    check_kernel_structure,
    effective_sparsity,
    parse_structure,
    structure_mask,
)


def test_parse_round_trips_and_values_pass_through():
    assert parse_structure("unstructured") == Unstructured()
    assert parse_structure("channel") == Channel()
    assert parse_structure("2:4") == NM(2, 4)
    for s in (Unstructured(), Channel(), NM(4, 8)):
        assert parse_structure(s) is s or parse_structure(s) == s
        assert parse_structure(str(s)) == s


@pytest.mark.parametrize("spec", ["4:2", "0:4", "2:2", "dense", "2-4", NM(3, 3)])
def test_bad_structures_raise(spec):
    with pytest.raises(ValueError, match="structure"):
        parse_structure(spec)


def test_kinds_never_compare_equal():
    """Field-less structures are () as tuples: equality and hashes must include the kind, or
    jit would reuse one compiled function for two structures."""
    assert Unstructured() != Channel() and hash(Unstructured()) != hash(Channel())
    assert NM(2, 4) != (2, 4) and NM(2, 4) == NM(2, 4)
    assert len({Unstructured(), Channel(), NM(2, 4), NM(4, 8)}) == 4
    f = jax.jit(lambda x, s: structure_mask(x, s, 0.5), static_argnums=1)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)) ** 2)
    unstructured, channel = f(x, Unstructured()), f(x, Channel())
    assert not np.array_equal(unstructured, channel)
    assert np.all(np.asarray(channel).all(0) | ~np.asarray(channel).any(0))  # whole columns


def test_masks_keep_the_requested_counts_and_largest_scores():
    rng = np.random.default_rng(1)
    score = rng.random((16, 10)).astype(np.float32)
    m = np.asarray(structure_mask(jnp.asarray(score), "unstructured", 0.7))
    assert m.sum() == 160 - int(0.7 * 160)
    assert score[m].min() >= score[~m].max()
    m = np.asarray(structure_mask(jnp.asarray(score), NM(2, 4), 0.0))
    groups = m.reshape(4, 4, 10)
    assert (groups.sum(1) == 2).all()
    kept = np.where(groups, score.reshape(4, 4, 10), np.inf).min(1)
    dropped = np.where(~groups, score.reshape(4, 4, 10), -np.inf).max(1)
    assert (kept >= dropped).all()
    m = np.asarray(structure_mask(jnp.asarray(score), Channel(), 0.3))
    columns = m.all(0)
    assert columns.sum() == 10 - int(0.3 * 10) and (m.any(0) == columns).all()
    sums = score.sum(0)
    assert sums[columns].min() >= sums[~columns].max()


def test_effective_sparsity_and_kernel_checks():
    assert effective_sparsity("2:4", 0.9) == 0.5
    assert effective_sparsity("unstructured", 0.9) == 0.9
    with pytest.raises(ValueError, match="sparsity"):
        effective_sparsity("channel", 1.0)
    with pytest.raises(ValueError, match="M = 4 must divide"):
        check_kernel_structure("2:4", (10, 8), "q_proj")
    with pytest.raises(ValueError, match="2-D"):
        check_kernel_structure("unstructured", (4,))
