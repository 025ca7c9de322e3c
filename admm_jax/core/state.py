"""The ADMM transform's state, the one lookup that finds it in any optimizer state, and what is
read from it: per-block metrics and the bytes it holds.

:func:`admm_state` plays the role of optax's ``tree_get`` for the ADMM transform: it finds the
single :class:`ADMMState` inside a chained, masked, multi-step, injected or base-wrapping
(:class:`DecoupledState`) optimizer state and raises one error otherwise. :func:`admm_metrics`,
:func:`state_memory` and the methods' read-outs (``slr_components``, ELSA's ``finalize``) all go
through it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admm_jax.core.storage import Stored, nbytes
from admm_jax.core.tree import path_str

Array = jax.Array


class BlockState(NamedTuple):
    """ADMM state of one constrained block (all arithmetic fp32; ``z``/``u`` in stored form)."""

    z: Array | Stored  # auxiliary variable Z ∈ C
    u: Array | Stored  # scaled dual U = Y/ρ
    rho: Array  # ρ in effect (f32 scalar)
    balance: Array  # residual-balancing multiplier of ρ
    residual: Array  # ‖X − Z‖_F / ‖X‖_F at the last stage 2
    curvature: Array | None  # EMA of the squared raw gradient (splits with curvature_decay)
    split: Any  # the split's own state
    metrics: dict[str, Array]  # split.metrics(split) after the last prox (or init)


class ADMMState(NamedTuple):
    """State of :func:`admm_jax.core.admm.admm`."""

    count: Array  # int32, updates seen
    blocks: Any  # params-shaped pytree: BlockState at constrained leaves, MaskedNode elsewhere
    nonfinite: Array  # int32, constrained blocks with NaN/inf in X, Z or U at the last stage 2


class DecoupledState(NamedTuple):
    """State of :func:`admm_jax.core.admm.admm` with ``coupling="decoupled"`` and ``base``: its
    own state and that of the base optimizer it wraps."""

    admm: ADMMState
    base: Any  # the base optimizer's state


def is_block(x: Any) -> bool:
    """Whether ``x`` is a leaf of ``ADMMState.blocks`` (a block state or a masked-out leaf)."""
    return isinstance(x, (BlockState, optax.MaskedNode))


def admm_state(opt_state: Any) -> ADMMState:
    """The one :class:`ADMMState` inside an optimizer state (chained, masked, multi-step,
    injected; an :class:`ADMMState` itself is returned as is).

    Raises:
        ValueError: the state holds no ADMM state, or more than one.
    """
    found = [x for x in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, ADMMState)) if isinstance(x, ADMMState)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one ADMMState in the optimizer state, found "
                         f"{len(found)}; build the optimizer with one admm / slr_admm / elsa "
                         "transform and pass its state (or the whole chain's)")
    return found[0]


def block_states(opt_state: Any) -> dict[str, BlockState]:
    """``{path: BlockState}`` of the constrained blocks, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(admm_state(opt_state).blocks, is_leaf=is_block)[0]
    return {path_str(p): b for p, b in flat if isinstance(b, BlockState)}


def admm_metrics(opt_state: Any, *, per_block: bool = True) -> dict[str, Array]:
    """Scalars to log: per block ``"<path>/<name>"`` and their means ``"admm/<name>_mean"``.

    The names are ``residual`` (``‖X − Z‖/‖X‖``), ``rho`` and the split's own metrics, which the
    transform keeps in ``BlockState.metrics`` (SALAAD: rank_ratio, density, alpha, beta; ELSA:
    flip_rate, sparsity), plus ``"admm/nonfinite"``.

    Args:
        opt_state: any optimizer state containing one :class:`ADMMState`.
        per_block: include one entry per block (else only the means and ``admm/nonfinite``).
    """
    state = admm_state(opt_state)
    out: dict[str, Array] = {"admm/nonfinite": state.nonfinite}
    columns: dict[str, list[Array]] = {}
    for path, b in block_states(state).items():
        for name, value in {"residual": b.residual, "rho": b.rho, **b.metrics}.items():
            columns.setdefault(name, []).append(value)
            if per_block:
                out[f"{path}/{name}"] = value
    out.update({f"admm/{name}_mean": jnp.mean(jnp.stack(v)) for name, v in columns.items()})
    return out


def state_memory(opt_state: Any) -> dict[str, float]:
    """Bytes of ADMM state, measured from the state pytree (ELSA-L memory accounting).

    Works on real states and on ``jax.eval_shape(tx.init, params)``.

    Returns:
        ``{"params": constrained entries, "z", "u", "curvature", "split", "scalars", "total"
        (bytes), "per_param": total / params, "z_u_per_param": (z + u) / params}``; stored
        low-precision values count their scales; ``scalars`` counts ρ, balance, residual and
        the kept metrics.
    """
    blocks = list(block_states(opt_state).values())
    parts = {name: sum(nbytes(getattr(b, name)) for b in blocks)
             for name in ("z", "u", "curvature", "split")}
    parts["scalars"] = sum(nbytes((b.rho, b.balance, b.residual, b.metrics)) for b in blocks)
    n = sum(_decoded_size(b.z) for b in blocks)
    out: dict[str, float] = {"params": n, **parts, "total": sum(parts.values())}
    out["per_param"] = out["total"] / n
    out["z_u_per_param"] = (parts["z"] + parts["u"]) / n
    return out


def _decoded_size(z: Array | Stored) -> int:
    return (z.values if isinstance(z, Stored) else z).size
