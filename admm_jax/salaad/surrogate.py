"""The compact sparse + low-rank (SLR) surrogate of a model, exported after SALAAD training.

During training every constrained 2-D block ``X`` (attention/MLP kernels, token embedding) carries
a low-rank part ``L`` and a sparse part ``S`` as dense arrays (static shapes under jit). At export
time each block is stored compactly as a :class:`BlockSurrogate`:

* the thin SVD of ``L``: ``u: f32[m, r]``, ``s: f32[r]`` (descending, > 0), ``v: f32[n, r]`` with
  ``L ≈ u · diag(s) · vᵀ``; singular values ``s_i <= rank_tol · s_0`` are dropped;
* the nonzeros of ``S``: ``values: f32[k]`` sorted by ``|value|`` descending (ties: smaller flat
  index first) and ``indices: int32[k]``, flat row-major indices into ``[m, n]``;
* ``shape: tuple[int, int]`` — ``(m, n)`` as two Python ints (static metadata, not an array; it
  survives an orbax round trip because :func:`save_surrogate` writes it into a JSON index);
* ``sparse_block: int`` — the unit of ``S``: 1 (default) for single entries as above, or ``b``
  for a block-structured ``S`` (``sparse_structure=Block(b)`` in
  :func:`admm_jax.salaad.split.slr_split`), stored as whole ``b × b`` tiles of the kernel
  zero-padded to multiples of ``b`` (:mod:`admm_jax.ops.structures`): ``values: f32[k, b, b]``
  sorted by Frobenius norm descending (ties: smaller tile index first) and ``indices:
  int32[k]``, flat row-major indices into the ``[⌈m/b⌉, ⌈n/b⌉]`` tile grid (padding entries 0).

Both orderings put the most important units first, so a prefix ``(rank, n_sparse)`` is the
truncation that SALAAD's Homomorphic Parameter Allocation deploys (:mod:`admm_jax.salaad.hpa`);
:func:`reconstruct` returns
``u[:, :rank] · diag(s[:rank]) · v[:, :rank]ᵀ + scatter(values[:n_sparse] at indices[:n_sparse])``
(for tiles, ``n_sparse`` counts tiles).

A :data:`Surrogate` maps a block path string (:func:`path_str`, e.g.
``"layers/0/attn/q_proj/kernel"`` or ``"embed/embedding"``) to its :class:`BlockSurrogate`.
Arrays are host ``numpy`` arrays: the surrogate is an export artifact, not a training state.

On disk the surrogate of a checkpoint lives next to its dense weights::

    <checkpoint dir>/surrogate/     one orbax checkpoint (CompositeCheckpointHandler) with items
        index                       JSON: format, block paths in order, shape, rank, nnz,
                                    sparse_block (absent = 1, as in older surrogates), meta
        arrays                      {"b<i>": {"u", "s", "v", "values", "indices"}} (empty arrays
                                    are omitted: orbax cannot store zero-size arrays)

The index is read first and the arrays are restored with a template built from it, so loading
needs no model. Orbax writes into a temporary directory and renames it on commit; a replaced
surrogate is swapped in only after the new one is committed, so a save killed at any point leaves
either the previous surrogate or none — never a partial one that loads.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from admm_jax._checks import check_real
from admm_jax.core.tree import path_str
from admm_jax.ops.structures import Block, StructureSpec, parse_structure, tile_grid
from admm_jax.training.checkpoint import NonFiniteError, resolve_checkpoint_dir

SURROGATE_DIR = "surrogate"
FORMAT = "admm_jax.surrogate.v1"  # on-disk format id (not a module path)
_ARRAY_FIELDS = ("u", "s", "v", "values", "indices")


class BlockSurrogate(NamedTuple):
    """Compact SLR form of one ``[m, n]`` block (see the module docstring).

    Attributes:
        u: ``f32[m, r]`` left singular vectors of the low-rank part.
        s: ``f32[r]`` singular values, descending, all > 0.
        v: ``f32[n, r]`` right singular vectors.
        values: ``f32[k]`` nonzeros of the sparse part, ``|values|`` descending; for
            ``sparse_block = b > 1``, ``f32[k, b, b]`` nonzero tiles, Frobenius norm descending.
        indices: ``int32[k]`` flat row-major positions of ``values`` in ``[m, n]`` (distinct);
            for tiles, in the ``[⌈m/b⌉, ⌈n/b⌉]`` tile grid.
        shape: ``(m, n)`` as Python ints.
        sparse_block: the side ``b`` of a sparse unit (1: single entries).
    """

    u: np.ndarray
    s: np.ndarray
    v: np.ndarray
    values: np.ndarray
    indices: np.ndarray
    shape: tuple[int, int]
    sparse_block: int = 1

    @property
    def rank(self) -> int:
        """Number of stored singular triplets ``r``."""
        return int(self.s.shape[0])

    @property
    def nnz(self) -> int:
        """Number of stored sparse units ``k`` (entries, or tiles when ``sparse_block > 1``)."""
        return int(self.values.shape[0])


def _unit_shape(sparse_block: int) -> tuple[int, ...]:
    """Shape of one stored sparse unit: ``()`` for an entry, ``(b, b)`` for a tile."""
    return () if sparse_block == 1 else (sparse_block, sparse_block)


def sparse_unit(sparse_structure: StructureSpec) -> int:
    """The side ``b`` of the units of SALAAD's sparse part: 1 for ``"unstructured"`` (entries),
    ``b`` for a :class:`Block` (``"blockB"``); any other structure is refused."""
    try:
        structure = parse_structure(sparse_structure)
    except ValueError:
        structure = None
    if isinstance(structure, Block):
        return structure.size
    if str(structure) != "unstructured":
        raise ValueError(f"sparse_structure must be 'unstructured' or 'blockB' (e.g. 'block16', "
                         f"Block(16)), got {sparse_structure!r}")
    return 1


def tiles_of(x: np.ndarray, size: int) -> np.ndarray:
    """``[R·C, b, b]`` tiles of ``x [m, n]`` zero-padded to the tile grid, row-major."""
    rows, cols = tile_grid(x.shape, size)
    padded = np.zeros((rows * size, cols * size), x.dtype)
    padded[:x.shape[0], :x.shape[1]] = x
    return padded.reshape(rows, size, cols, size).transpose(0, 2, 1, 3).reshape(-1, size, size)


def _untile(tiles: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """The inverse of :func:`tiles_of`: all ``R·C`` row-major tiles back to ``[m, n]`` (the
    padding cut off)."""
    rows, cols = tile_grid(shape, size)
    return tiles.reshape(rows, cols, size, size).transpose(0, 2, 1, 3).reshape(
        rows * size, cols * size)[:shape[0], :shape[1]].copy()


def sparse_part(block: BlockSurrogate, n_sparse: int | None = None) -> np.ndarray:
    """Dense ``f32[m, n]`` sum of the first ``n_sparse`` sparse units (``None``: all)."""
    n_sparse = block.nnz if n_sparse is None else int(n_sparse)
    m, n = block.shape
    b = block.sparse_block
    idx = np.asarray(block.indices[:n_sparse], np.int64)
    values = np.asarray(block.values[:n_sparse], np.float32)
    if b == 1:
        out = np.zeros(m * n, np.float32)
        out[idx] = values
        return out.reshape(m, n)
    tiles = np.zeros((math.prod(tile_grid((m, n), b)), b, b), np.float32)
    tiles[idx] = values
    return _untile(tiles, (m, n), b)


Surrogate = dict[str, BlockSurrogate]
"""Block path (:func:`path_str`) -> :class:`BlockSurrogate`."""


def _as_matrix(name: str, x: Any) -> np.ndarray:
    a = np.asarray(jax.device_get(x))
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    return a


def _check_flat_size(shape: tuple[int, int]) -> None:
    if shape[0] * shape[1] >= 2**31:
        raise ValueError(f"block shape {shape} has {shape[0] * shape[1]} entries; int32 flat "
                         "indices address fewer than 2**31")


def block_surrogate_from_factors(u: Any, s: Any, v: Any, values: Any, indices: Any,
                                 shape: tuple[int, int], sparse_block: int = 1) -> BlockSurrogate:
    """Validate and canonicalise given factors into a :class:`BlockSurrogate`.

    Triplets are sorted by singular value (descending) and those with ``s <= 0`` dropped; sparse
    entries with value 0 are dropped and the rest sorted by magnitude (descending, ties by flat
    index). With ``sparse_block = b > 1``, ``values`` are ``[k, b, b]`` tiles at tile-grid
    ``indices``: entries in the padding beyond ``shape`` are zeroed, all-zero tiles dropped and
    the rest sorted by Frobenius norm (descending, ties by tile index). Raises ``ValueError`` on
    inconsistent shapes, out-of-range or duplicate indices.
    """
    m, n = (int(d) for d in shape)
    if m < 1 or n < 1:
        raise ValueError(f"shape must be two positive ints, got {shape!r}")
    _check_flat_size((m, n))
    s = np.asarray(jax.device_get(s), np.float32).reshape(-1)
    r = s.shape[0]
    u = np.asarray(jax.device_get(u), np.float32).reshape((m, 0) if r == 0 else np.shape(u))
    v = np.asarray(jax.device_get(v), np.float32).reshape((n, 0) if r == 0 else np.shape(v))
    if u.shape != (m, r) or v.shape != (n, r):
        raise ValueError(f"factor shapes disagree: u {u.shape}, s {s.shape}, v {v.shape} for "
                         f"a block of shape {(m, n)}; expected u ({m}, {r}) and v ({n}, {r})")
    order = np.argsort(-s, kind="stable")
    order = order[s[order] > 0]
    u, s, v = u[:, order], s[order], v[:, order]
    b = int(sparse_block)
    if b < 1:
        raise ValueError(f"sparse_block must be an int >= 1, got {sparse_block!r}")
    unit = _unit_shape(b)
    indices = np.asarray(jax.device_get(indices)).reshape(-1)
    values = np.asarray(jax.device_get(values), np.float32).reshape((indices.size, *unit)
                                                                    if b > 1 else -1)
    if values.shape[:1] != indices.shape:
        raise ValueError(f"values {values.shape} and indices {indices.shape} must match")
    units = m * n if b == 1 else math.prod(tile_grid((m, n), b))
    if indices.size and (indices.min() < 0 or indices.max() >= units):
        raise ValueError(f"indices must lie in [0, {units}) for a block of shape {(m, n)}"
                         + ("" if b == 1 else f" cut into {b} × {b} tiles"))
    if np.unique(indices).size != indices.size:
        raise ValueError("indices must be distinct")
    if b > 1:  # zero the padding: rebuild the tiles from their true entries
        every = np.zeros((units, *unit), np.float32)
        every[indices] = values
        values = tiles_of(_untile(every, (m, n), b), b)[indices]
    size = np.abs(values) if b == 1 else np.linalg.norm(
        values.reshape(indices.size, b * b).astype(np.float64), axis=1)
    keep = size != 0 if b == 1 else np.any(values.reshape(indices.size, b * b) != 0, axis=1)
    values, indices, size = values[keep], indices[keep].astype(np.int32), size[keep]
    order = np.lexsort((indices, -size))
    return BlockSurrogate(np.ascontiguousarray(u), s, np.ascontiguousarray(v), values[order],
                          indices[order], (m, n), b)


def block_surrogate(low_rank: Any, sparse: Any, *, rank_tol: float = 1e-6,
                    sparse_structure: StructureSpec = "unstructured") -> BlockSurrogate:
    """Compact surrogate of one block from its dense low-rank and sparse parts.

    Args:
        low_rank: ``[m, n]`` low-rank part ``L``. Its SVD is taken in float64 on the host;
            singular values ``s_i > rank_tol · s_0`` are kept (relative tolerance: a dense
            fp32 ``L`` of exact rank r has spurious singular values near ``1e-7 · s_0``).
        sparse: ``[m, n]`` sparse part ``S``; its nonzeros are kept exactly.
        rank_tol: relative singular-value cut-off in ``[0, 1)``.
        sparse_structure: ``"unstructured"`` (entries) or ``Block(b)`` / ``"blockB"``: ``S``
            stored as its ``b × b`` tiles holding a nonzero (the split's
            ``sparse_structure``; a tile with some zero entries is stored whole).
    """
    b = sparse_unit(sparse_structure)
    rank_tol = check_real("rank_tol", rank_tol, low=0.0, high=1.0, high_open=True)
    lr = _as_matrix("low_rank", low_rank)
    sp = _as_matrix("sparse", sparse)
    if lr.shape != sp.shape:
        raise ValueError(f"low_rank {lr.shape} and sparse {sp.shape} must have the same shape")
    shape = (int(lr.shape[0]), int(lr.shape[1]))
    _check_flat_size(shape)
    if not (np.isfinite(lr).all() and np.isfinite(sp).all()):
        raise ValueError("low_rank and sparse must be finite")
    if np.any(lr):
        u, s, vt = np.linalg.svd(lr.astype(np.float64), full_matrices=False)
        r = int(np.sum(s > rank_tol * s[0]))
        u, s, v = u[:, :r], s[:r], vt[:r].T
    else:
        u, s, v = np.zeros((shape[0], 0)), np.zeros((0,)), np.zeros((shape[1], 0))
    flat = sp.reshape(-1) if b == 1 else tiles_of(sp.astype(np.float32), b)
    idx = np.flatnonzero(flat.reshape(flat.shape[0], -1).any(axis=1))
    return block_surrogate_from_factors(u, s, v, flat[idx], idx, shape, b)


def surrogate_from_trees(low_rank: Any, sparse: Any, *, rank_tol: float = 1e-6,
                         sparse_structure: StructureSpec = "unstructured") -> Surrogate:
    """Surrogate of every constrained block from trees of dense ``L`` and ``S`` parts.

    Args:
        low_rank, sparse: pytrees mirroring the params, with the dense ``[m, n]`` parts at the
            constrained leaves and an empty node (``None``, ``optax.MaskedNode()``) elsewhere.
            Both must have the same leaf paths.
        rank_tol, sparse_structure: see :func:`block_surrogate`.

    Returns:
        ``{path_str(path): BlockSurrogate}`` in the trees' flatten order.
    """
    lr_flat = jax.tree_util.tree_flatten_with_path(low_rank)[0]
    sp_flat = jax.tree_util.tree_flatten_with_path(sparse)[0]
    lr = {path_str(p): x for p, x in lr_flat}
    sp = {path_str(p): x for p, x in sp_flat}
    if list(lr) != list(sp):
        raise ValueError(f"low_rank and sparse must have the same constrained leaves; only in "
                         f"low_rank: {sorted(set(lr) - set(sp))}, only in sparse: "
                         f"{sorted(set(sp) - set(lr))}")
    return {p: block_surrogate(lr[p], sp[p], rank_tol=rank_tol,
                               sparse_structure=sparse_structure) for p in lr}


def _check_truncation(block: BlockSurrogate, rank: int, n_sparse: int) -> None:
    if not 0 <= rank <= block.rank:
        raise ValueError(f"rank must be in [0, {block.rank}], got {rank}")
    if not 0 <= n_sparse <= block.nnz:
        raise ValueError(f"n_sparse must be in [0, {block.nnz}], got {n_sparse}")


def reconstruct(block: BlockSurrogate, rank: int | None = None,
                n_sparse: int | None = None) -> np.ndarray:
    """``u[:, :rank] · diag(s[:rank]) · v[:, :rank]ᵀ + scatter(values[:n_sparse] at indices)``.

    ``None`` means all stored triplets / sparse units (entries, or tiles: :func:`sparse_part`).
    Returns ``f32[m, n]`` (numpy)."""
    rank = block.rank if rank is None else int(rank)
    n_sparse = block.nnz if n_sparse is None else int(n_sparse)
    _check_truncation(block, rank, n_sparse)
    m, n = block.shape
    u = np.asarray(block.u[:, :rank], np.float32)
    out = (u * np.asarray(block.s[:rank], np.float32)) @ np.asarray(block.v[:, :rank],
                                                                     np.float32).T
    out = np.ascontiguousarray(out, dtype=np.float32).reshape(-1) if rank else \
        np.zeros(m * n, np.float32)
    if block.sparse_block > 1:
        return out.reshape(m, n) + sparse_part(block, n_sparse)
    out[np.asarray(block.indices[:n_sparse])] += np.asarray(block.values[:n_sparse], np.float32)
    return out.reshape(m, n)


# --------------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------------


def surrogate_dir(checkpoint: str | os.PathLike) -> Path:
    """``<checkpoint dir>/surrogate`` of a checkpoint (or run) directory."""
    return resolve_checkpoint_dir(checkpoint) / SURROGATE_DIR


def _nonfinite_blocks(surrogate: Surrogate) -> list[str]:
    return [p for p, b in surrogate.items()
            if not all(np.isfinite(np.asarray(getattr(b, f))).all() for f in ("u", "s", "v",
                                                                                 "values"))]


def save_surrogate(checkpoint: str | os.PathLike, surrogate: Surrogate, *,
                   meta: dict[str, Any] | None = None) -> Path:
    """Write ``surrogate`` into ``<checkpoint>/surrogate/`` next to the dense weights.

    Args:
        checkpoint: an existing checkpoint (or run) directory written by
            :mod:`admm_jax.training.checkpoint` (save the dense model first).
        surrogate: path -> :class:`BlockSurrogate`.
        meta: JSON-ready fields stored in the index (e.g. the source step, ``rank_tol``).

    Returns:
        The surrogate directory. An existing surrogate is replaced only once the new one is
        committed; leftovers of earlier killed saves are removed (one writer at a time).

    Raises:
        admm_jax.training.checkpoint.NonFiniteError: (a ``FloatingPointError``) if any factor
            or value is NaN or inf; nothing is written.
        FileNotFoundError: if ``checkpoint`` is not a checkpoint directory.
    """
    if not isinstance(surrogate, Mapping) or not all(
            isinstance(b, BlockSurrogate) for b in surrogate.values()):
        raise ValueError("surrogate must map block paths to BlockSurrogate")
    bad = _nonfinite_blocks(surrogate)
    if bad:
        raise NonFiniteError(f"refusing to save a surrogate with non-finite values in blocks "
                             f"{bad[:5]}{' …' if len(bad) > 5 else ''}")
    target = surrogate_dir(checkpoint)
    blocks, arrays = [], {}
    for i, (path, b) in enumerate(surrogate.items()):
        blocks.append({"path": path, "shape": [int(b.shape[0]), int(b.shape[1])],
                       "rank": b.rank, "nnz": b.nnz, "sparse_block": int(b.sparse_block)})
        item = {f: np.asarray(getattr(b, f)) for f in _ARRAY_FIELDS
                if np.asarray(getattr(b, f)).size}
        if item:
            arrays[f"b{i}"] = item
    index = {"format": FORMAT, "blocks": blocks, "meta": dict(meta or {})}
    incoming = target.with_name(f".{SURROGATE_DIR}.incoming-{os.getpid()}")
    old = target.with_name(f".{SURROGATE_DIR}.old-{os.getpid()}")
    for stale in target.parent.glob(f".{SURROGATE_DIR}.*"):  # leftovers of killed saves
        shutil.rmtree(stale, ignore_errors=True)
    items = {"index": ocp.args.JsonSave(index)}
    if arrays:
        items["arrays"] = ocp.args.StandardSave(arrays)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(incoming, args=ocp.args.Composite(**items))
    if target.exists():
        os.replace(target, old)
    os.replace(incoming, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def has_surrogate(checkpoint: str | os.PathLike) -> bool:
    """Whether the checkpoint (or run) directory holds a committed surrogate."""
    return surrogate_dir(checkpoint).is_dir()


def load_surrogate(checkpoint: str | os.PathLike) -> Surrogate:
    """Read the surrogate saved by :func:`save_surrogate` in a checkpoint (or run) directory.

    Raises:
        FileNotFoundError: if the checkpoint has no surrogate.
        ValueError: if the stored surrogate has an unknown format.
    """
    directory = surrogate_dir(checkpoint)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint {str(directory.parent)!r} has no surrogate ({SURROGATE_DIR}/): it was "
            "not trained with SALAAD; run the post-hoc RPCA baseline to build one, or save one "
            "with admm_jax.salaad.surrogate.save_surrogate")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        index = ckptr.restore(directory, args=ocp.args.Composite(
            index=ocp.args.JsonRestore()))["index"]
        if index.get("format") != FORMAT:
            raise ValueError(f"{str(directory)!r} has unsupported surrogate format "
                             f"{index.get('format')!r}; expected {FORMAT!r}")
        template = {}
        for i, blk in enumerate(index["blocks"]):
            (m, n), r, k = blk["shape"], blk["rank"], blk["nnz"]
            unit = _unit_shape(int(blk.get("sparse_block", 1)))
            shapes = {"u": (m, r), "s": (r,), "v": (n, r), "values": (k, *unit),
                      "indices": (k,)}
            item = {f: jax.ShapeDtypeStruct(shp, np.int32 if f == "indices" else np.float32)
                    for f, shp in shapes.items() if int(np.prod(shp))}
            if item:
                template[f"b{i}"] = item
        arrays = (ckptr.restore(directory, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(template)))["arrays"] if template else {})
    out: Surrogate = {}
    for i, blk in enumerate(index["blocks"]):
        (m, n), r, k = blk["shape"], blk["rank"], blk["nnz"]
        b = int(blk.get("sparse_block", 1))
        item = arrays.get(f"b{i}", {})

        def get(f, shp, dtype, item=item):
            return np.asarray(item[f], dtype) if f in item else np.zeros(shp, dtype)

        out[blk["path"]] = BlockSurrogate(
            get("u", (m, r), np.float32), get("s", (r,), np.float32),
            get("v", (n, r), np.float32), get("values", (k, *_unit_shape(b)), np.float32),
            get("indices", (k,), np.int32), (int(m), int(n)), b)
    return out


def surrogate_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` dict stored with a checkpoint's surrogate."""
    directory = surrogate_dir(checkpoint)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint {str(directory.parent)!r} has no surrogate")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        return dict(ckptr.restore(directory, args=ocp.args.Composite(
            index=ocp.args.JsonRestore()))["index"].get("meta", {}))
