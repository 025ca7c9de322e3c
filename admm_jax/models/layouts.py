"""Layouts of compact linear layers and the linear factory that builds a model from them.

Layouts and templates. A :data:`Layout` (``DenseLayout()``, ``LowRankLayout(rank)``,
``SparseLayout(nnz)``, ``BlockSparseLayout(n_blocks, block_size)``, ``NMLayout(n, m)``,
``SumLayout(parts)``) fixes every stored shape, so ``abstract_params(config,
linear=structured_factory(layouts, config))`` is the exact restore template (index leaves
included, as int ``ShapeDtypeStruct``) without any data. A layout that only gives ``nnz`` /
``n_blocks`` initialises a random support; ``SparseLayout(nnz, rows, cols)`` and
``BlockSparseLayout(n_blocks, block_size, block_rows, block_cols)`` fix it.

Building a compact model from a dense, SALAAD or pruned source::

    mods = {"layers/0/attn/q_proj": low_rank_from_factors(u, s, v),           # SVD factors
            "layers/0/mlp/up_proj": sparse_from_dense(w_pruned),              # w ≠ 0 kept
            "layers/0/mlp/gate_proj": block_sparse_from_dense(w_tiles, block_size=16),
            "layers/1/mlp/down_proj": nm_from_dense(w_24, 2, 4),              # a 2:4 matrix
            "layers/1/attn/o_proj": SumLinear([low_rank_from_factors(u, s, v),
                                               sparse_from_dense(w_s)])}      # SALAAD L + S
    factory = structured_factory({p: layout_of(m) for p, m in mods.items()}, config)
    graphdef, params = init_params(config, key, linear=factory)
    params = insert_linears(params, mods)        # other leaves: copy them from the dense source

On disk (a compact checkpoint's ``model.json``) layouts are JSON, :func:`layouts_to_json`::

    {"layers/0/attn/q_proj": {"type": "low_rank", "rank": 8},
     "layers/0/mlp/up_proj": {"type": "sparse", "nnz": 1234},      # rows/cols are params leaves
     "layers/0/mlp/gate_proj": {"type": "block", "n_blocks": 40, "block_size": 16},
     "layers/1/attn/o_proj": {"type": "sum", "parts": [{"type": "low_rank", "rank": 4},
                                                       {"type": "sparse", "nnz": 99}]}}

and back: ``materialize(module)`` is the dense ``[in, out]`` kernel of any of them, and
:func:`~admm_jax.models.linears.param_bytes` the bytes the module keeps resident.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from admm_jax._checks import check_int
from admm_jax.models.linears import (
    BlockSparseLinear,
    LowRankLinear,
    NMLinear,
    SparseLinear,
    SumLinear,
    check_nm_pattern,
)
from admm_jax.models.llama import (
    LinearFactory,
    LinearSpec,
    LlamaConfig,
    abstract_params,
    dense_linear,
)

__all__ = [
    "BlockSparseLayout", "DenseLayout", "Layout", "LowRankLayout", "NMLayout", "SparseLayout",
    "SumLayout",
    "build_linear", "insert_linears", "layout_of", "layouts_from_json", "layouts_to_json",
    "linear_specs", "structured_factory",
]

Array = jax.Array


class DenseLayout(NamedTuple):
    """A plain ``nnx.Linear`` (:func:`dense_linear`)."""


class LowRankLayout(NamedTuple):
    """:class:`LowRankLinear` of ``rank`` (``1 ≤ rank ≤ min(in, out)``)."""

    rank: int


class SparseLayout(NamedTuple):
    """:class:`SparseLinear` with ``nnz`` entries: a random support, or the given ``rows`` and
    ``cols`` (length ``nnz``) fixed; the values are initialised at random either way."""

    nnz: int
    rows: Any = None
    cols: Any = None


class BlockSparseLayout(NamedTuple):
    """:class:`BlockSparseLinear` with ``n_blocks`` tiles of ``block_size × block_size``: a
    random set of tiles of the block grid, or the given ``block_rows`` and ``block_cols``
    (length ``n_blocks``) fixed; the values are initialised at random either way."""

    n_blocks: int
    block_size: int
    block_rows: Any = None
    block_cols: Any = None


class NMLayout(NamedTuple):
    """:class:`NMLinear` with ``n`` of every ``m`` input rows kept (random in-group support)."""

    n: int
    m: int


class SumLayout(NamedTuple):
    """:class:`SumLinear` of the given layouts, e.g. ``(LowRankLayout(8), SparseLayout(500))``."""

    parts: tuple


Layout = DenseLayout | LowRankLayout | SparseLayout | BlockSparseLayout | NMLayout | SumLayout
_LAYOUTS = (DenseLayout, LowRankLayout, SparseLayout, BlockSparseLayout, NMLayout, SumLayout)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def _build_low_rank(layout: LowRankLayout, spec: LinearSpec, config: LlamaConfig,
                    rngs: nnx.Rngs) -> LowRankLinear:
    """Factors with i.i.d. ``N(0, σ²)``, ``σ² = init_std / √r``, so ``Var W_ij = init_std²``."""
    d_in, d_out = spec.in_features, spec.out_features
    rank = check_int("rank", layout.rank, minimum=1)
    if rank > min(d_in, d_out):
        raise ValueError(f"rank {rank} exceeds min(in, out) = {min(d_in, d_out)}")
    std = float(np.sqrt(config.init_std / np.sqrt(rank)))
    return LowRankLinear(_normal(rngs, (d_in, rank), std), _normal(rngs, (rank, d_out), std),
                         compute_dtype=config.compute_dtype)


def _support(rngs: nnx.Rngs, grid: tuple[int, int], n: int, rows: Any, cols: Any,
             what: str, names: tuple[str, str]) -> tuple[Array, Array]:
    """``n`` positions ``(rows, cols)`` on a ``grid``: the given ones (concrete even under
    ``eval_shape``, so they are validated; each of length ``n``), or with neither given a
    uniform random support — the top-``n`` of i.i.d. uniform scores."""
    if (rows is None) != (cols is None):
        raise ValueError(f"{what} needs both {names[0]} and {names[1]}, or neither")
    if rows is None:
        flat = jax.lax.top_k(jax.random.uniform(rngs.params(), (grid[0] * grid[1],)), n)[1]
        return flat // grid[1], flat % grid[1]
    with jax.ensure_compile_time_eval():
        rows, cols = jnp.asarray(rows), jnp.asarray(cols)
    if rows.shape != (n,) or cols.shape != (n,):
        raise ValueError(f"{what} {names[0]} and {names[1]} must have shape ({n},), got "
                         f"{rows.shape} and {cols.shape}")
    return rows, cols


def _build_sparse(layout: SparseLayout, spec: LinearSpec, config: LlamaConfig,
                  rngs: nnx.Rngs) -> SparseLinear:
    d_in, d_out = spec.in_features, spec.out_features
    nnz = check_int("nnz", layout.nnz, minimum=0, maximum=d_in * d_out)
    rows, cols = _support(rngs, (d_in, d_out), nnz, layout.rows, layout.cols, "SparseLayout",
                          ("rows", "cols"))
    matrix = kernels.sparse_matrix(_normal(rngs, (nnz,), config.init_std), rows, cols,
                                   (d_in, d_out))
    return SparseLinear(matrix, compute_dtype=config.compute_dtype)


def _build_block(layout: BlockSparseLayout, spec: LinearSpec, config: LlamaConfig,
                 rngs: nnx.Rngs) -> BlockSparseLinear:
    d_in, d_out = spec.in_features, spec.out_features
    b = check_int("block_size", layout.block_size, minimum=1)
    grid = kernels.block.block_grid((d_in, d_out), b)
    n = check_int("n_blocks", layout.n_blocks, minimum=0, maximum=grid[0] * grid[1])
    rows, cols = _support(rngs, grid, n, layout.block_rows, layout.block_cols,
                          "BlockSparseLayout", ("block_rows", "block_cols"))
    matrix = kernels.block_sparse_matrix(_normal(rngs, (n, b, b), config.init_std), rows, cols,
                                         (d_in, d_out))
    return BlockSparseLinear(matrix, compute_dtype=config.compute_dtype)


def _build_nm(layout: NMLayout, spec: LinearSpec, config: LlamaConfig,
              rngs: nnx.Rngs) -> NMLinear:
    n, m = check_nm_pattern(layout.n, layout.m)
    d_in, d_out = spec.in_features, spec.out_features
    if d_in % m:
        raise ValueError(f"M = {m} must divide the input dimension {d_in} for {n}:{m} sparsity")
    order = jnp.argsort(jax.random.uniform(rngs.params(), (d_in // m, m, d_out)), axis=1)
    indices = jnp.sort(order[:, :n], axis=1).reshape(d_in // m * n, d_out)
    return NMLinear(_normal(rngs, indices.shape, config.init_std), indices.astype(jnp.uint8), n,
                    m, compute_dtype=config.compute_dtype)


def _build_sum(layout: SumLayout, spec: LinearSpec, config: LlamaConfig,
               rngs: nnx.Rngs) -> SumLinear:
    if not isinstance(layout.parts, (tuple, list)) or not layout.parts:
        raise ValueError(f"SumLayout needs a non-empty tuple of parts, got {layout.parts!r}")
    return SumLinear([build_linear(part, spec, config, rngs) for part in layout.parts])


_BUILDERS = {LowRankLayout: _build_low_rank, SparseLayout: _build_sparse,
             BlockSparseLayout: _build_block, NMLayout: _build_nm, SumLayout: _build_sum}


def build_linear(layout: Layout, spec: LinearSpec, config: LlamaConfig,
                 rngs: nnx.Rngs) -> nnx.Module:
    """The linear ``layout`` describes for ``spec``, randomly initialised (``init_std``);
    ``ValueError`` naming ``spec.path`` for a layout that does not fit the shape."""
    if type(layout) not in _LAYOUTS:
        raise TypeError(f"{spec.path}: layout must be one of "
                        f"{[t.__name__ for t in _LAYOUTS]}, got {layout!r}")
    if isinstance(layout, DenseLayout):
        return dense_linear(spec, config, rngs)
    try:
        return _BUILDERS[type(layout)](layout, spec, config, rngs)
    except ValueError as e:
        if str(e).startswith(spec.path + ":"):
            raise
        raise ValueError(f"{spec.path}: {e}") from e


def linear_specs(config: LlamaConfig) -> dict[str, LinearSpec]:
    """``{path: LinearSpec}`` of every linear a :class:`Llama` with ``config`` builds."""
    specs = {}

    def record(spec: LinearSpec, cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.Module:
        specs[spec.path] = spec
        return dense_linear(spec, cfg, rngs)

    abstract_params(config, linear=record)
    return specs


def structured_factory(layouts: Mapping[str, Layout], config: LlamaConfig) -> LinearFactory:
    """A :data:`LinearFactory` building ``layouts[spec.path]`` (dense where no layout is given).

    Every layout is checked against ``config`` here, by building it abstractly: unknown paths,
    wrong types and misfits (rank, N:M, nnz, tiles, index range) raise at once. Shapes depend on the
    layouts only, so ``abstract_params(config, linear=factory)`` is the restore template."""
    specs = linear_specs(config)
    unknown = sorted(set(layouts) - set(specs))
    if unknown:
        raise ValueError(f"layouts name unknown linears {unknown}; known paths look like "
                         f"{next(iter(specs))!r}")
    layouts = dict(layouts)
    for path, layout in layouts.items():
        _check_layout(layout, specs[path], config)

    def factory(spec: LinearSpec, cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.Module:
        return build_linear(layouts.get(spec.path, DenseLayout()), spec, cfg, rngs)

    return factory


def _check_layout(layout: Layout, spec: LinearSpec, config: LlamaConfig) -> None:
    """Build ``layout`` for ``spec`` abstractly (no allocation), raising what building raises."""
    nnx.eval_shape(lambda: build_linear(layout, spec, config, nnx.Rngs(params=0)))


def layout_of(module: nnx.Module) -> Layout:
    """The shape-only layout of a linear (``SparseLayout`` / ``BlockSparseLayout`` without
    indices): the template to build a model into which :func:`insert_linears` puts
    ``module``'s arrays."""
    if isinstance(module, nnx.Linear):
        return DenseLayout()
    if isinstance(module, LowRankLinear):
        return LowRankLayout(module.rank)
    if isinstance(module, SparseLinear):
        return SparseLayout(int(module.values.shape[0]))
    if isinstance(module, BlockSparseLinear):
        return BlockSparseLayout(module.n_blocks, module.block_size)
    if isinstance(module, NMLinear):
        return NMLayout(module.n, module.m)
    if isinstance(module, SumLinear):
        return SumLayout(tuple(layout_of(p) for p in module.parts))
    raise TypeError(f"no layout for a {type(module).__name__}")


def insert_linears(params: dict, modules: Mapping[str, nnx.Module]) -> dict:
    """``params`` (a pure dict of a model built with the modules' layouts) with the subtree at
    each path replaced by ``nnx.to_pure_dict(nnx.state(module))``; the input is not modified.
    ``ValueError`` if a path is missing or its leaves differ in structure, shape or dtype."""
    out = dict(params)
    for path, module in modules.items():
        new = nnx.to_pure_dict(nnx.state(module))
        node, keys = out, path.split("/")
        for key in keys[:-1]:
            key = int(key) if key.isdigit() and int(key) in node else key
            if key not in node:
                raise ValueError(f"params have no linear at {path!r}")
            node[key] = dict(node[key])
            node = node[key]
        old = node.get(keys[-1])
        if old is None or _signature(old) != _signature(new):
            raise ValueError(f"params at {path!r} do not have the layout of the given "
                             f"{type(module).__name__}; build the model with "
                             f"structured_factory({{{path!r}: layout_of(module)}}, config)")
        node[keys[-1]] = new
    return out


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)


_JSON_NAMES = {DenseLayout: "dense", LowRankLayout: "low_rank", SparseLayout: "sparse",
               BlockSparseLayout: "block", NMLayout: "nm", SumLayout: "sum"}
_JSON_FIELDS = {DenseLayout: (), LowRankLayout: ("rank",), SparseLayout: ("nnz",),
                BlockSparseLayout: ("n_blocks", "block_size"), NMLayout: ("n", "m"),
                SumLayout: ("parts",)}
_JSON_MINIMUM = {"block_size": 1}  # fields a model-independent bound applies to (others: 0)


def _layout_to_json(layout: Layout) -> dict:
    if type(layout) not in _JSON_NAMES:
        raise TypeError(f"not a layout: {layout!r}")
    out = {"type": _JSON_NAMES[type(layout)]}
    for name in _JSON_FIELDS[type(layout)]:
        value = getattr(layout, name)
        out[name] = [_layout_to_json(p) for p in value] if name == "parts" else int(value)
    return out


def _layout_from_json(obj: Any, where: str) -> Layout:
    by_name = {v: k for k, v in _JSON_NAMES.items()}
    kind = by_name.get(obj.get("type")) if isinstance(obj, dict) else None
    if kind is None:
        raise ValueError(f"{where}: a layout must be an object with \"type\" one of "
                         f"{sorted(by_name)}, got {obj!r}")
    missing = [f for f in _JSON_FIELDS[kind] if f not in obj]
    extra = sorted(set(obj) - {"type", *_JSON_FIELDS[kind]})
    if missing or extra:
        raise ValueError(f"{where}: a {obj['type']!r} layout has the fields "
                         f"{list(_JSON_FIELDS[kind])}; missing {missing}, unexpected {extra}")
    if kind is SumLayout:
        if not isinstance(obj["parts"], list) or not obj["parts"]:
            raise ValueError(f"{where}: a 'sum' layout needs a non-empty list of parts")
        return SumLayout(tuple(_layout_from_json(p, f"{where}/parts/{i}")
                               for i, p in enumerate(obj["parts"])))
    return kind(*(check_int(f"{where}: {f}", obj[f], minimum=_JSON_MINIMUM.get(f, 0))
                  for f in _JSON_FIELDS[kind]))


def layouts_to_json(layouts: Mapping[str, Layout]) -> dict[str, dict]:
    """``{path: {"type": ..., fields}}``: the shape-only JSON form of ``layouts`` (a
    ``SparseLayout`` keeps ``nnz`` only, a ``BlockSparseLayout`` ``n_blocks`` and
    ``block_size``: their indices are leaves of the params)."""
    return {str(path): _layout_to_json(layout) for path, layout in layouts.items()}


def layouts_from_json(obj: Any) -> dict[str, Layout]:
    """The layouts :func:`layouts_to_json` wrote; ``ValueError`` naming the path of a malformed
    entry. Fit to a model is checked later, by :func:`structured_factory`."""
    if not isinstance(obj, dict):
        raise ValueError(f"layouts must be a JSON object {{path: layout}}, got {obj!r}")
    return {path: _layout_from_json(layout, path) for path, layout in obj.items()}
