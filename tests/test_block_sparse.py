"""Block-sparse (BSR) storage and its XLA products: the format round trip, the validation errors,
and SpMM / SpMMᵀ / SDDMM plus a ``jax.grad`` through them against the dense reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_xla
from kernels import reference as kreference
from kernels.block import (
    BlockSparseMatrix,
    block_column_offsets,
    block_from_dense,
    block_row_order,
    block_sparse_matrix,
)

N_IN, N_OUT, B = 37, 70, 16  # grid 3 × 5, neither axis a multiple of b


def _planted(n_in=N_IN, n_out=N_OUT, b=B, density=0.3, seed=0):
    """Random entries in random tiles, with block row 1 and block column 2 empty (on grids of at
    least 3 × 4 tiles) and the padded corner tile kept."""
    rng = np.random.default_rng(seed)
    g0, g1 = -(-n_in // b), -(-n_out // b)
    tiles = rng.random((g0, g1)) < density
    if g0 >= 3 and g1 >= 4:
        tiles[1, :] = False
        tiles[:, 2] = False
    tiles[0, 0] = tiles[-1, -1] = True
    keep = np.kron(tiles, np.ones((b, b), bool))[:n_in, :n_out] & (rng.random((n_in, n_out)) < 0.7)
    return (rng.standard_normal((n_in, n_out)) * keep).astype(np.float32)


def _dense_tiles(a, b):
    """``a`` zero-padded to the block grid, as ``[G₀, G₁, b, b]`` tiles."""
    g0, g1 = -(-a.shape[0] // b), -(-a.shape[1] // b)
    padded = np.zeros((g0 * b, g1 * b), np.float32)
    padded[:a.shape[0], :a.shape[1]] = a
    return padded.reshape(g0, b, g1, b).transpose(0, 2, 1, 3)


def test_round_trip_order_offsets_and_index_dtypes():
    w = _planted()
    m = block_from_dense(w, block_size=B)
    kept = np.abs(_dense_tiles(w, B)).sum(axis=(2, 3)) > 0
    assert m.grid == (3, 5) and m.block_size == B and m.shape == (N_IN, N_OUT)
    assert not kept[1].any() and not kept[:, 2].any() and kept[2, 4]
    assert m.n_blocks == kept.sum() and m.nnz == m.n_blocks * B * B
    assert m.density == pytest.approx(kept.mean())
    assert m.values.shape == (m.n_blocks, B, B) and m.values.dtype == jnp.float32
    assert m.block_rows.dtype == jnp.int16 and m.block_cols.dtype == jnp.int16
    np.testing.assert_array_equal(m.to_dense(), w)
    rows, cols = np.asarray(m.block_rows, np.int64), np.asarray(m.block_cols, np.int64)
    np.testing.assert_array_equal(kept[rows, cols], True)
    assert np.all(np.diff(cols * 3 + rows) > 0)  # strictly column-major over the grid
    np.testing.assert_array_equal(m.values, _dense_tiles(w, B)[rows, cols])
    np.testing.assert_array_equal(block_column_offsets(m), np.r_[0, np.cumsum(kept.sum(0))])
    order = np.asarray(block_row_order(m))
    assert np.all(np.diff(rows[order] * 5 + cols[order]) > 0)  # row-major, columns kept in order
    assert isinstance(jax.tree.map(lambda a: a, m), BlockSparseMatrix)


def test_mask_zeroes_entries_off_it_inside_kept_tiles():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((N_IN, N_OUT)).astype(np.float32)  # dense: every tile nonzero
    mask = np.zeros_like(w, bool)
    mask[3, 5] = mask[36, 69] = mask[20, 40] = True
    m = block_from_dense(w, mask, block_size=B)
    np.testing.assert_array_equal(m.block_rows, [0, 1, 2])
    np.testing.assert_array_equal(m.block_cols, [0, 2, 4])
    np.testing.assert_array_equal(m.to_dense(), np.where(mask, w, 0))
    assert np.count_nonzero(m.values) == 3
    m8 = block_from_dense(jnp.asarray(w, jnp.bfloat16), mask, block_size=8, index_dtype="int32")
    assert m8.values.dtype == jnp.bfloat16 and m8.block_rows.dtype == jnp.int32
    assert m8.grid == (5, 9) and m8.n_blocks == 3
    np.testing.assert_array_equal(np.asarray(m8.to_dense(), np.float32),
                                  np.where(mask, np.asarray(jnp.asarray(w, jnp.bfloat16),
                                                            np.float32), 0))


def test_block_sparse_matrix_sorts_values_with_their_tiles():
    rng = np.random.default_rng(2)
    v = rng.standard_normal((3, 4, 4)).astype(np.float32)
    m = block_sparse_matrix(v, np.array([2, 0, 1]), np.array([1, 1, 0]), (10, 7))
    np.testing.assert_array_equal(m.block_rows, [1, 0, 2])
    np.testing.assert_array_equal(m.block_cols, [0, 1, 1])
    np.testing.assert_array_equal(m.values, v[[2, 1, 0]])
    assert m.grid == (3, 2)
    dense = np.zeros((12, 8), np.float32)
    dense[8:12, 4:8], dense[0:4, 4:8], dense[4:8, 0:4] = v
    np.testing.assert_array_equal(m.to_dense(), dense[:10, :7])
    wide = block_sparse_matrix(np.ones((1, 16, 16)), np.array([0]), np.array([39_999]),
                               (16, 16 * 40_000))
    assert wide.block_rows.dtype == jnp.int16 and wide.block_cols.dtype == jnp.int32
    assert wide.with_values(2 * wide.values).values.sum() == 2 * 256


def test_under_jit_indices_are_only_sorted():
    v = jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 2, 2)

    @jax.jit
    def build(rows, cols):
        return block_sparse_matrix(v, rows, cols, (4, 4))

    m = build(jnp.array([1, 0]), jnp.array([1, 1]))
    np.testing.assert_array_equal(m.block_rows, [0, 1])
    np.testing.assert_array_equal(m.values, v[::-1])
    build(jnp.array([0, 0]), jnp.array([5, 5]))  # no concrete check under jit: no error
    with pytest.raises(ValueError, match="block_from_dense needs concrete arrays"):
        jax.jit(lambda w: block_from_dense(w, block_size=2))(jnp.ones((4, 4)))


@pytest.mark.parametrize("args, match", [
    ((np.ones((2, 4, 4)), np.array([0, 3]), np.array([0, 1]), (10, 7)),
     r"block_rows\[1\] = 3 is out of range for a block grid of 3"),
    ((np.ones((2, 4, 4)), np.array([0, 1]), np.array([0, -1]), (10, 7)),
     r"block_cols\[0\] = -1 is out of range"),
    ((np.ones((2, 4, 4)), np.array([1, 1]), np.array([0, 0]), (10, 7)),
     r"duplicated block \(block_row, block_col\) = \(1, 0\)"),
    ((np.ones((2, 4, 3)), np.array([0, 1]), np.array([0, 0]), (10, 7)),
     "mismatched tile shapes"),
    ((np.ones((2, 16)), np.array([0, 1]), np.array([0, 0]), (10, 7)), "mismatched tile shapes"),
    ((np.ones((3, 4, 4)), np.array([0, 1]), np.array([0, 0, 1]), (10, 7)),
     r"1-D of length n_blocks = 3"),
    ((np.ones((1, 4, 4)), np.array([0]), np.array([0]), (10,)), r"shape must be \(n_in, n_out\)"),
])
def test_bad_blocks_raise(args, match):
    with pytest.raises(ValueError, match=match):
        block_sparse_matrix(*args)


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="block_rows must be integers"):
        block_sparse_matrix(np.ones((1, 4, 4)), np.array([0.0]), np.array([0]), (8, 8))
    with pytest.raises(ValueError, match="int16 indices cannot address"):
        block_sparse_matrix(np.ones((1, 1, 1)), np.array([0]), np.array([0]), (40_000, 3),
                            index_dtype="int16")
    with pytest.raises(ValueError, match=r"block_size must be an integer in \[1, inf\]"):
        block_from_dense(np.ones((4, 4)), block_size=0)
    with pytest.raises(TypeError, match="block_size must be an integer"):
        block_from_dense(np.ones((4, 4)), block_size=2.0)
    with pytest.raises(ValueError, match="mask shape"):
        block_from_dense(np.ones((3, 4)), np.ones((4, 3)), block_size=2)
    with pytest.raises(ValueError, match="w must be a 2-D"):
        block_from_dense(np.ones(4), block_size=2)
    m = block_from_dense(_planted(), block_size=B)
    with pytest.raises(ValueError, match="values must have shape"):
        m.with_values(jnp.ones((m.n_blocks, B, B - 1)))
    with pytest.raises(ValueError, match=r"budget must be an integer in \[1, inf\]"):
        block_xla.spmm(jnp.ones((2, N_IN)), m, budget=0)


def _ref_sddmm(x, dy, m):
    dense = np.asarray(x, np.float32).T @ np.asarray(dy, np.float32)
    return _dense_tiles(dense, m.block_size)[np.asarray(m.block_rows), np.asarray(m.block_cols)]


CASES = {
    "f32": dict(t=11, dtype=jnp.float32, b=B, density=0.3, budget=block_xla.TEMP_BUDGET, tol=1e-5),
    "bf16": dict(t=9, dtype=jnp.bfloat16, b=B, density=0.3, budget=block_xla.TEMP_BUDGET,
                 tol=1e-5),
    "odd-b": dict(t=6, dtype=jnp.float32, b=5, density=0.4, budget=block_xla.TEMP_BUDGET,
                  tol=1e-5),
    "b32": dict(t=4, dtype=jnp.float32, b=32, density=1.0, budget=block_xla.TEMP_BUDGET,
                tol=1e-5),
    # 3 tiles of 11 tokens per step: the last chunk overlaps its predecessor
    "chunks": dict(t=11, dtype=jnp.float32, b=4, density=0.5, budget=3 * 2 * 4 * 4 * 11,
                   tol=1e-5),
    # 4 tokens × 1 tile per step: the last token tile overlaps its predecessor
    "token-tiles": dict(t=11, dtype=jnp.float32, b=B, density=0.3, budget=2 * 4 * B * 4,
                        tol=1e-5),
    # the fused SDDMM's token tiles are multiples of GRAM_GROUP: 16 + 16 overlapping tokens
    "groups": dict(t=20, dtype=jnp.float32, b=B, density=0.3, budget=block_xla.TEMP_BUDGET,
                   tol=1e-5),
    "einsum-b64": dict(t=5, dtype=jnp.float32, b=64, density=1.0, budget=block_xla.TEMP_BUDGET,
                       tol=1e-5),
    "one-per-step": dict(t=3, dtype=jnp.float32, b=B, density=0.3, budget=1, tol=1e-5),
    "empty": dict(t=5, dtype=jnp.float32, b=B, density=0.0, budget=block_xla.TEMP_BUDGET,
                  tol=0.0),
}


def _case(name):
    c = CASES[name]
    w = _planted(b=c["b"], density=c["density"], seed=3)
    if c["density"] == 0.0:
        w[:] = 0.0
    m = block_from_dense(w, block_size=c["b"])
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((c["t"], N_IN)), c["dtype"])
    dy = jnp.asarray(rng.standard_normal((c["t"], N_OUT)), c["dtype"])
    return c, m, x, dy


@pytest.mark.parametrize("case", list(CASES))
def test_xla_products_match_the_dense_reference(case):
    c, m, x, dy = _case(case)
    tt, chunk = block_xla._spmm_sizes(c["budget"], 4, c["t"], c["b"], max(m.n_blocks, 1))
    if case == "chunks":
        assert (tt, chunk) == (c["t"], 3) and m.n_blocks % chunk
    if case == "token-tiles":
        assert (tt, chunk) == (4, 1)
    if case == "groups":
        assert block_xla._sddmm_sizes(c["budget"], 4, c["t"], c["b"], m.n_blocks)[::2] == (16, 16)
    assert (c["b"] > block_xla.FUSED_MAX_BLOCK) == (case == "einsum-b64")
    if case == "empty":
        assert m.n_blocks == 0
    w = np.asarray(m.to_dense(), np.float32)
    xf, dyf = np.asarray(x, np.float32), np.asarray(dy, np.float32)
    y = block_xla.spmm(x, m, budget=c["budget"])
    dx = block_xla.spmm_t(dy, m, budget=c["budget"])
    dv = block_xla.sddmm(x, dy, m, budget=c["budget"])
    assert y.dtype == dx.dtype == dv.dtype == jnp.float32  # bf16 accumulates in fp32
    assert y.shape == (c["t"], N_OUT) and dx.shape == (c["t"], N_IN)
    assert dv.shape == (m.n_blocks, c["b"], c["b"])
    tol = c["tol"]
    np.testing.assert_allclose(y, xf @ w, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, dyf @ w.T, rtol=tol, atol=tol)
    np.testing.assert_allclose(dv, _ref_sddmm(x, dy, m), rtol=tol, atol=10 * tol)
    # the references take BSR too
    np.testing.assert_allclose(kreference.spmm(x, m), y, rtol=tol, atol=tol)
    np.testing.assert_allclose(kreference.spmm_t(dy, m), dx, rtol=tol, atol=tol)
    np.testing.assert_allclose(kreference.sddmm(x, dy, m), dv, rtol=tol, atol=10 * tol)
    b = c["b"]
    if b >= 32:
        return  # a grid of 2 × 3 tiles or fewer: no empty block row or column
    assert np.all(np.asarray(y)[:, 2 * b:3 * b] == 0)  # the empty block column
    assert np.all(np.asarray(dx)[:, b:2 * b] == 0)  # the empty block row


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _xla_matmul(x, w, budget):
    return block_xla.spmm(x, w, budget=budget)


def _xla_matmul_fwd(x, w, budget):
    return _xla_matmul(x, w, budget), (x, w)


def _xla_matmul_bwd(budget, res, dy):
    x, w = res
    dx = block_xla.spmm_t(dy, w, budget=budget).astype(x.dtype)
    dv = block_xla.sddmm(x, dy, w, budget=budget).astype(w.values.dtype)
    return dx, BlockSparseMatrix(dv, None, None, w.shape)


_xla_matmul.defvjp(_xla_matmul_fwd, _xla_matmul_bwd)


@pytest.mark.parametrize("case", ["f32", "bf16", "chunks", "token-tiles", "empty"])
def test_grad_through_the_xla_products_matches_dense_grad(case):
    c, m, x, dy = _case(case)

    def loss(matmul, x, values):
        return jnp.sum(matmul(x, m.with_values(values)) * dy.astype(jnp.float32))

    def dense(x, w):
        return x.astype(jnp.float32) @ w.to_dense().astype(jnp.float32)

    got = jax.jit(jax.grad(functools.partial(loss, lambda x, w: _xla_matmul(x, w, c["budget"])),
                           (0, 1)))(x, m.values)
    want = jax.grad(functools.partial(loss, dense), (0, 1))(x, m.values)
    assert got[0].dtype == x.dtype and got[1].shape == m.values.shape
    tol = 1e-2 if c["dtype"] == jnp.bfloat16 else 1e-5  # dx is rounded back to bf16
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-4)


def test_padding_entries_are_never_read_and_get_zero_gradient():
    rng = np.random.default_rng(5)
    v = rng.standard_normal((2, B, B)).astype(np.float32)  # nonzero in the padding too
    m = block_sparse_matrix(v, np.array([2, 0]), np.array([4, 1]), (N_IN, N_OUT))
    x = jnp.asarray(rng.standard_normal((7, N_IN)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((7, N_OUT)), jnp.float32)
    w = np.asarray(m.to_dense())
    np.testing.assert_allclose(block_xla.spmm(x, m), np.asarray(x) @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(block_xla.spmm_t(dy, m), np.asarray(dy) @ w.T, rtol=1e-5,
                               atol=1e-5)
    dv = np.asarray(block_xla.sddmm(x, dy, m))
    corner = dv[list(np.asarray(m.block_rows)).index(2)]  # tile (2, 4): rows 32…47, cols 64…79
    assert np.all(corner[N_IN - 32:] == 0) and np.all(corner[:, N_OUT - 64:] == 0)
    assert np.abs(corner[:N_IN - 32, :N_OUT - 64]).min() > 0


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("b", [16, 32])
def test_temporaries_stay_below_the_dense_gradient(b):
    """At a SmolLM2 MLP shape (576 × 1536, 512 tokens, 10 % of the tiles) the compiled forward +
    backward holds fewer temporary bytes than the dense gradient ``xᵀ dy`` alone, within the
    byte budget of the gathered tiles and products."""
    shape, t = (576, 1536), 512
    rng = np.random.default_rng(6)
    tiles = rng.random((shape[0] // b, shape[1] // b)) < 0.1
    w = rng.standard_normal(shape).astype(np.float32) * np.kron(tiles, np.ones((b, b), bool))
    m = block_from_dense(w, block_size=b)
    x = jnp.asarray(rng.standard_normal((t, shape[0])), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((t, shape[1])), jnp.float32)

    def fwd_bwd(x, dy, m):
        return block_xla.spmm(x, m), block_xla.spmm_t(dy, m), block_xla.sddmm(x, dy, m)

    temp = _temp_bytes(fwd_bwd, x, dy, m)
    assert temp <= 4 * shape[0] * shape[1]
    _, chunk = block_xla._spmm_sizes(block_xla.TEMP_BUDGET, 4, t, b, m.n_blocks)
    # the budget's tiles and products, one chunk of V_kᵀ, index vectors
    assert temp <= block_xla.TEMP_BUDGET + 4 * chunk * b * b + 4096
    assert _temp_bytes(kreference.sddmm, x, dy, m) >= 4 * shape[0] * shape[1]
