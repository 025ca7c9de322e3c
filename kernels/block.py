"""Block-sparse storage (BSR) of a linear kernel ``W ∈ R^{n_in × n_out}`` (``y = x @ W``).

``W`` is cut into square ``b × b`` tiles on the block grid of ``G = (⌈n_in/b⌉, ⌈n_out/b⌉)``
tiles; only the stored ones are kept, as ``n_blocks`` dense tiles

    W[block_rows[k]·b + i, block_cols[k]·b + j] = values[k][i, j],   0 ≤ i, j < b,
    (block_cols[k], block_rows[k]) strictly increasing,

i.e. sorted column-major over the block grid, as the COO format of :mod:`kernels.sparse` is over
the entries. The stored tiles feeding output block column ``c`` are one contiguous run
``[off[c], off[c+1])`` of the CSC-like offsets :func:`block_column_offsets`; the transpose
product ``dy @ Wᵀ`` reads them in the row-major order :func:`block_row_order`. Dense tiles turn
the scalar gathers of COO into contiguous ``b``-wide loads and the products into small dense
matmuls — the structure block-sparse GPU kernels are built on (Gray, Radford & Kingma 2017,
"GPU Kernels for Block-Sparse Weights"; Gale et al. 2020, "Sparse GPU Kernels for Deep
Learning").

Shapes that are not multiples of ``b``: the grid covers ``W`` zero-padded to
``(G₀·b, G₁·b)``. The entries of a tile that fall in that padding are part of ``values`` but
never reach ``y``: products zero-pad ``x`` (the padded rows meet zeros) and slice the padded
output columns off, so those entries also receive zero gradient; :func:`to_dense` drops them and
:func:`block_from_dense` stores them as zeros.

Block indices address the *grid*: ``int16`` when a grid axis allows (``≤ 32,767`` tiles) and
``int32`` otherwise, per axis (:func:`~kernels.sparse.index_dtype_for`). ``density`` counts tiles
(``n_blocks / (G₀·G₁)``) and ``nnz`` the stored numbers ``n_blocks·b²``, zeros inside kept tiles
included.

Any block size ``b ≥ 1`` works with the XLA products (:mod:`kernels.block_xla`); 16 and 32 are
the intended sizes, and the only ones GPU (Pallas) kernels are written for.

:class:`BlockSparseMatrix` is a pytree whose leaves are ``values``, ``block_rows`` and
``block_cols``; ``shape`` is static metadata, so a matrix passes through ``jit`` / ``grad`` and
only its values need be trained.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax._checks import check_int, is_traced
from kernels.sparse import IndexDtype, _check_shape, index_dtype_for, segment_offsets


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSparseMatrix:
    """``W ∈ R^{n_in × n_out}`` stored as ``b × b`` tiles with
    ``W[block_rows[k]·b + i, block_cols[k]·b + j] = values[k][i, j]``, sorted by
    ``(block_cols, block_rows)``; build it with :func:`block_sparse_matrix` or
    :func:`block_from_dense`, which validate.

    Fields: ``values`` f[n_blocks, b, b]; ``block_rows`` int16/int32[n_blocks] in ``[0, G₀)``;
    ``block_cols`` int16/int32[n_blocks] in ``[0, G₁)``, with the block grid
    ``(G₀, G₁) = (⌈n_in/b⌉, ⌈n_out/b⌉)``; ``shape = (n_in, n_out)`` (static, the true shape of
    ``W``, padding excluded)."""

    values: jax.Array
    block_rows: jax.Array
    block_cols: jax.Array
    shape: tuple[int, int] = dataclasses.field(metadata={"static": True})

    @property
    def block_size(self) -> int:
        """The tile side ``b``."""
        return int(self.values.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        """The block grid ``(⌈n_in/b⌉, ⌈n_out/b⌉)``."""
        return block_grid(self.shape, self.block_size)

    @property
    def n_blocks(self) -> int:
        """Number of stored tiles."""
        return int(self.values.shape[0])

    @property
    def nnz(self) -> int:
        """Number of stored numbers ``n_blocks · b²`` (zeros inside kept tiles included)."""
        return self.n_blocks * self.block_size ** 2

    @property
    def density(self) -> float:
        """Fraction of the block grid stored: ``n_blocks / (G₀ · G₁)``."""
        rows, cols = self.grid
        return self.n_blocks / max(rows * cols, 1)

    def to_dense(self) -> jax.Array:
        """The dense ``[n_in, n_out]`` matrix (zeros off the stored tiles, padding dropped)."""
        return block_to_dense(self)

    def with_values(self, values: jax.Array) -> BlockSparseMatrix:
        """The same tiles with new ``values`` (e.g. trained ones); shape checked."""
        if tuple(values.shape) != tuple(self.values.shape):
            raise ValueError(f"values must have shape {self.values.shape}, got {values.shape}")
        return dataclasses.replace(self, values=values)


def block_grid(shape: tuple[int, int], block_size: int) -> tuple[int, int]:
    """``(⌈n_in/b⌉, ⌈n_out/b⌉)``: the tiles of side ``b`` covering a ``shape`` matrix."""
    return -(-shape[0] // block_size), -(-shape[1] // block_size)


def _check_blocks(rows: np.ndarray, cols: np.ndarray, grid: tuple[int, int],
                  shape: tuple[int, int], block_size: int) -> None:
    """Range and uniqueness of concrete, already column-major-sorted block indices."""
    for name, idx, dim in (("block_rows", rows, grid[0]), ("block_cols", cols, grid[1])):
        bad = (idx < 0) | (idx >= dim)
        if bad.any():
            k = int(np.argmax(bad))
            raise ValueError(f"{name}[{k}] = {int(idx[k])} is out of range for a block grid of "
                             f"{dim} along that axis (shape {shape}, block_size {block_size}, "
                             f"grid {grid})")
    dup = (rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1])
    if dup.any():
        k = int(np.argmax(dup))
        raise ValueError(f"duplicated block (block_row, block_col) = ({int(rows[k])}, "
                         f"{int(cols[k])}); each tile may be stored once")


def block_sparse_matrix(values: jax.Array, block_rows: jax.Array, block_cols: jax.Array,
                        shape: tuple[int, int], *,
                        index_dtype: IndexDtype = "auto") -> BlockSparseMatrix:
    """A validated :class:`BlockSparseMatrix` from ``values [n_blocks, b, b]`` and block indices
    in any order.

    Tiles are sorted by ``(block_cols, block_rows)`` (values permuted alike); indices are cast
    per axis of the block grid with :func:`~kernels.sparse.index_dtype_for`. Raises
    ``ValueError`` for tiles that are not ``[n_blocks, b, b]`` with square ``b × b`` tiles,
    index vectors that are not 1-D of length ``n_blocks``, indices out of range of the block
    grid, duplicated ``(block_row, block_col)`` pairs, or ``int16`` requested for a grid axis
    above 32,767; ``TypeError`` for non-integer indices. Range/duplicate checks need concrete
    indices: under ``jit`` they are skipped (the order is still imposed)."""
    shape = _check_shape(tuple(shape))
    values = jnp.asarray(values)
    block_rows, block_cols = jnp.asarray(block_rows), jnp.asarray(block_cols)
    if values.ndim != 3 or values.shape[1] != values.shape[2] or values.shape[1] < 1:
        raise ValueError(f"values must be [n_blocks, b, b] square tiles; got mismatched tile "
                         f"shapes {values.shape}")
    n = values.shape[0]
    if block_rows.shape != (n,) or block_cols.shape != (n,):
        raise ValueError(f"block_rows and block_cols must be 1-D of length n_blocks = {n}, got "
                         f"shapes {block_rows.shape}, {block_cols.shape}")
    for name, idx in (("block_rows", block_rows), ("block_cols", block_cols)):
        if not jnp.issubdtype(idx.dtype, jnp.integer):
            raise TypeError(f"{name} must be integers, got dtype {idx.dtype}")
    b = int(values.shape[1])
    grid = block_grid(shape, b)
    row_dtype, col_dtype = (index_dtype_for(g, index_dtype) for g in grid)
    if any(is_traced(a) for a in (block_rows, block_cols)):
        order = jnp.lexsort((block_rows, block_cols))
        return BlockSparseMatrix(values=values[order],
                                 block_rows=block_rows[order].astype(row_dtype),
                                 block_cols=block_cols[order].astype(col_dtype), shape=shape)
    r64, c64 = np.asarray(block_rows, np.int64), np.asarray(block_cols, np.int64)
    order = np.lexsort((r64, c64))
    r64, c64 = r64[order], c64[order]
    _check_blocks(r64, c64, grid, shape, b)
    values = values[jnp.asarray(order)] if is_traced(values) else jnp.asarray(
        np.asarray(values)[order])
    return BlockSparseMatrix(values=values, block_rows=jnp.asarray(r64.astype(row_dtype)),
                             block_cols=jnp.asarray(c64.astype(col_dtype)), shape=shape)


def _tiles(a: np.ndarray, block_size: int) -> np.ndarray:
    """``a [n_in, n_out]`` zero-padded to the block grid and cut into ``[G₀, G₁, b, b]`` tiles."""
    b = block_size
    g0, g1 = block_grid(a.shape, b)
    padded = np.zeros((g0 * b, g1 * b), a.dtype)
    padded[:a.shape[0], :a.shape[1]] = a
    return padded.reshape(g0, b, g1, b).transpose(0, 2, 1, 3)


def block_from_dense(w: jax.Array, mask: jax.Array | None = None, *, block_size: int = 16,
                     index_dtype: IndexDtype = "auto") -> BlockSparseMatrix:
    """The ``b × b`` tiles of dense ``w [n_in, n_out]`` (zero-padded to the block grid) that
    contain a kept entry — ``mask`` true, default ``w ≠ 0``. Tile values are ``w · mask``: entries
    off the mask inside a kept tile are stored as 0; ``values`` keep ``w``'s dtype.

    ``n_blocks`` depends on the data, so ``w`` and ``mask`` must be concrete (not traced)."""
    if is_traced(w) or is_traced(mask):
        raise ValueError("block_from_dense needs concrete arrays (n_blocks depends on the data); "
                         "call it outside jit")
    b = check_int("block_size", block_size, minimum=1)
    dtype = jnp.asarray(w).dtype
    w = np.asarray(w, np.float32) if dtype == jnp.bfloat16 else np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D [n_in, n_out] matrix, got shape {w.shape}")
    keep = w != 0 if mask is None else np.asarray(mask, bool)
    if keep.shape != w.shape:
        raise ValueError(f"mask shape {keep.shape} does not match w shape {w.shape}")
    tiles = _tiles(np.where(keep, w, np.zeros((), w.dtype)), b)
    kept = _tiles(keep, b).any(axis=(2, 3))
    cols, rows = np.nonzero(kept.T)  # column-major order over the grid directly
    values = jnp.asarray(tiles[rows, cols], dtype)
    return block_sparse_matrix(values, rows, cols, w.shape, index_dtype=index_dtype)


def block_to_dense(m: BlockSparseMatrix) -> jax.Array:
    """``W`` as a dense ``[n_in, n_out]`` array: the tiles scattered into the zero-padded block
    grid, the padding sliced off."""
    b, (g0, g1) = m.block_size, m.grid
    grid = jnp.zeros((g0, g1, b, b), m.values.dtype)
    grid = grid.at[m.block_rows.astype(jnp.int32), m.block_cols.astype(jnp.int32)].set(
        m.values, unique_indices=True)
    return grid.transpose(0, 2, 1, 3).reshape(g0 * b, g1 * b)[:m.shape[0], :m.shape[1]]


def block_column_offsets(m: BlockSparseMatrix) -> jax.Array:
    """CSC-like pointers over block columns: the tiles of block column ``c`` are
    ``[off[c], off[c+1])``, for ``c = 0 … G₁ − 1`` (int32 ``[G₁ + 1]``,
    :func:`~kernels.sparse.segment_offsets` of ``block_cols``)."""
    return segment_offsets(m.block_cols, m.grid[1])


def block_row_order(m: BlockSparseMatrix) -> jax.Array:
    """The permutation that sorts the tiles by ``(block_rows, block_cols)``: the column-major
    order of ``Wᵀ``'s block grid (a stable sort, since tiles are already ordered by block column
    within a block row)."""
    return jnp.argsort(m.block_rows.astype(jnp.int32), stable=True)
