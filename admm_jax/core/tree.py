"""Pytree paths and leaf selection.

Leaves are named by ``/``-joined key paths (``"layers/0/attn/q_proj/kernel"``,
``"embed/embedding"``); a selection is a pytree of bools with the params' structure.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import optax

Selection = Any  # pytree of bool with the structure of params
SelectionSpec = str | Selection | Callable[[Any], Selection] | None

#: Default ADMM selection: every 2-D projection kernel inside decoder layers and the token
#: embedding; never norms, biases or the LM head (which SALAAD finds cannot be SLR-induced).
DEFAULT_PATTERN = r"^(layers/\d+/.*kernel|embed/embedding)$"


def path_str(path: tuple) -> str:
    """``"a/0/b"`` for a jax key path such as ``(DictKey('a'), DictKey(0), GetAttrKey('b'))``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def flat_paths(tree) -> dict[str, Any]:
    """``{path_str(path): leaf}`` of every leaf of ``tree``, in flatten order."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaf_paths(tree) -> Any:
    """A pytree with the structure of ``tree`` whose leaves are their path strings."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def select(params, spec: SelectionSpec = None) -> Selection:
    """Resolve a selection spec to a bool pytree over ``params``.

    Args:
        params: the parameter pytree (leaves may be arrays or ``ShapeDtypeStruct``s;
            ``optax.MaskedNode`` subtrees, as produced by ``optax.masked``, are skipped).
        spec: ``None`` (:data:`DEFAULT_PATTERN`), a regex matched (``re.search``) against each
            leaf's path string, a bool pytree, or a callable ``params -> bool pytree``.
    """
    if spec is None:
        spec = DEFAULT_PATTERN
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return jax.tree_util.tree_map_with_path(
            lambda p, _: bool(pattern.search(path_str(p))), params)
    if callable(spec):
        return spec(params)
    return spec


def selected_paths(params, selection: Selection) -> list[str]:
    """Path strings of the selected leaves, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    flags = jax.tree_util.tree_leaves(selection)
    if len(flags) != len(flat):
        raise ValueError(f"selection has {len(flags)} leaves but params have {len(flat)}")
    return [path_str(p) for (p, _), keep in zip(flat, flags) if keep]


def is_masked_node(x) -> bool:
    return isinstance(x, optax.MaskedNode)
