"""SPAP (Hu & Yuan, 2025): structured pruning of one GLU MLP by a penalty method on a relaxed
neuron selection, then alternating minimisation with a closed-form down projection.

Layout: rows ``X ∈ ℝ^{N×d}`` of the MLP input, hidden ``H = silu(X W_g) ⊙ (X W_u)`` ``[N, n]``,
dense output ``Y = H W_d`` ``[N, d]``; neuron ``i`` is row ``W_i`` of the ``[n, d]`` down kernel
(column ``i`` of the paper's ``[out, in]`` ``W_down``). Pruning ``p = n − k`` neurons is the
mixed-integer problem ``min ½‖Y − H W‖² s.t. s_i W_i = 0, s ∈ {0, 1}ⁿ, Σ s = p`` (``s_i = 1``:
pruned). SPAP relaxes ``s ∈ [0, 1]ⁿ`` (the paper's Thm. 1: the relaxation keeps the optimum) and
penalises the complementarity constraint::

    min_{W, s ∈ [0,1]ⁿ, Σs = p}  ½‖Y − H W‖²_F + (ρ/2) Σ_i s_i ‖W_i‖² + (δ/2)‖W‖²_F

For ``j = 0 … K − 1`` (:func:`penalty_select`):

1. ``W``-step, closed form: ``W = (A + ρ_j diag(s) + δI)⁻¹ A W_d`` with ``A = HᵀH``;
2. composite score ``c_i = (‖W_i‖²)^t · (‖H_i‖²)^{1−t}`` (column norm vs. activation energy);
3. ``ŝ`` = indicator of the ``p`` lowest scores (the minimiser of ``Σ s_i c_i`` over the
   feasible set), soft update ``s ← α s + (1 − α) ŝ`` (stays feasible: a convex combination);
4. ``ρ_{j+1} = τ ρ_j``.

Then :func:`relaxed_to_binary` prunes exactly the ``p`` largest ``s_i``, the down projection is
refit in closed form on the kept neurons (:func:`~admm_jax.spap.lsq.refit_down`), and
:func:`alternating_minimisation` alternates gradient steps on ``W_g, W_u`` (``W_d`` fixed) with
the closed-form ``W_d`` (``W_g, W_u`` fixed) on ``½‖Y − H(W_g, W_u) W_d‖²``.

References:
    Hu & Yuan, "SPAP: Structured Pruning via Alternating Optimization and Penalty Methods",
    arXiv:2505.03373, 2025.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from admm_jax._checks import check_int, check_real
from admm_jax.spap.lsq import RIDGE, check_glu, hidden, masked_solve, refit_down, ridge_value

Array = jax.Array
_HI = lax.Precision.HIGHEST
_TINY = float(jnp.finfo(jnp.float32).tiny)

#: ``K``: penalty iterations. With ``τ = 1.5`` twenty of them take ``ρ`` from ``ρ⁰`` to
#: ``3325 ρ⁰``, i.e. from a negligible to a dominant penalty (``> 3 · mean(diag A)``), so the
#: selection has settled long before the end; each costs one ``n × n`` Cholesky solve.
ITERS = 20
#: ``t``: balance of the composite score. At ``t = ½`` the score is ``‖W_i‖ ‖H_i‖ = ‖H_i W_iᵀ‖_F``,
#: the exact size of neuron ``i``'s contribution to the output; the paper tunes ``t`` without a
#: single published value, and ½ is the neutral choice it reduces to.
BALANCE = 0.5
#: ``α``: momentum of the soft update. 0.7 lets a neuron's ``s`` cross ½ after two consistent
#: votes (``0.3 + 0.21 = 0.51``) and damps a single flip of the score ranking. (On SmolLM2 MLPs
#: the selection was insensitive to it: α ∈ {0.3, 0.7, 0.9} and K ∈ {20, 40} kept the same
#: neurons up to the output error's fourth digit.)
MOMENTUM = 0.7
#: ``τ``: geometric growth of ``ρ`` (the usual penalty-method rate between 1.1 and 2).
RHO_GROWTH = 1.5
#: ``ρ⁰ / mean(diag A)``: the first penalty barely moves ``W`` (0.1 % of a typical diagonal), so
#: the first scores are those of the unpenalised least squares.
RHO_INIT = 1e-3
#: Alternating-minimisation rounds after the binary mask (each: gradient steps on gate/up, then
#: the closed-form down). The paper runs "a few"; on SmolLM2 MLPs (layers 1–2, 40 % sparsity,
#: 2,048 calibration tokens) 4 rounds × 20 steps at 3e-4 lowered the held-out MLP error below
#: both 2 × 10 steps at 1e-4 and the plain refit, while 8 × 20 at 1e-3 began to overfit.
AM_ROUNDS = 4
#: Adam steps on gate/up per round (full-batch gradient of the calibration loss).
AM_STEPS = 20
#: Adam learning rate of those steps (see :data:`AM_ROUNDS`).
AM_LR = 3e-4

#: SPAP's options and their defaults (the ``prune(method="spap", ...)`` options).
SPAP_DEFAULTS: dict[str, Any] = {
    "iters": ITERS, "balance": BALANCE, "momentum": MOMENTUM, "rho_init": RHO_INIT,
    "rho_growth": RHO_GROWTH, "ridge": RIDGE, "am_rounds": AM_ROUNDS, "am_steps": AM_STEPS,
    "am_lr": AM_LR}


class PrunedMLP(NamedTuple):
    """A pruned GLU MLP.

    Attributes:
        mlp: its parameters (gate/up columns and down rows of pruned neurons are zero).
        keep: bool ``[n]``, the kept neurons.
        score: float ``[n]``, the method's final neuron score (for SPAP the relaxed ``s``, the
            fraction by which each neuron is pruned, in ``[0, 1]``).
    """

    mlp: dict
    keep: Array
    score: Array


def _check_penalty(iters: Any, balance: Any, momentum: Any, rho_init: Any, rho_growth: Any,
                   ridge: Any) -> None:
    check_int("iters", iters, 1)
    check_real("balance", balance, low=0.0, high=1.0)
    check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
    check_real("rho_init", rho_init, low=0.0, low_open=True)
    check_real("rho_growth", rho_growth, low=1.0)
    check_real("ridge", ridge, low=0.0, low_open=True)


def check_spap_options(*, iters: Any, balance: Any, momentum: Any, rho_init: Any,
                       rho_growth: Any, ridge: Any, am_rounds: Any, am_steps: Any,
                       am_lr: Any) -> None:
    """Eager checks of SPAP's options (see :data:`SPAP_DEFAULTS`): ``ValueError`` /
    ``TypeError`` naming the option and its allowed range."""
    _check_penalty(iters, balance, momentum, rho_init, rho_growth, ridge)
    check_int("am_rounds", am_rounds, 0)
    check_int("am_steps", am_steps, 1)
    check_real("am_lr", am_lr, low=0.0, low_open=True)


def composite_score(w_down: Array, act_sqnorm: Array, balance: float) -> Array:
    """``log c_i = t · log‖W_i‖² + (1 − t) · log‖H_i‖²`` (the log of SPAP's composite score;
    logs keep it finite and order-preserving), ``w_down: [n, d]``, ``act_sqnorm = diag(HᵀH)``."""
    col = jnp.log(jnp.sum(jnp.square(w_down), axis=1) + _TINY)
    return balance * col + (1.0 - balance) * jnp.log(act_sqnorm + _TINY)


def _first(order: Array, count: Array) -> Array:
    """Bool mask of the first ``count`` (may be traced) entries of the permutation ``order``."""
    rank = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
    return rank < count


def relaxed_to_binary(s: Array, score: Array, n_keep: int | Array) -> Array:
    """Bool keep mask of exactly ``n_keep`` neurons: those with the smallest relaxed ``s``
    (``s_i = 1``: pruned), ties broken by the higher ``score``, then the lower index."""
    return _first(jnp.lexsort((-score, s)), n_keep)


@functools.partial(jax.jit, static_argnames=("iters",))
def _penalty(gram: Array, w_down: Array, rates: Array, n_keep: Array, *,
             iters: int) -> tuple[Array, Array, Array]:
    balance, momentum, rho_init, rho_growth, ridge = rates
    n = gram.shape[0]
    act = jnp.diagonal(gram)
    cross = jnp.matmul(gram, w_down, precision=_HI)
    delta = ridge_value(gram, ridge)
    everyone = jnp.ones(n, bool)

    def step(_, carry):
        s, rho, _score = carry
        w = masked_solve(gram, cross, everyone, rho * s + delta)             # 1. W-step
        score = composite_score(w, act, balance)                               # 2.
        s_hat = (~_first(jnp.argsort(-score, stable=True), n_keep)).astype(jnp.float32)  # 3.
        return momentum * s + (1.0 - momentum) * s_hat, rho * rho_growth, score  # 3-4.

    s0 = jnp.full(n, (n - n_keep) / n, jnp.float32)
    rho0 = rho_init * jnp.mean(act)
    s, _, score = lax.fori_loop(0, iters, step, (s0, rho0, jnp.zeros(n, jnp.float32)))
    return relaxed_to_binary(s, score, n_keep), s, score


def penalty_select(gram: Array, w_down: Array, n_keep: int, *, iters: int = ITERS,
                   balance: float = BALANCE, momentum: float = MOMENTUM,
                   rho_init: float = RHO_INIT, rho_growth: float = RHO_GROWTH,
                   ridge: float = RIDGE) -> tuple[Array, Array]:
    """SPAP's penalty phase (module docstring, steps 1–4, then :func:`relaxed_to_binary`).

    Args:
        gram: ``A = HᵀH`` ``[n, n]`` of the hidden activations.
        w_down: the dense down kernel ``[n, d]`` (``HᵀY = A W_d``).
        n_keep: neurons to keep, ``1 ≤ n_keep ≤ n``.
        iters, balance, momentum, rho_init, rho_growth, ridge: ``K, t, α, ρ⁰/mean(diag A), τ,
            δ/mean(diag A)`` (see the module constants for their defaults and why).

    Returns:
        ``(keep, s)``: the bool keep mask of exactly ``n_keep`` neurons and the relaxed ``s``.
    """
    n = jnp.shape(gram)[0]
    n_keep = check_int("n_keep", n_keep, 1, n)
    _check_penalty(iters, balance, momentum, rho_init, rho_growth, ridge)
    rates = jnp.asarray([balance, momentum, rho_init, rho_growth, ridge], jnp.float32)
    keep, s, _ = _penalty(jnp.asarray(gram, jnp.float32), jnp.asarray(w_down, jnp.float32),
                          rates, jnp.int32(n_keep), iters=iters)
    return keep, s


def _loss(wg: Array, wu: Array, wd: Array, x: Array, y: Array) -> Array:
    """``½ mean_t ‖y_t − h_t W_d‖²`` with ``h = silu(x W_g) ⊙ (x W_u)``."""
    h = hidden({"gate_proj": {"kernel": wg}, "up_proj": {"kernel": wu}}, x)
    r = y - jnp.matmul(h, wd, precision=_HI)
    return 0.5 * jnp.mean(jnp.sum(jnp.square(r), axis=-1))


@functools.partial(jax.jit, static_argnames=("steps",))
def _am_round(wg: Array, wu: Array, wd: Array, x: Array, y: Array, lr: Array, ridge: Array, *,
              steps: int) -> tuple[Array, Array, Array, Array]:
    """One round on the kept neurons only (``wg, wu: [d, k]``, ``wd: [k, d]``): ``steps`` Adam
    steps on ``(W_g, W_u)``, then the closed-form ``W_d``; returns the new weights and their
    loss. ``ridge`` is relative to ``mean(diag A)`` over these ``k`` neurons."""
    opt = optax.adam(lr)

    def step(_, carry):
        params, state = carry
        grads = jax.grad(lambda p: _loss(*p, wd, x, y))(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state

    (wg, wu), _ = lax.fori_loop(0, steps, step, ((wg, wu), opt.init((wg, wu))))
    h = hidden({"gate_proj": {"kernel": wg}, "up_proj": {"kernel": wu}}, x)
    gram = jnp.matmul(h.T, h, precision=_HI)
    everyone = jnp.ones(gram.shape[0], bool)
    wd = masked_solve(gram, jnp.matmul(h.T, y, precision=_HI), everyone,
                      jnp.full(everyone.shape, ridge_value(gram, ridge)))
    return wg, wu, wd, _loss(wg, wu, wd, x, y)


def alternating_minimisation(mlp: dict, keep: Array, x: Array, y: Array, *,
                             rounds: int = AM_ROUNDS, steps: int = AM_STEPS,
                             lr: float = AM_LR, ridge: float = RIDGE) -> dict:
    """SPAP's alternating minimisation on the kept neurons of a pruned GLU MLP: per round,
    ``steps`` Adam steps on ``W_g, W_u`` for ``½ mean_t ‖y_t − h_t W_d‖²`` with ``W_d`` fixed,
    then ``W_d = (H_KᵀH_K + δI)⁻¹ H_Kᵀ Y`` with ``W_g, W_u`` fixed. A round is accepted only if
    it lowers the calibration loss, so the result is never worse than ``mlp`` on ``(x, y)``.
    The rounds run on the ``k`` kept neurons only (gathered, then scattered back): the iterates
    of the masked ``[d, n]`` problem at ``k / n`` of its cost.

    Args:
        mlp: GLU parameters, zero outside ``keep`` (gate/up columns, down rows).
        keep: bool ``[n]``.
        x: MLP input rows ``[N, d]`` (the calibration tokens).
        y: the dense MLP's output on them ``[N, d]``.
        rounds, steps, lr, ridge: see :data:`AM_ROUNDS`, :data:`AM_STEPS`, :data:`AM_LR`,
            :data:`~admm_jax.spap.lsq.RIDGE`.

    Returns:
        The updated GLU parameters.
    """
    kept = jnp.flatnonzero(jnp.asarray(keep, bool))
    wg, wu = (jnp.asarray(mlp[k]["kernel"], jnp.float32)[:, kept] for k in ("gate_proj", "up_proj"))
    wd = jnp.asarray(mlp["down_proj"]["kernel"], jnp.float32)[kept]
    # δ relative to mean(diag A) over all n neurons, the pruned ones counting as zero energy
    ridge_kept = jnp.float32(ridge * kept.size / keep.shape[0])
    best = _loss(wg, wu, wd, x, y)
    for _ in range(rounds):
        new = _am_round(wg, wu, wd, x, y, jnp.float32(lr), ridge_kept, steps=steps)
        if not bool(new[3] < best):
            break
        (wg, wu, wd), best = new[:3], new[3]
    n, d = keep.shape[0], x.shape[-1]
    columns = jnp.zeros((d, n), jnp.float32)
    return {"gate_proj": {"kernel": columns.at[:, kept].set(wg)},
            "up_proj": {"kernel": columns.at[:, kept].set(wu)},
            "down_proj": {"kernel": jnp.zeros((n, d), jnp.float32).at[kept].set(wd)}}


def spap_prune_mlp(mlp: dict, x: Array, n_keep: int, *, gram: Array | None = None,
                   where: str = "the MLP", iters: int = ITERS, balance: float = BALANCE,
                   momentum: float = MOMENTUM, rho_init: float = RHO_INIT,
                   rho_growth: float = RHO_GROWTH, ridge: float = RIDGE,
                   am_rounds: int = AM_ROUNDS, am_steps: int = AM_STEPS,
                   am_lr: float = AM_LR) -> PrunedMLP:
    """SPAP on one GLU MLP: :func:`penalty_select`, the closed-form refit of ``W_d`` on the kept
    neurons, then :func:`alternating_minimisation` (module docstring). Keeping every neuron
    returns ``mlp`` unchanged: the dense ``W_d`` already solves the unregularised problem.

    Args:
        mlp: dense GLU parameters (``{"gate_proj": {"kernel": [d, n]}, ...}``).
        x: MLP input rows ``[N, d]`` (the MLP-norm output on the calibration tokens).
        n_keep: neurons to keep, ``1 ≤ n_keep ≤ n``.
        gram: ``HᵀH`` on ``x`` if already computed (e.g. from
            :func:`~admm_jax.spap.lsq.glu_stats`).
        where: the layer, named in warnings and errors.
        iters, balance, momentum, rho_init, rho_growth, ridge, am_rounds, am_steps, am_lr:
            see :data:`SPAP_DEFAULTS`.

    Returns:
        The :class:`PrunedMLP` (its ``score`` is the relaxed ``s``).
    """
    _, n = check_glu(mlp, where)
    n_keep = check_int("n_keep", n_keep, 1, n)
    check_spap_options(iters=iters, balance=balance, momentum=momentum, rho_init=rho_init,
                       rho_growth=rho_growth, ridge=ridge, am_rounds=am_rounds,
                       am_steps=am_steps, am_lr=am_lr)
    x = jnp.asarray(x, jnp.float32)
    h = hidden(mlp, x)
    gram = jnp.matmul(h.T, h, precision=_HI) if gram is None else jnp.asarray(gram, jnp.float32)
    if n_keep == n:
        return PrunedMLP(mlp, jnp.ones(n, bool), jnp.zeros(n, jnp.float32))
    wd = jnp.asarray(mlp["down_proj"]["kernel"], jnp.float32)
    keep, s = penalty_select(gram, wd, n_keep, iters=iters, balance=balance, momentum=momentum,
                             rho_init=rho_init, rho_growth=rho_growth, ridge=ridge)
    cross = jnp.matmul(gram, wd, precision=_HI)
    pruned = {name: {"kernel": jnp.where(keep[None, :], mlp[name]["kernel"], 0.0)}
              for name in ("gate_proj", "up_proj")}
    pruned["down_proj"] = {"kernel": refit_down(gram, cross, keep, ridge=ridge,
                                                n_tokens=x.shape[0], where=where)}
    if am_rounds:
        y = jnp.matmul(h, wd, precision=_HI)
        pruned = alternating_minimisation(pruned, keep, x, y, rounds=am_rounds, steps=am_steps,
                                          lr=am_lr, ridge=ridge)
    return PrunedMLP(pruned, keep, s)
