"""Sparsity structures as small typed values, with the one place that turns a score into a mask.

A structure says *which* entries of a ``[in, out]`` kernel may be zeroed together:

* :class:`Unstructured` — any entries; the fraction of zeros is the caller's ``sparsity``;
* :class:`NM` — in every group of ``m`` consecutive inputs of each output, keep ``n``
  (``2:4``, ``4:8``; fixes the sparsity at ``1 − n/m``);
* :class:`Channel` — whole output units (columns of the kernel, rows of the PyTorch ``[out, in]``
  weight): the structured sparsity of GLU pruning;
* :class:`Block` — whole ``b × b`` tiles of the kernel (``block16``, ``block32``: the tile sizes
  of block-sparse matmul kernels).

Block tiling: a ``[in, out]`` kernel is zero-padded up to ``[⌈in/b⌉·b, ⌈out/b⌉·b]`` and cut into
``R × C = ⌈in/b⌉ × ⌈out/b⌉`` tiles; a tile at the bottom or right edge that reaches into the
padding is a *partial* tile and still counts as one tile. A tile's score is the sum of its true
entries' scores (:func:`tile_scores`; the padding adds nothing), the ``keep_count(R·C,
sparsity)`` tiles with the largest sums are kept (ties: earliest tile in row-major tile order)
and the tile mask is broadcast back to the kernel's true shape (:func:`expand_tiles`;
:func:`block_tiles` reads it back from a mask, checking that no tile is split). The caller's
``sparsity`` is thus a fraction of *tiles*: it is also the fraction of zeroed entries when ``b``
divides both dimensions, and otherwise depends on which partial tiles are kept (a partial tile
sums fewer entries, so it ranks below a full tile of the same entry scores).

ELSA's projection, its ``finalize`` and the one-shot pruners all take a structure (or its string
form, :func:`parse_structure`) and call :func:`structure_mask`, so a new structure is one class
and one branch here (the dispatch of jaxpruner's ``sparsity_types``, with immutable values).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from admm_jax._checks import check_int, check_real
from admm_jax.ops.projection import keep_count, nm_mask, topk_mask

Array = jax.Array


# Equality and hashing by type as well as fields: the field-less ``Unstructured()`` and
# ``Channel()`` are both ``()`` as tuples, and ``NM(2, 4) == (2, 4)``; structures are jit static
# arguments and dict keys, so they must not compare equal across kinds.
def _typed_eq(self, other) -> bool:
    return type(self) is type(other) and tuple.__eq__(self, other)


def _typed_ne(self, other) -> bool:
    return not _typed_eq(self, other)


def _typed_hash(self) -> int:
    return hash((type(self).__name__, *self))


class Unstructured(NamedTuple):
    """Any entries may be pruned."""

    __eq__, __ne__, __hash__ = _typed_eq, _typed_ne, _typed_hash

    def __str__(self) -> str:
        return "unstructured"


class NM(NamedTuple):
    """Keep ``n`` of every ``m`` consecutive inputs of each output (``0 < n < m``)."""

    n: int
    m: int

    __eq__, __ne__, __hash__ = _typed_eq, _typed_ne, _typed_hash

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


class Channel(NamedTuple):
    """Prune whole output units: columns of a ``[in, out]`` kernel, scored by their summed
    entry scores."""

    __eq__, __ne__, __hash__ = _typed_eq, _typed_ne, _typed_hash

    def __str__(self) -> str:
        return "channel"


class Block(NamedTuple):
    """Prune whole ``size × size`` tiles of a ``[in, out]`` kernel, scored by their summed entry
    scores (``size ≥ 1``; partial edge tiles allowed, see the module docstring)."""

    size: int

    __eq__, __ne__, __hash__ = _typed_eq, _typed_ne, _typed_hash

    def __str__(self) -> str:
        return f"block{self.size}"


Structure = Unstructured | NM | Channel | Block
StructureSpec = str | Structure

_BLOCK_PREFIX = "block"
_FORMS = "'unstructured', 'channel', 'N:M' (e.g. '2:4') or 'blockB' (e.g. 'block16')"


def _parse_block(spec: StructureSpec) -> Block:
    """``"block16"`` or ``Block(16)`` → ``Block(16)``, after checking the size is an int ≥ 1."""
    if isinstance(spec, Block):
        size = spec.size
    else:
        digits = spec[len(_BLOCK_PREFIX):]
        if not digits.isdecimal() or not digits.isascii():
            raise ValueError(f"structure must be {_FORMS}, got {spec!r}")
        size = int(digits)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"structure {str(spec)!r}: the block size must be an integer >= 1, got "
                         f"{size!r}")
    return Block(int(size))


def parse_structure(spec: StructureSpec) -> Structure:
    """``"unstructured"`` → :class:`Unstructured`, ``"N:M"`` (e.g. ``"2:4"``) → :class:`NM`,
    ``"channel"`` → :class:`Channel`, ``"blockB"`` (e.g. ``"block16"``) → :class:`Block`;
    structure values pass through (an :class:`NM` or :class:`Block` is re-checked)."""
    if isinstance(spec, (Unstructured, Channel)):
        return spec
    if isinstance(spec, Block) or (isinstance(spec, str) and spec.startswith(_BLOCK_PREFIX)):
        return _parse_block(spec)
    if isinstance(spec, NM):
        n, m = spec
    elif spec == "unstructured":
        return Unstructured()
    elif spec == "channel":
        return Channel()
    else:
        try:
            n, m = (int(p) for p in str(spec).split(":"))
        except ValueError:
            raise ValueError(f"structure must be {_FORMS}, got {spec!r}") from None
    if not 0 < n < m:
        raise ValueError(f"structure {n}:{m} needs 0 < N < M")
    return NM(n, m)


def effective_sparsity(structure: StructureSpec, sparsity: float) -> float:
    """The fraction of zeros a structure produces: ``1 − n/m`` for N:M, else ``sparsity`` (for
    :class:`Block`, the fraction of tiles)."""
    structure = parse_structure(structure)
    if isinstance(structure, NM):
        return 1.0 - structure.n / structure.m
    return check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)


def check_kernel_structure(structure: StructureSpec, shape: tuple[int, ...],
                           what: str = "the kernel") -> Structure:
    """The parsed structure, after checking it fits a ``[in, out]`` kernel of ``shape``."""
    structure = parse_structure(structure)
    if len(shape) != 2:
        raise ValueError(f"{what} must be a 2-D [in, out] kernel, got shape {tuple(shape)}")
    if isinstance(structure, NM) and shape[0] % structure.m:
        raise ValueError(f"structure {structure}: M = {structure.m} must divide the input "
                         f"dimension of every pruned kernel, but {what} has {shape[0]} inputs")
    return structure


def tile_grid(shape: tuple[int, ...], size: int) -> tuple[int, int]:
    """``(R, C) = (⌈in/b⌉, ⌈out/b⌉)``: the tiles of ``b = size`` along each dimension of a
    ``[in, out]`` kernel (partial edge tiles included)."""
    check_int("size", size, 1)
    d_in, d_out = shape
    return -(-d_in // size), -(-d_out // size)


def tile_scores(score: Array, size: int) -> Array:
    """f32 ``[R, C]`` sums of a ``[in, out]`` score matrix over its ``size × size`` tiles, the
    matrix zero-padded up to multiples of ``size`` (:func:`tile_grid`)."""
    rows, cols = tile_grid(score.shape, size)
    d_in, d_out = score.shape
    padded = jnp.pad(score.astype(jnp.float32),
                     ((0, rows * size - d_in), (0, cols * size - d_out)))
    return jnp.sum(padded.reshape(rows, size, cols, size), axis=(1, 3))


def expand_tiles(tiles: Array, size: int, shape: tuple[int, int]) -> Array:
    """A ``[R, C]`` tile array broadcast to every entry of its tile and sliced to the kernel's
    true ``shape = (in, out)``: the inverse layout of :func:`tile_scores`."""
    rows, cols = tiles.shape
    if (rows, cols) != tile_grid(shape, size):
        raise ValueError(f"tiles of shape {tiles.shape} do not tile a {tuple(shape)} kernel "
                         f"with {size} × {size} tiles (expected {tile_grid(shape, size)})")
    full = jnp.broadcast_to(tiles[:, None, :, None], (rows, size, cols, size))
    return full.reshape(rows * size, cols * size)[:shape[0], :shape[1]]


def block_tiles(mask: Array, size: int) -> Array:
    """The bool ``[R, C]`` tile mask of a block-structured ``[in, out]`` keep mask (the inverse of
    :func:`expand_tiles`), after checking that every ``size × size`` tile is kept or pruned
    whole. An eager check (it reads the mask's values): ``ValueError`` naming a split tile."""
    mask = jnp.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D [in, out] array, got shape {mask.shape}")
    rows, cols = tile_grid(mask.shape, size)
    pad = ((0, rows * size - mask.shape[0]), (0, cols * size - mask.shape[1]))
    every = jnp.pad(mask, pad, constant_values=True).reshape(rows, size, cols, size)
    some = jnp.pad(mask, pad, constant_values=False).reshape(rows, size, cols, size)
    every, some = jnp.all(every, axis=(1, 3)), jnp.any(some, axis=(1, 3))
    split = jnp.argwhere(every != some)
    if split.shape[0]:
        r, c = (int(i) for i in split[0])
        raise ValueError(f"mask is not {Block(size)}-structured: tile ({r}, {c}) (inputs "
                         f"{r * size}:{min((r + 1) * size, mask.shape[0])}, outputs "
                         f"{c * size}:{min((c + 1) * size, mask.shape[1])}) is partly kept")
    return every


def structure_mask(score: Array, structure: StructureSpec, sparsity: float) -> Array:
    """Bool keep-mask of a ``[in, out]`` score matrix under ``structure``.

    * unstructured: the ``keep_count(size, sparsity)`` largest scores (ties: lowest flat index);
    * N:M: the ``n`` largest of every ``m`` consecutive inputs of each output;
    * channel: the ``keep_count(out, sparsity)`` columns with the largest summed score, whole;
    * block: the ``keep_count(R·C, sparsity)`` ``b × b`` tiles with the largest summed score,
      whole (ties: earliest tile, row-major; tiling in the module docstring).
    """
    structure = check_kernel_structure(structure, score.shape)
    if isinstance(structure, NM):
        return nm_mask(score, structure.n, structure.m)
    if isinstance(structure, Channel):
        columns = jnp.sum(score.astype(jnp.float32), axis=0)
        keep = topk_mask(columns, keep_count(columns.size, sparsity))
        return jnp.broadcast_to(keep[None, :], score.shape)
    if isinstance(structure, Block):
        tiles = tile_scores(score, structure.size)
        keep = topk_mask(tiles, keep_count(tiles.size, sparsity))
        return expand_tiles(keep, structure.size, score.shape)
    return topk_mask(score, keep_count(score.size, sparsity))
