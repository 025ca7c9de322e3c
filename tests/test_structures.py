"""Sparsity structures: parsing, identity under jit/dict keys, and the masks they produce (block
masks against a NumPy tiling reference, on shapes the tiles do not divide)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admm_jax.ops.projection import keep_count
from admm_jax.ops.structures import (
    NM,
    Block,
    Channel,
    Unstructured,
    block_tiles,
    check_kernel_structure,
    effective_sparsity,
    expand_tiles,
    parse_structure,
    structure_mask,
    tile_grid,
    tile_scores,
)


def test_parse_round_trips_and_values_pass_through():
    assert parse_structure("unstructured") == Unstructured()
    assert parse_structure("channel") == Channel()
    assert parse_structure("2:4") == NM(2, 4)
    assert parse_structure("block16") == Block(16) and str(Block(16)) == "block16"
    assert parse_structure("block32") == Block(32) and parse_structure("block1") == Block(1)
    for s in (Unstructured(), Channel(), NM(4, 8), Block(16), Block(32)):
        assert parse_structure(s) is s or parse_structure(s) == s
        assert parse_structure(str(s)) == s
    assert type(parse_structure(Block(np.int64(8))).size) is int


@pytest.mark.parametrize("spec", ["4:2", "0:4", "2:2", "dense", "2-4", NM(3, 3), "blockx",
                                  "block", "block-4", "block1.5", "block 16", "blocks16"])
def test_bad_structures_raise(spec):
    with pytest.raises(ValueError, match="structure"):
        parse_structure(spec)


@pytest.mark.parametrize("spec", ["block0", "block00", Block(0), Block(-16), Block(2.0),
                                  Block(True)])
def test_block_size_must_be_a_positive_integer(spec):
    with pytest.raises(ValueError, match=r"structure 'block.*': the block size must be an "
                                         r"integer >= 1"):
        parse_structure(spec)


def test_kinds_never_compare_equal():
    """Field-less structures are () as tuples: equality and hashes must include the kind, or
    jit would reuse one compiled function for two structures."""
    assert Unstructured() != Channel() and hash(Unstructured()) != hash(Channel())
    assert NM(2, 4) != (2, 4) and NM(2, 4) == NM(2, 4)
    assert Block(4) != (4,) and hash(Block(4)) != hash((4,)) and Block(4) == Block(4)
    assert Block(4) != Block(8) and Block(4) != NM(4, 8) and Block(1) != Unstructured()
    assert len({Unstructured(), Channel(), NM(2, 4), NM(4, 8), Block(2), Block(4)}) == 6
    f = jax.jit(lambda x, s: structure_mask(x, s, 0.5), static_argnums=1)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)) ** 2)
    unstructured, channel, block = f(x, Unstructured()), f(x, Channel()), f(x, Block(2))
    assert not np.array_equal(unstructured, channel)
    assert np.all(np.asarray(channel).all(0) | ~np.asarray(channel).any(0))  # whole columns
    tiles = np.asarray(block).reshape(4, 2, 3, 2)
    assert np.all(tiles.all((1, 3)) | ~tiles.any((1, 3))) and tiles.all((1, 3)).sum() == 6


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


def block_reference(score: np.ndarray, b: int, sparsity: float) -> np.ndarray:
    """Block mask by explicit loops over the tiles and a stable sort of their sums."""
    d_in, d_out = score.shape
    starts = [(r, c) for r in range(0, d_in, b) for c in range(0, d_out, b)]
    sums = np.array([score[r:r + b, c:c + b].astype(np.float64).sum() for r, c in starts])
    kept = np.argsort(-sums, kind="stable")[:keep_count(len(starts), sparsity)]
    mask = np.zeros(score.shape, bool)
    for t in kept:
        r, c = starts[t]
        mask[r:r + b, c:c + b] = True
    return mask


def tile_view(mask: np.ndarray, b: int) -> np.ndarray:
    """``[R, b, C, b]`` view of a mask padded with its tiles' own values (edge tiles repeat)."""
    rows, cols = tile_grid(mask.shape, b)
    padded = np.pad(mask, ((0, rows * b - mask.shape[0]), (0, cols * b - mask.shape[1])),
                    mode="edge")
    return padded.reshape(rows, b, cols, b)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.6, 0.95])
def test_block_masks_on_a_shape_the_tiles_do_not_divide(sparsity):
    """37 × 70 with 16 × 16 tiles: 3 × 5 tiles, the last row 5 inputs tall and the last column
    6 outputs wide; whole tiles only, exactly keep_count(15) of them, the reference's choice."""
    score = np.random.default_rng(4).random((37, 70)).astype(np.float32)
    mask = np.asarray(structure_mask(jnp.asarray(score), "block16", sparsity))
    assert mask.shape == (37, 70) and mask.dtype == bool
    tiles = tile_view(mask, 16)
    kept = tiles.all((1, 3))
    assert np.array_equal(kept, tiles.any((1, 3)))  # every tile all kept or all pruned
    assert kept.sum() == keep_count(15, sparsity)
    np.testing.assert_array_equal(mask, block_reference(score, 16, sparsity))
    sums = np.asarray(tile_scores(jnp.asarray(score), 16))
    np.testing.assert_allclose(sums[2, 4], score[32:, 64:].sum(), rtol=1e-5)  # a 5 × 6 tile
    if 0 < kept.sum() < kept.size:
        assert sums[kept].min() >= sums[~kept].max()


def test_block_masks_recover_planted_tiles():
    """Six tiles (among them partial edge tiles) planted with high scores are exactly the kept
    ones at keep_count(15, 0.6) = 6."""
    rng = np.random.default_rng(5)
    score = rng.random((37, 70)).astype(np.float32)
    planted = np.zeros((3, 5), bool)
    planted[[0, 1, 2, 2, 0, 1], [0, 3, 4, 1, 4, 2]] = True  # (2, 4) is the 5 × 6 corner tile
    truth = np.asarray(expand_tiles(jnp.asarray(planted), 16, (37, 70)))
    score = score + 20.0 * truth
    for spec in ("block16", Block(16)):
        mask = np.asarray(structure_mask(jnp.asarray(score), spec, 0.6))
        np.testing.assert_array_equal(mask, truth)
    assert mask.sum() == 3 * 16 * 16 + 16 * 6 + 5 * 16 + 5 * 6


def test_block_ties_keep_the_earliest_tiles():
    """Equal tile sums: the first tiles in row-major tile order win; a partial tile sums fewer
    entries, so with all-equal entries it loses to every full tile."""
    mask = np.asarray(structure_mask(jnp.ones((32, 48)), Block(16), 0.5))
    np.testing.assert_array_equal(tile_view(mask, 16).all((1, 3)),
                                  [[True, True, True], [False, False, False]])
    score = np.ones((40, 32), np.float32)  # tiles: 2 full rows, then one 8 inputs tall
    score[32:] = 2.0  # the partial row sums 8·16·2 = 256, the full tiles 256 too: a tie
    mask = np.asarray(structure_mask(jnp.asarray(score), Block(16), 0.5))
    np.testing.assert_array_equal(tile_view(mask, 16).all((1, 3)),
                                  [[True, True], [True, False], [False, False]])
    mask = np.asarray(structure_mask(jnp.ones((20, 20)), Block(16), 0.5))
    np.testing.assert_array_equal(tile_view(mask, 16).all((1, 3)), [[True, True], [False, False]])


def test_block_of_size_one_is_unstructured():
    score = jnp.asarray(np.random.default_rng(6).random((9, 7)), jnp.float32)
    np.testing.assert_array_equal(structure_mask(score, Block(1), 0.4),
                                  structure_mask(score, Unstructured(), 0.4))


def test_block_sparsity_and_tiling_helpers():
    assert effective_sparsity("block16", 0.7) == 0.7
    with pytest.raises(ValueError, match="sparsity"):
        effective_sparsity("block16", 1.0)
    assert check_kernel_structure("block32", (37, 70)) == Block(32)  # partial tiles are fine
    with pytest.raises(ValueError, match="2-D"):
        check_kernel_structure("block16", (16, 16, 3))
    assert tile_grid((37, 70), 16) == (3, 5) and tile_grid((32, 64), 32) == (1, 2)
    with pytest.raises(ValueError, match=r"do not tile a \(37, 70\) kernel"):
        expand_tiles(jnp.ones((3, 4), bool), 16, (37, 70))
    mask = np.asarray(structure_mask(jnp.ones((37, 70)), "block16", 0.0))
    assert mask.all()  # the padding never survives as a kept entry outside the true shape


def test_block_tiles_inverts_expand_tiles_and_names_split_tiles():
    tiles = np.random.default_rng(8).random((3, 5)) < 0.5
    mask = expand_tiles(jnp.asarray(tiles), 16, (37, 70))
    np.testing.assert_array_equal(block_tiles(mask, 16), tiles)
    np.testing.assert_array_equal(block_tiles(jnp.zeros((37, 70), bool), 16), False)
    broken = np.asarray(mask).copy()
    broken[36, 69] = ~broken[36, 69]  # the last entry of the 5 × 6 corner tile
    with pytest.raises(ValueError, match=r"not block16-structured: tile \(2, 4\) \(inputs "
                                         r"32:37, outputs 64:70\) is partly kept"):
        block_tiles(broken, 16)
    with pytest.raises(ValueError, match="2-D"):
        block_tiles(jnp.ones(16, bool), 16)
