"""The ADMM splitting transform: one optax transformation, many constraint sets.

Training-time structure induction (SALAAD, ELSA) solves

    min_X f(X)  s.t.  X = Z,  Z ∈ C                         (scaled dual U = Y/ρ)

with a two-stage ADMM:

* **stage 1, every step** — the coupled gradient ``g ← ∇f(X) + ρ(X − Z + U)``, i.e. the gradient
  of the augmented Lagrangian ``f(X) + ρ/2‖X − Z + U‖²``, is handed to the base optimizer, which
  steps X (SALAAD Alg. 1, first stage; ELSA's proximal term);
* **stage 2, every K steps** — ``Z ← prox_C(X + U)``, ``U ← U + X − Z`` (SALAAD Alg. 1, second
  stage with J = 1; ELSA's projection step), run under ``lax.cond`` inside the jitted update.

The constraint set enters only through a :class:`~admm_jax.core.split.Split`: pure ``init`` /
``prox`` / ``metrics`` functions with their own state (SALAAD: L + S with α, β and the
I-controller; ELSA: a sparsity projection). Which leaves are constrained is a selection (regex on
leaf paths, a bool pytree or a callable); the default is every 2-D kernel in the decoder layers
plus the token embedding (:data:`admm_jax.core.tree.DEFAULT_PATTERN`).

Two couplings of stage 1:

* ``coupling="gradient"``: the transform adds ``ρ(X − Z + U)`` to the gradient; place it
  **before** the base optimizer::

      tx = optax.chain(optax.clip_by_global_norm(1.0), admm(split, rho=1e-6), optax.adamw(lr))

* ``coupling="decoupled"``: the pull bypasses the base optimizer, like decoupled weight decay,
  ``Δ ← Δ − η_t ρ (X − Z + U)`` with ``Δ`` the base optimizer's step. Pass the base optimizer
  as ``base`` and the transform wraps it (it then receives the raw gradients)::

      tx = optax.chain(optax.clip_by_global_norm(1.0),
                       admm(split, rho=1e-3, coupling="decoupled", base=optax.adamw(lr)))

  Every update then runs: stage 2 when due; the curvature EMA from the raw gradients; the base
  step ``Δ, s ← base.update(g, s, X)``; the pull. Its state is a
  :class:`~admm_jax.core.state.DecoupledState` holding the ADMM state and the base state.
  Without ``base`` the transform is chained *after* the base optimizer,
  ``chain(clip, adamw(lr), admm(..., coupling="decoupled"))``, and pulls the steps it receives;
  that form is refused for splits that ask for a curvature (below), whose EMA would then see
  the base optimizer's steps instead of gradients.

**Curvature.** A split with ``curvature_decay = d`` (ELSA's objective-aware projection) gets per
block ``h ← d·h + (1 − d)·g²``, the EMA of the squared raw gradient ``g = ∇f(X)`` (after any
clipping upstream, *before* the coupling term is added; a diagonal Gauss–Newton / Fisher
estimate of ``∇²f`` on the scale of Adam's ν for ``d = β₂``), updated after stage 2, so a stage 2
sees ``h`` as of the previous step. In gradient coupling the transform must therefore come first
(after clipping) in the chain, where its input is the gradient. The official ELSA code scores by
Adam's ``exp_avg_sq``, which sees the gradient *after* the proximal term; we leave that term out
because it is the constraint's own pull, not curvature of ``f``: it is largest on the entries the
last projection zeroed and would inflate their score in proportion to ρ and the dual, and with it
``h`` would differ between the two couplings.

The transform composes with ``optax.MultiSteps``, ``optax.masked``, ``optax.tree.map_params`` and
``optax.inject_hyperparams`` (``rho`` and ``decoupled_lr`` may be injected; ``split``,
``interval``, ``mask``, ``n_layers`` and any callable ``rho`` / ``rho_schedule`` must be
``static_args``; ``base`` is kept static by optax). All state arithmetic is fp32 whatever the
params' dtype; updates keep the dtype of the incoming updates.

ρ per block is ``rho · shape_factor · schedule(t) · balance`` where ``rho`` is a float or a
function of (path, shape); ``shape_factor`` is 1 (``rho_scaling="none"``) or
``1/(n_layers·√(m·n))`` (``"shape"``, the SALAAD scaling law); ``schedule`` is e.g.
:func:`~admm_jax.core.schedules.sigmoid_ramp`; ``balance`` is the residual-balancing multiplier
(Boyd et al. 2011, §3.4.1), if enabled. ρ changes only at stage 2, and the scaled dual is
rescaled (``U ← U·ρ_old/ρ_new``) so that the unscaled dual ``Y = ρU`` is unchanged.

References:
    Boyd et al., "Distributed Optimization and Statistical Learning via the Alternating Direction
    Method of Multipliers", 2011.
    SALAAD (arXiv:2602.00942), Algorithm 1; ELSA (../papers/elsa.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from admm_jax._checks import check_choice, check_int, check_real
from admm_jax.core.schedules import Schedule
from admm_jax.core.split import ProxContext, Split
from admm_jax.core.state import ADMMState, BlockState, DecoupledState, is_block
from admm_jax.core.storage import StateStorage
from admm_jax.core.tree import SelectionSpec, path_str, select

Array = jax.Array
Coupling = Literal["gradient", "decoupled"]
RhoScaling = Literal["none", "shape"]
RhoSpec = float | Array | Callable[[str, tuple[int, ...]], float]


class _Config(NamedTuple):
    """The transform's settings, as the module-level stage-2 functions need them."""

    split: Split
    base_rho: Callable[[str, tuple[int, ...]], Array]  # ρ · shape factor of a block
    schedule: Schedule
    residual_balancing: tuple[float, float] | None
    storage: StateStorage
    halt_on_nonfinite: bool


# --- ρ bookkeeping --------------------------------------------------------------------------------

def _shape_factor(shape: tuple[int, ...], n_layers: int | None, scaling: RhoScaling) -> float:
    """1, or SALAAD's shape-dependent scaling ``1/(n_layers·√(m·n))``."""
    if scaling == "none":
        return 1.0
    return 1.0 / (n_layers * math.sqrt(shape[0] * shape[1]))


def _make_base_rho(rho: RhoSpec, scaling: RhoScaling,
                   n_layers: int | None) -> Callable[[str, tuple[int, ...]], Array]:
    def base_rho(path: str, shape: tuple[int, ...]) -> Array:
        value = rho(path, shape) if callable(rho) else rho
        return jnp.asarray(value, jnp.float32) * _shape_factor(shape, n_layers, scaling)

    return base_rho


def _scheduled_rho(cfg: _Config, path: str, shape: tuple[int, ...], count: Array,
                   balance: Array) -> Array:
    """ρ of a block at stage 2: ``base · schedule(t) · balance``."""
    return cfg.base_rho(path, shape) * cfg.schedule(count) * balance


def _rescale_dual(u: Array, rho_old: Array, rho_new: Array) -> Array:
    """``U·ρ_old/ρ_new``: the scaled dual after a change of ρ, keeping ``Y = ρU`` fixed."""
    return u * (rho_old / rho_new)


def _balanced(primal: Array, dual: Array, balance: Array, mu: float, tau: float) -> Array:
    """Residual balancing (Boyd et al. §3.4.1): the multiplier of ρ times τ when the primal
    residual exceeds μ× the dual one, divided by τ in the opposite case."""
    return jnp.where(primal > mu * dual, balance * tau,
                     jnp.where(dual > mu * primal, balance / tau, balance))


# --- stage 2 --------------------------------------------------------------------------------------

def _dual_step(cfg: _Config, b: BlockState, x: Array, z: Array, u: Array, rho: Array,
               split_state: Any) -> tuple[BlockState, Array]:
    """After the prox: ``U ← U + X − Z``, then residuals and balancing; the new block state and
    the new U before storage."""
    u = u + x - z
    primal = jnp.linalg.norm(x - z)
    balance = b.balance
    if cfg.residual_balancing is not None:
        dual = rho * jnp.linalg.norm(z - cfg.storage.decode(b.z))
        balance = _balanced(primal, dual, b.balance, *cfg.residual_balancing)
        rho_next = rho * balance / b.balance
        u = _rescale_dual(u, rho, rho_next)
        rho = rho_next
    new = b._replace(z=cfg.storage.encode(z), u=cfg.storage.encode(u), rho=rho, balance=balance,
                     residual=primal / jnp.maximum(jnp.linalg.norm(x), 1e-30),
                     split=split_state, metrics=cfg.split.metrics(split_state))
    return new, u


def _count_nonfinite(xs: list[Array], zs: list[Array], us: list[Array]) -> Array:
    """Number of blocks with a NaN/inf in X, Z or U (int32)."""
    flags = [~(jnp.isfinite(x).all() & jnp.isfinite(z).all() & jnp.isfinite(u).all())
             for x, z, u in zip(xs, zs, us)]
    return jnp.sum(jnp.stack(flags).astype(jnp.int32))


def _raise_if_nonfinite(nonfinite, count) -> None:
    if int(nonfinite) > 0:
        raise FloatingPointError(
            f"ADMM stage 2 at step {int(count)} found NaN/inf in {int(nonfinite)} constrained "
            "block(s); lower the learning rate or ρ, or enable gradient clipping")


def _stage2(cfg: _Config, blocks: Any, params: Any, count: Array) -> tuple[Any, Array]:
    """``Z ← prox_C(X + U)``, ``U ← U + X − Z`` over all blocks, with ρ bookkeeping."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(blocks, is_leaf=is_block)
    leaves = [b for _, b in flat]
    active = [i for i, b in enumerate(leaves) if isinstance(b, BlockState)]
    paths = [path_str(flat[i][0]) for i in active]
    olds = [leaves[i] for i in active]
    xs = treedef.flatten_up_to(params)
    xs = [xs[i].astype(jnp.float32) for i in active]
    # 1. ρ of this stage and the dual rescaled to it; the prox input V = X + U
    rhos = [_scheduled_rho(cfg, path, x.shape, count, b.balance)
            for path, x, b in zip(paths, xs, olds)]
    us = [_rescale_dual(cfg.storage.decode(b.u), b.rho, rho) for b, rho in zip(olds, rhos)]
    vs = [x + u for x, u in zip(xs, us)]
    # 2. one prox over every constrained block
    contexts = [ProxContext(rho=rho, step=count, curvature=b.curvature)
                for b, rho in zip(olds, rhos)]
    zs, split_states = cfg.split.prox(vs, [b.split for b in olds], contexts)
    # 3. dual ascent and residual balancing per block
    for k, (i, b, x, z, rho, split_state) in enumerate(
            zip(active, olds, xs, zs, rhos, split_states)):
        leaves[i], us[k] = _dual_step(cfg, b, x, z, us[k], rho, split_state)
    # 4. the non-finite check
    nonfinite = _count_nonfinite(xs, zs, us)
    if cfg.halt_on_nonfinite:
        jax.debug.callback(_raise_if_nonfinite, nonfinite, count)
    return jax.tree_util.tree_unflatten(treedef, leaves), nonfinite


# --- stage 1 and init -----------------------------------------------------------------------------

def _update_curvature(blocks: Any, grads: Any, decay: float) -> Any:
    """EMA of the squared raw gradients per block, ``h ← d·h + (1 − d)·g²`` (fp32)."""
    def ema(b, g):
        if not isinstance(b, BlockState):
            return b
        g = g.astype(jnp.float32)
        return b._replace(curvature=decay * b.curvature + (1 - decay) * g * g)

    return jax.tree_util.tree_map(ema, blocks, grads, is_leaf=is_block)


def _couple(updates: Any, params: Any, blocks: Any, scale: Array | float,
            storage: StateStorage) -> Any:
    """``g + scale·ρ(X − Z + U)`` at constrained leaves, in the dtype of ``g``."""
    def couple(g, x, b):
        if not isinstance(b, BlockState):
            return g
        pull = scale * b.rho * (x - storage.decode(b.z) + storage.decode(b.u))
        return (g + pull).astype(g.dtype)

    return jax.tree_util.tree_map(couple, updates, params, blocks)


def _init_block(cfg: _Config, path: str, x: Array) -> BlockState:
    x = x.astype(jnp.float32)
    z, split_state = cfg.split.init(x)
    # fresh buffers: the state must not alias params or itself (train steps donate both)
    z, split_state, metrics = jax.tree_util.tree_map(
        lambda a: jnp.array(a, copy=True), (z, split_state, cfg.split.metrics(split_state)))
    curvature = None if cfg.split.curvature_decay is None else jnp.zeros_like(x)
    return BlockState(z=cfg.storage.encode(z), u=cfg.storage.encode(jnp.zeros_like(x)),
                      rho=cfg.base_rho(path, x.shape) * cfg.schedule(0),
                      balance=jnp.ones((), jnp.float32), residual=jnp.zeros((), jnp.float32),
                      curvature=curvature, split=split_state, metrics=metrics)


def _checked_selection(params: Any, mask: SelectionSpec) -> Any:
    """The bool selection of ``mask`` over ``params``, after checking it picks 2-D leaves."""
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
    return selection


def _check_base(split: Split, coupling: Coupling, base: Any) -> None:
    """Which base optimizer goes with which coupling (module docstring)."""
    if base is not None and not isinstance(base, optax.GradientTransformation):
        raise TypeError(f"base must be an optax.GradientTransformation, got {type(base).__name__}")
    if base is not None and coupling == "gradient":
        raise ValueError("base is for coupling='decoupled'; with coupling='gradient' chain the "
                         "base optimizer after the transform: optax.chain(admm(...), base)")
    if base is None and coupling == "decoupled" and split.curvature_decay is not None:
        raise ValueError(
            "this split estimates curvature from the gradients (curvature_decay is set, e.g. "
            "ELSA with weighted=True), but coupling='decoupled' without base= puts the transform "
            "after the base optimizer, where it sees the base optimizer's steps, not gradients; "
            "pass the base optimizer as base=, e.g. optax.chain(optax.clip_by_global_norm(1.0), "
            "elsa(..., coupling='decoupled', base=optax.adamw(lr))), or use weighted=False")


def _check_arguments(rho, interval, rho_scaling, n_layers, residual_balancing, coupling,
                     decoupled_lr) -> None:
    if not callable(rho):
        check_real("rho", rho, low=0.0, low_open=True, allow_traced=True)
    check_int("interval", interval, 1)
    check_choice("rho_scaling", rho_scaling, get_args(RhoScaling))
    if rho_scaling == "shape":
        if n_layers is None:
            raise ValueError("rho_scaling='shape' needs n_layers (the model depth)")
        check_int("n_layers", n_layers, 1)
    check_choice("coupling", coupling, get_args(Coupling))
    if residual_balancing is not None:
        mu, tau = residual_balancing
        check_real("residual_balancing mu", mu, low=1.0, low_open=True)
        check_real("residual_balancing tau", tau, low=1.0, low_open=True)
    if not callable(decoupled_lr):
        check_real("decoupled_lr", decoupled_lr, low=0.0, allow_traced=True)


def admm(split: Split, rho: RhoSpec, *, interval: int = 2, mask: SelectionSpec = None,
         rho_scaling: RhoScaling = "none", n_layers: int | None = None,
         rho_schedule: Schedule | None = None,
         residual_balancing: tuple[float, float] | None = None,
         coupling: Coupling = "gradient", decoupled_lr: float | optax.Schedule = 1.0,
         state_storage: StateStorage | str | None = None,
         halt_on_nonfinite: bool = False,
         base: optax.GradientTransformation | None = None) -> optax.GradientTransformationExtraArgs:
    """The generic two-stage ADMM transform (module docstring).

    Args:
        split: the constraint set (:class:`~admm_jax.core.split.Split`).
        rho: penalty ρ > 0, or ``(path, shape) -> ρ`` for per-block values (e.g. a smaller ρ for
            the embedding). A float may be injected with ``optax.inject_hyperparams``.
        interval: K ≥ 1, steps between stage-2 updates (static).
        mask: which leaves are constrained (:func:`admm_jax.core.tree.select`); every selected leaf
            must be 2-D and at least one must be selected.
        rho_scaling: ``"none"`` or ``"shape"`` (ρ·1/(n_layers·√(mn)), needs ``n_layers``).
        n_layers: model depth, for ``rho_scaling="shape"``.
        rho_schedule: ``t -> multiplier`` applied at stage 2, e.g. :func:`sigmoid_ramp`.
        residual_balancing: ``(μ, τ)``, both > 1: after stage 2, multiply ρ by τ if the primal
            residual exceeds μ× the dual residual, divide by τ in the opposite case.
        coupling: ``"gradient"`` (add ρ(X − Z + U) to the gradient; put before the base
            optimizer) or ``"decoupled"`` (subtract η_t ρ(X − Z + U) from the base optimizer's
            step; pass that optimizer as ``base``, or chain the transform after it).
        decoupled_lr: η_t ≥ 0 for decoupled coupling (float or schedule of the update count).
        state_storage: how Z and U are stored between steps (:class:`admm_jax.core.storage.
            StateStorage` or a dtype name such as ``"bf16"``, ``"e4m3"``); all arithmetic is
            fp32. Default fp32 (ELSA-L uses bf16 / fp8).
        halt_on_nonfinite: raise (through a host callback) when a stage 2 finds NaN/inf in X, Z
            or U. Either way the count is recorded in ``state.nonfinite``.
        base: with ``coupling="decoupled"``, the base optimizer to wrap: the transform receives
            the raw gradients, feeds them to ``base`` and pulls its step. Required when the
            split asks for a curvature (``Split.curvature_decay``); not allowed with
            ``coupling="gradient"``.

    Returns:
        The transform; its state is an :class:`~admm_jax.core.state.ADMMState`, or with
        ``base`` a :class:`~admm_jax.core.state.DecoupledState` of it and the base state
        (:func:`~admm_jax.core.state.admm_state` finds the ADMM state in either). ``init`` on a
        params tree without leaves (``optax.tree.map_params``' placeholder) gives a state whose
        ``blocks`` is that tree, so ``map_params`` maps ``f`` over every leaf of the blocks.

    Raises:
        ValueError: a bad argument, or ``coupling="decoupled"`` without ``base`` for a split
            with a curvature (it would see the base optimizer's steps, not gradients).
    """
    _check_arguments(rho, interval, rho_scaling, n_layers, residual_balancing, coupling,
                     decoupled_lr)
    _check_base(split, coupling, base)
    base = None if base is None else optax.with_extra_args_support(base)
    if state_storage is None or isinstance(state_storage, str):
        state_storage = StateStorage(state_storage or "float32")
    cfg = _Config(split=split, base_rho=_make_base_rho(rho, rho_scaling, n_layers),
                  schedule=rho_schedule or (lambda t: jnp.ones((), jnp.float32)),
                  residual_balancing=residual_balancing, storage=state_storage,
                  halt_on_nonfinite=halt_on_nonfinite)

    def init_fn(params):
        if jax.tree_util.tree_leaves(params):
            blocks = jax.tree_util.tree_map_with_path(
                lambda p, x, keep: _init_block(cfg, path_str(p), x) if keep
                else optax.MaskedNode(), params, _checked_selection(params, mask))
        else:  # nothing to constrain (e.g. the placeholder of optax.tree.map_params)
            blocks = params
        state = ADMMState(count=jnp.zeros((), jnp.int32), blocks=blocks,
                          nonfinite=jnp.zeros((), jnp.int32))
        return state if base is None else DecoupledState(admm=state, base=base.init(params))

    def update_fn(updates, state: ADMMState | DecoupledState, params=None, **extra_args):
        if params is None:
            raise ValueError("the ADMM transform needs params: call tx.update(grads, state, "
                             "params)")
        ours, base_state = (state, None) if base is None else state
        count = ours.count
        # 1. stage 2 every K steps: Z ← prox_C(X + U), U ← U + X − Z, ρ bookkeeping
        blocks, nonfinite = jax.lax.cond(
            (count > 0) & (count % interval == 0),
            lambda: _stage2(cfg, ours.blocks, params, count),
            lambda: (ours.blocks, ours.nonfinite))
        # 2. the curvature estimate from the raw gradients, for splits that ask for one
        if split.curvature_decay is not None:
            blocks = _update_curvature(blocks, updates, split.curvature_decay)
        # 3. the wrapped base optimizer's step (decoupled coupling with base=)
        if base is not None:
            updates, base_state = base.update(updates, base_state, params, **extra_args)
        # 4. stage 1: couple X to Z + U (added to the gradient, or pulled from the step)
        scale = 1.0 if coupling == "gradient" else -(
            decoupled_lr(count) if callable(decoupled_lr) else decoupled_lr)
        updates = _couple(updates, params, blocks, scale, cfg.storage)
        ours = ADMMState(count=count + 1, blocks=blocks, nonfinite=nonfinite)
        return updates, ours if base is None else DecoupledState(admm=ours, base=base_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
