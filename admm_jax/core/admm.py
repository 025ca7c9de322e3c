"""The ADMM splitting transform: one optax transformation, many constraint sets.

Training-time structure induction (SALAAD, ELSA) solves

    min_X f(X)  s.t.  X = Z,  Z ∈ C                         (scaled dual U = Y/ρ)

with a two-stage ADMM:

* **stage 1, every step** — the coupled gradient ``g ← ∇f(X) + ρ(X − Z + U)``, i.e. the gradient
  of the augmented Lagrangian ``f(X) + ρ/2‖X − Z + U‖²``, is handed to the base optimizer, which
  steps X (SALAAD Alg. 1, first stage; ELSA's proximal term);
* **stage 2, every K steps** — ``Z ← prox_C(X + U)``, ``U ← U + X − Z`` (SALAAD Alg. 1, second
  stage with J = 1; ELSA's projection step), run under ``lax.cond`` inside the jitted update.

The constraint set enters only through a :class:`Split`: pure per-block ``init``/``prox``/
``metrics`` functions with their own state (SALAAD: L + S with α, β and the I-controller; ELSA:
a sparsity projection). Which leaves are constrained is a selection (regex on leaf paths, a bool
pytree or a callable); the default is every 2-D kernel in the decoder layers plus the token
embedding (see :data:`admm_jax.core.tree.DEFAULT_PATTERN`).

Place the transform **before** the base optimizer::

    tx = optax.chain(optax.clip_by_global_norm(1.0), admm(split, rho=1e-6), optax.adamw(lr))

It composes with ``optax.MultiSteps``, ``optax.inject_hyperparams`` (``rho`` may be injected) and
``optax.masked``. With ``coupling="decoupled"`` it goes *after* the base optimizer instead and
pulls the update like decoupled weight decay: ``Δ ← Δ − η_t ρ (X − Z + U)``.

ρ per block is ``rho · shape_factor · schedule(t) · balance`` where ``rho`` is a float or a
function of (path, shape); ``shape_factor`` is 1 (``rho_scaling="none"``) or
``1/(n_layers·√(m·n))`` (``"shape"``, the SALAAD scaling law); ``schedule`` is e.g.
:func:`tanh_ramp`; ``balance`` is the residual-balancing multiplier (Boyd et al. 2011, §3.4.1),
if enabled. ρ changes only at stage 2, and the scaled dual is rescaled (``U ← U·ρ_old/ρ_new``) so
that the unscaled dual ``Y = ρU`` is unchanged.

References:
    Boyd et al., "Distributed Optimization and Statistical Learning via the Alternating Direction
    Method of Multipliers", 2011.
    SALAAD (arXiv:2602.00942), Algorithm 1; ELSA (../papers/elsa.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admm_jax.core.storage import StateStorage, Stored, nbytes
from admm_jax.core.tree import SelectionSpec, path_str, select

Array = jax.Array


class Split(NamedTuple):
    """A constraint set as pure per-block functions.

    Attributes:
        init: ``x: f32[m, n] -> (z0, split_state)``: the initial auxiliary variable and state.
        prox: ``(v, split_state, rho, curvature) -> (z, split_state)``: ``Z = prox_C(V)`` for
            ``V = X + U``; ``curvature`` is the per-entry EMA of squared gradients when the
            transform keeps one (``curvature_decay``), else ``None``.
        metrics: ``split_state -> {name: scalar}`` per-block diagnostics.
        joint_prox: optional prox over *all* constrained blocks at once, for constraint sets
            that couple blocks (e.g. a global sparsity budget): ``(vs, split_states, rhos,
            curvatures) -> (zs, split_states)`` on lists in pytree-flatten order. Used instead
            of ``prox`` when set.
    """

    init: Callable[[Array], tuple[Array, Any]]
    prox: Callable[[Array, Any, Array, Array | None], tuple[Array, Any]]
    metrics: Callable[[Any], dict[str, Array]]
    joint_prox: Callable[[list, list, list, list], tuple[list, list]] | None = None


class BlockState(NamedTuple):
    """ADMM state of one constrained block."""

    z: Array | Stored  # auxiliary variable Z ∈ C (stored form, see ``state_storage``)
    u: Array | Stored  # scaled dual U = Y/ρ (stored form)
    rho: Array  # ρ in effect (f32 scalar)
    balance: Array  # residual-balancing multiplier of ρ
    residual: Array  # ‖X − Z‖_F / ‖X‖_F at the last stage 2
    curvature: Array | None  # EMA of g² (only with curvature_decay)
    split: Any  # the split's own state


class ADMMState(NamedTuple):
    count: Array  # int32, updates seen
    blocks: Any  # params-shaped pytree: BlockState at constrained leaves, MaskedNode elsewhere
    nonfinite: Array  # int32, constrained blocks with NaN/inf in X, Z or U at the last stage 2


def rho_ramp(kind: str, steps: int, factor: float) -> Callable[[Array], Array]:
    """ρ multiplier ``t -> m(t)`` from 1 at ``t = 0`` toward ``factor``, for ``rho_schedule``.

    ``p = min(t / steps, 1)``; ``"constant"``: 1; ``"linear"``: ``1 + (factor − 1)·p``;
    ``"cosine"``: ``1 + (factor − 1)·(1 − cos(πp))/2``; ``"exponential"``: ``factor^p``;
    ``"tanh"``: ``1 + (factor − 1)·tanh(t / steps)`` (SALAAD's ramp, approaches ``factor``).
    These are ELSA's λ schedules (constant / linear / cosine / exponential) and SALAAD's tanh ramp.
    """
    kinds = ("constant", "linear", "cosine", "exponential", "tanh")
    if kind not in kinds:
        raise ValueError(f"rho ramp kind must be one of {kinds}, got {kind!r}")
    if steps <= 0 or factor <= 0:
        raise ValueError(f"rho ramp needs steps > 0 and factor > 0, got {steps}, {factor}")

    def multiplier(t):
        t = jnp.asarray(t, jnp.float32)
        p = jnp.minimum(t / steps, 1.0)
        if kind == "constant":
            return jnp.ones_like(t)
        if kind == "linear":
            return 1.0 + (factor - 1.0) * p
        if kind == "cosine":
            return 1.0 + (factor - 1.0) * 0.5 * (1.0 - jnp.cos(jnp.pi * p))
        if kind == "exponential":
            return jnp.asarray(factor, jnp.float32) ** p
        return 1.0 + (factor - 1.0) * jnp.tanh(t / steps)

    return multiplier


def tanh_ramp(steps: int, factor: float = 10.0) -> Callable[[Array], Array]:
    """SALAAD's ρ ramp ``1 + (factor − 1)·tanh(t / steps)``: ``rho_ramp("tanh", …)``."""
    return rho_ramp("tanh", steps, factor)


def _is_block(x) -> bool:
    return isinstance(x, (BlockState, optax.MaskedNode))


def _check_positive(name: str, value, *, integer: bool = False) -> None:
    """Validate concrete Python numbers; traced values (inject_hyperparams) pass through."""
    if isinstance(value, bool) or (integer and not isinstance(value, int)):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _shape_factor(shape: tuple[int, ...], n_layers: int | None, scaling: str) -> float:
    if scaling == "none":
        return 1.0
    return 1.0 / (n_layers * math.sqrt(shape[0] * shape[1]))


def admm(split: Split, rho: float | Callable[[str, tuple[int, ...]], float], *,
         interval: int = 2, mask: SelectionSpec = None, rho_scaling: str = "none",
         n_layers: int | None = None, rho_schedule: Callable[[Array], Array] | None = None,
         residual_balancing: tuple[float, float] | None = None,
         coupling: str = "gradient", decoupled_lr: float | optax.Schedule = 1.0,
         curvature_decay: float | None = None,
         state_storage: StateStorage | str | None = None,
         halt_on_nonfinite: bool = False) -> optax.GradientTransformationExtraArgs:
    """The generic two-stage ADMM transform (module docstring).

    Args:
        split: the constraint set (:class:`Split`).
        rho: penalty ρ > 0, or ``(path, shape) -> ρ`` for per-block values (e.g. a smaller ρ for
            the embedding). A float may be injected with ``optax.inject_hyperparams``.
        interval: K ≥ 1, steps between stage-2 updates.
        mask: which leaves are constrained (:func:`admm_jax.core.tree.select`); every selected leaf
            must be 2-D and at least one must be selected.
        rho_scaling: ``"none"`` or ``"shape"`` (ρ·1/(n_layers·√(mn)), needs ``n_layers``).
        n_layers: model depth, for ``rho_scaling="shape"``.
        rho_schedule: ``t -> multiplier`` applied at stage 2, e.g. :func:`tanh_ramp`.
        residual_balancing: ``(μ, τ)``: after stage 2, multiply ρ by τ if the primal residual
            exceeds μ× the dual residual, divide by τ in the opposite case.
        coupling: ``"gradient"`` (add ρ(X − Z + U) to the gradient; put before the base
            optimizer) or ``"decoupled"`` (subtract η_t ρ(X − Z + U) from the update; put after).
        decoupled_lr: η_t for decoupled coupling (float or schedule).
        curvature_decay: if set, keep an EMA of squared gradients per block with this decay and
            pass it to ``split.prox`` (diagonal-Hessian estimate for weighted projections).
        state_storage: how Z and U are stored between steps (:class:`admm_jax.core.storage.
            StateStorage` or a dtype name such as ``"bf16"``, ``"e4m3"``); all arithmetic is
            fp32. Default fp32 (ELSA-L uses bf16 / fp8).
        halt_on_nonfinite: raise (through a host callback) when a stage 2 finds NaN/inf in X, Z
            or U. Either way the count is recorded in ``state.nonfinite``.
    """
    _check_positive("interval", interval, integer=True)
    if not callable(rho):
        _check_positive("rho", rho)
    if rho_scaling not in ("none", "shape"):
        raise ValueError(f"rho_scaling must be 'none' or 'shape', got {rho_scaling!r}")
    if rho_scaling == "shape":
        if n_layers is None:
            raise ValueError("rho_scaling='shape' needs n_layers (the model depth)")
        _check_positive("n_layers", n_layers, integer=True)
    if coupling not in ("gradient", "decoupled"):
        raise ValueError(f"coupling must be 'gradient' or 'decoupled', got {coupling!r}")
    if residual_balancing is not None:
        mu, tau = residual_balancing
        if not (mu > 1 and tau > 1):
            raise ValueError(f"residual_balancing (mu, tau) must both be > 1, got {mu}, {tau}")
    if curvature_decay is not None and not 0 <= curvature_decay < 1:
        raise ValueError(f"curvature_decay must be in [0, 1), got {curvature_decay}")
    schedule = rho_schedule or (lambda t: jnp.ones((), jnp.float32))
    if state_storage is None or isinstance(state_storage, str):
        state_storage = StateStorage(state_storage or "float32")
    store, load = state_storage.encode, state_storage.decode

    def base_rho(path: str, shape: tuple[int, ...]) -> Array:
        value = rho(path, shape) if callable(rho) else rho
        return jnp.asarray(value, jnp.float32) * _shape_factor(shape, n_layers, rho_scaling)

    def init_fn(params):
        selection = select(params, mask)
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        chosen = [(path_str(p), x) for (p, x), keep in
                  zip(flat, jax.tree_util.tree_leaves(selection)) if keep]
        if not chosen:
            raise ValueError("the ADMM mask selects no parameter; pass mask= a regex, bool pytree "
                             "or callable that selects at least one 2-D leaf")
        bad = [f"{p} {x.shape}" for p, x in chosen if x.ndim != 2]
        if bad:
            raise ValueError(f"the ADMM mask selects non-2-D leaves {bad}; constrained leaves "
                             "must be matrices")

        def init_block(path, x, keep):
            if not keep:
                return optax.MaskedNode()
            # fresh buffers: the state must not alias params (train steps donate both)
            z, split_state = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True),
                                                    split.init(x))
            curvature = None if curvature_decay is None else jnp.zeros_like(x)
            return BlockState(z=store(z), u=store(jnp.zeros_like(x)),
                              rho=base_rho(path_str(path), x.shape) * schedule(0),
                              balance=jnp.ones((), jnp.float32),
                              residual=jnp.zeros((), jnp.float32), curvature=curvature,
                              split=split_state)

        blocks = jax.tree_util.tree_map_with_path(init_block, params, selection)
        return ADMMState(count=jnp.zeros((), jnp.int32), blocks=blocks,
                         nonfinite=jnp.zeros((), jnp.int32))

    def stage2(blocks, params, count):
        """``Z ← prox_C(X + U)``, ``U ← U + X − Z`` for every block, then ρ bookkeeping."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(blocks, is_leaf=_is_block)
        xs = treedef.flatten_up_to(params)
        active = [(i, path_str(p), b) for i, (p, b) in enumerate(flat)
                  if isinstance(b, BlockState)]
        rhos, us, vs = [], [], []
        for i, path, b in active:
            rho_new = base_rho(path, xs[i].shape) * schedule(count) * b.balance
            u = load(b.u) * (b.rho / rho_new)  # keep Y = ρU fixed when ρ changes
            rhos.append(rho_new)
            us.append(u)
            vs.append(xs[i] + u)
        states = [b.split for _, _, b in active]
        curvatures = [b.curvature for _, _, b in active]
        if split.joint_prox is not None:
            zs, states = split.joint_prox(vs, states, rhos, curvatures)
        else:
            zs, states = zip(*(split.prox(*args) for args in zip(vs, states, rhos, curvatures)))

        new = [b for _, b in flat]
        flags = []
        for (i, _, b), rho_new, u, z, split_state in zip(active, rhos, us, zs, states):
            x = xs[i]
            u = u + x - z
            primal = jnp.linalg.norm(x - z)
            balance = b.balance
            if residual_balancing is not None:
                mu, tau = residual_balancing
                dual = rho_new * jnp.linalg.norm(z - load(b.z))
                balance = jnp.where(primal > mu * dual, balance * tau,
                                    jnp.where(dual > mu * primal, balance / tau, balance))
                rho_next = rho_new * balance / b.balance
                u = u * (rho_new / rho_next)
                rho_new = rho_next
            flags.append(~(jnp.isfinite(x).all() & jnp.isfinite(z).all()
                           & jnp.isfinite(u).all()))
            new[i] = b._replace(z=store(z), u=store(u), rho=rho_new, balance=balance,
                                residual=primal / jnp.maximum(jnp.linalg.norm(x), 1e-30),
                                split=split_state)
        nonfinite = jnp.sum(jnp.stack(flags).astype(jnp.int32))
        if halt_on_nonfinite:
            jax.debug.callback(_raise_if_nonfinite, nonfinite, count)
        return jax.tree_util.tree_unflatten(treedef, new), nonfinite

    def update_fn(updates, state: ADMMState, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("the ADMM transform needs params: call tx.update(grads, state, "
                             "params)")
        count = state.count
        do_stage2 = (count > 0) & (count % interval == 0)
        blocks, nonfinite = jax.lax.cond(
            do_stage2, lambda: stage2(state.blocks, params, count),
            lambda: (state.blocks, state.nonfinite))

        if curvature_decay is not None:
            blocks = jax.tree_util.tree_map(
                lambda b, g: b if isinstance(b, optax.MaskedNode) else b._replace(
                    curvature=curvature_decay * b.curvature + (1 - curvature_decay) * g * g),
                blocks, updates, is_leaf=_is_block)

        if coupling == "gradient":
            scale = 1.0
        else:
            scale = -(decoupled_lr(count) if callable(decoupled_lr) else decoupled_lr)

        def couple(g, x, b):
            if isinstance(b, optax.MaskedNode):
                return g
            return g + scale * b.rho * (x - load(b.z) + load(b.u))

        new_updates = jax.tree_util.tree_map(couple, updates, params, blocks)
        return new_updates, ADMMState(count=count + 1, blocks=blocks, nonfinite=nonfinite)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _raise_if_nonfinite(nonfinite, count) -> None:
    if int(nonfinite) > 0:
        raise FloatingPointError(
            f"ADMM stage 2 at step {int(count)} found NaN/inf in {int(nonfinite)} constrained "
            "block(s); lower the learning rate or ρ, or enable gradient clipping")


def find_admm_states(opt_state) -> list[ADMMState]:
    """Every :class:`ADMMState` inside a (chained, masked, multi-step, injected) optax state."""
    leaves = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ADMMState))
    return [x for x in leaves if isinstance(x, ADMMState)]


def block_states(state: ADMMState) -> dict[str, BlockState]:
    """``{path: BlockState}`` of the constrained blocks."""
    flat = jax.tree_util.tree_flatten_with_path(
        state.blocks, is_leaf=lambda x: isinstance(x, BlockState))[0]
    return {path_str(p): b for p, b in flat if isinstance(b, BlockState)}


def admm_metrics(opt_state, split_metrics: Callable[[Any], dict[str, Array]] | None = None,
                 *, per_block: bool = True) -> dict[str, Array]:
    """Scalars to log: per block ``"<path>/{residual,rho,...}"`` and means ``"admm/<name>"``.

    Args:
        opt_state: any optimizer state containing one :class:`ADMMState`.
        split_metrics: the split's ``metrics`` function (adds e.g. rank ratio and density).
        per_block: include one entry per block (else only the means and ``admm/nonfinite``).
    """
    states = find_admm_states(opt_state)
    if len(states) != 1:
        raise ValueError(f"expected exactly one ADMM state in the optimizer state, found "
                         f"{len(states)}")
    (state,) = states
    out: dict[str, Array] = {"admm/nonfinite": state.nonfinite}
    sums: dict[str, list[Array]] = {}
    for path, b in block_states(state).items():
        values = {"residual": b.residual, "rho": b.rho}
        if split_metrics is not None:
            values.update(split_metrics(b.split))
        for name, value in values.items():
            sums.setdefault(name, []).append(value)
            if per_block:
                out[f"{path}/{name}"] = value
    out.update({f"admm/{name}_mean": jnp.mean(jnp.stack(v)) for name, v in sums.items()})
    return out


def state_memory(opt_state) -> dict[str, float]:
    """Bytes of ADMM state, measured from the state pytree (ELSA-L memory accounting).

    Returns ``{"params": constrained entries, "z", "u", "curvature", "split", "scalars", "total"
    (bytes), "per_param": total / params, "z_u_per_param": (z + u) / params}``; stored
    low-precision values count their scales.
    """
    (state,) = find_admm_states(opt_state)
    blocks = list(block_states(state).values())
    parts = {name: sum(nbytes(getattr(b, name)) for b in blocks)
             for name in ("z", "u", "curvature", "split")}
    parts["scalars"] = sum(nbytes((b.rho, b.balance, b.residual)) for b in blocks)
    n = sum(_decoded_size(b.z) for b in blocks)
    out: dict[str, float] = {"params": n, **parts, "total": sum(parts.values())}
    out["per_param"] = out["total"] / n
    out["z_u_per_param"] = (parts["z"] + parts["u"]) / n
    return out


def _decoded_size(z) -> int:
    return (z.values if isinstance(z, Stored) else z).size
