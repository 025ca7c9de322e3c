"""``y = x @ W`` for a sparse ``W``, differentiable in ``x`` and in ``W.values``, on every backend.

For ``x [..., n_in]`` (any batch/token axes, flattened to ``T``) and ``W ∈ R^{n_in × n_out}``
stored as a :class:`~kernels.sparse.SparseMatrix` (COO) or a
:class:`~kernels.block.BlockSparseMatrix` (BSR), ``jax.custom_vjp`` wires

    forward   y         = x @ W                                  (SpMM)
    backward  ∂L/∂x     = dy @ Wᵀ                                (SpMM on the transposed order)
              ∂L/∂V     = (xᵀ dy) restricted to the support      (SDDMM)

so the dense ``n_in × n_out`` gradient ``xᵀ dy`` is never formed (Gale et al. 2020, "Sparse GPU
Kernels for Deep Learning"; the RoSA sparse adapter, Nikdan et al. 2024, trains its values the
same way). The indices receive no gradient.

Implementations (``impl``):

=============  =====================================================================
``reference``  dense jnp (:mod:`kernels.reference`), the ground truth of the tests
``xla``        chunked gathers + segment sums (:mod:`kernels.xla`, :mod:`kernels.block_xla`)
``densify``    scatter ``W`` into a dense matrix for the two matmuls; the XLA SDDMM for the
               values (the dense *gradient* is still never formed)
``pallas_gpu`` the Triton kernels of :mod:`kernels.pallas_gpu`
``pallas_tpu`` the Mosaic kernels of :mod:`kernels.pallas_tpu`
``pallas``     the accelerator's own Pallas kernels: Triton on GPU, Mosaic on TPU, and on CPU
               (where Pallas does not compile) the Triton kernels in interpret mode
``auto``       per platform: ``densify`` above the :class:`DensifyRule` crossover, else
               ``xla`` on CPU, ``pallas_gpu`` on GPU, ``pallas_tpu`` on TPU (``xla`` for a
               BSR block size the platform's kernels do not take: Triton needs powers of two
               ≥ 16, Mosaic multiples of 16)
=============  =====================================================================

The platform is chosen **at lowering time** (``jax.lax.platform_dependent``), not from
``jax.default_backend()`` at trace time: one traced (or exported) function carries the right
path for each platform it is lowered for, and a CPU trace exported for ``cuda`` runs the GPU
kernels. The density/token rule is an explicit, hashable argument (:class:`DensifyRule`; the
compact layers hold one in their config), never a mutable global.

Why densify at all: the sparse forms do less work only while the matrix is sparse enough. On CPU
XLA's gather + segment-sum does far less useful work per second than the dense matmul; the COO
GPU kernel's one-hot reduce spends ``BC = 32`` multiply-adds per useful one; the COO TPU kernel
walks entries one scalar at a time. BSR runs dense tile products and so pays off up to far
higher densities. :data:`COO_CROSSOVER` and :data:`BLOCK_CROSSOVER` hold the crossovers: the CPU
ones measured on whole SmolLM2 forwards (``python -m experiments.bench_sparse --parts crossover
--standins smollm2 [--crossover_structure block16]``, ``results/bench_sparse_crossover.json``
and ``results/bench_sparse_crossover_block16.json``), the GPU and TPU ones *estimates*
from the kernels' costs until measured on the device with ``python -m experiments.bench_sparse
--device``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from admm_jax._checks import check_choice
from kernels import block_xla, pallas_gpu, pallas_tpu, reference, xla
from kernels.block import BlockSparseMatrix
from kernels.sparse import SparseMatrix

Impl = Literal["auto", "xla", "densify", "reference", "pallas", "pallas_gpu", "pallas_tpu"]
_IMPLS = ("auto", "xla", "densify", "reference", "pallas", "pallas_gpu", "pallas_tpu")
Platform = Literal["cpu", "gpu", "tpu"]
_PLATFORMS = ("cpu", "gpu", "tpu")
Format = Literal["coo", "block"]
Points = tuple[tuple[int, float], ...]  # (tokens, density) crossover points


class Crossover(NamedTuple):
    """Densify-above tables per platform: ``(tokens, density)`` points, interpolated linearly in
    ``log(tokens)`` and held constant beyond the end points (:meth:`DensifyRule.densify_above`)."""

    cpu: Points
    gpu: Points
    tpu: Points


#: COO. CPU: measured whole-model crossovers. GPU (estimate): one useful multiply-add in 32 on
#: tensor-core-free fp32 ``dot``s, so ≈ 3 % at many tokens; at one token both forms are
#: memory-bound (8 bytes per entry against 4 per dense weight). TPU (estimate): one scalar step
#: per entry and token tile, against an MXU that streams the dense weight, so below 0.1 %.
COO_CROSSOVER = Crossover(
    cpu=((1, 0.387), (8, 0.387), (64, 0.141), (512, 0.071)),
    gpu=((1, 0.35), (16, 0.1), (128, 0.03), (512, 0.02)),
    tpu=((1, 0.001), (512, 0.0002)),
)

#: BSR. CPU: measured on whole SmolLM2 forwards pruned in 16 × 16 tiles
#: (``results/bench_sparse_crossover_block16.json``); at 1 and 64 tokens the XLA form won up to
#: the grid's end (70 %), so 0.7 there is a lower bound. GPU (estimate): dense ``b × b`` tile
#: products, but each program's ``[BT, b] @ [b, b]`` dots are small for tensor cores, so
#: densifying pays from about a quarter (half at one token, where both are memory-bound). TPU
#: (estimate): every stored block is one grid step (~0.35 µs of overhead) whose ``[b, b] @ [b,
#: BT]`` product fills 1/64 of a 128 × 128 MXU at b = 16, while the dense product of a 576 ×
#: 1536 layer takes a few µs: only a percent or two of blocks pays.
BLOCK_CROSSOVER = Crossover(
    cpu=((1, 0.7), (64, 0.7), (512, 0.173)),
    gpu=((1, 0.5), (512, 0.25)),
    tpu=((1, 0.02), (512, 0.02)),
)


class DensifyRule(NamedTuple):
    """When ``impl="auto"`` densifies: per format and platform, the density above which the
    dense product is used at a given token count. Hashable (a jit static argument, a field of a
    layer's config); the defaults are :data:`COO_CROSSOVER` and :data:`BLOCK_CROSSOVER`."""

    coo: Crossover = COO_CROSSOVER
    block: Crossover = BLOCK_CROSSOVER

    @classmethod
    def constant(cls, density: float) -> DensifyRule:
        """One crossover everywhere: ``0.0`` densifies every non-empty matrix, ``1.0`` none."""
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must lie in [0, 1], got {density!r}")
        table = Crossover(*(((1, float(density)),),) * 3)
        return cls(coo=table, block=table)

    def densify_above(self, fmt: Format, platform: Platform, tokens: int) -> float:
        """The crossover density of ``fmt`` on ``platform`` at ``tokens`` rows of ``x``."""
        check_choice("fmt", fmt, ("coo", "block"))
        check_choice("platform", platform, _PLATFORMS)
        points = sorted(getattr(getattr(self, fmt), platform))
        if not points or any(t < 1 or not 0.0 <= d <= 1.0 for t, d in points):
            raise ValueError(f"a crossover table needs (tokens ≥ 1, density in [0, 1]) points, "
                             f"got {points!r}")
        t, d = zip(*points)
        return float(np.interp(np.log(max(tokens, 1)), np.log(t), d))


DEFAULT_RULE = DensifyRule()

_SPARSE_IMPL = {"cpu": "xla", "gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def _format(w) -> Format:
    if isinstance(w, BlockSparseMatrix):
        return "block"
    if isinstance(w, SparseMatrix):
        return "coo"
    raise TypeError(f"w must be a SparseMatrix or a BlockSparseMatrix, got {type(w).__name__}")


def resolve_impl(impl: Impl = "auto", *, platform: Platform | None = None,
                 density: float | None = None, tokens: int | None = None, fmt: Format = "coo",
                 rule: DensifyRule = DEFAULT_RULE) -> str:
    """The concrete implementation ``impl`` stands for on ``platform`` (default: the current
    backend). ``"auto"``: ``"densify"`` if ``density > rule.densify_above(fmt, platform,
    tokens)``, else the platform's sparse kernels (``xla`` / ``pallas_gpu`` / ``pallas_tpu``);
    without ``density`` and ``tokens`` the sparse kernels. ``"pallas"``: the platform's Pallas
    kernels (``pallas_gpu`` on CPU, run in interpret mode)."""
    check_choice("impl", impl, _IMPLS)
    platform = platform or ("gpu" if jax.default_backend() in ("gpu", "cuda", "rocm")
                            else jax.default_backend())
    check_choice("platform", platform, _PLATFORMS)
    if impl == "pallas":
        return "pallas_tpu" if platform == "tpu" else "pallas_gpu"
    if impl != "auto":
        return impl
    if density is not None and tokens is not None and \
            density > rule.densify_above(fmt, platform, tokens):
        return "densify"
    return _SPARSE_IMPL[platform]


_COO_OPS = {
    "reference": (reference.spmm, reference.spmm_t, reference.sddmm),
    "xla": (xla.spmm, xla.spmm_t, xla.sddmm),
    "densify": (reference.spmm, reference.spmm_t, xla.sddmm),
    "pallas_gpu": (pallas_gpu.spmm, pallas_gpu.spmm_t, pallas_gpu.sddmm),
    "pallas_tpu": (pallas_tpu.spmm, pallas_tpu.spmm_t, pallas_tpu.sddmm),
}
_BLOCK_OPS = {
    "reference": (reference.spmm, reference.spmm_t, reference.sddmm),
    "xla": (block_xla.spmm, block_xla.spmm_t, block_xla.sddmm),
    "densify": (reference.spmm, reference.spmm_t, block_xla.sddmm),
    "pallas_gpu": (pallas_gpu.block_spmm, pallas_gpu.block_spmm_t, pallas_gpu.block_sddmm),
    "pallas_tpu": (pallas_tpu.block_spmm, pallas_tpu.block_spmm_t, pallas_tpu.block_sddmm),
}


class _Plan(NamedTuple):
    """The implementation per platform, and whether Pallas runs in interpret mode on each."""

    cpu: str
    gpu: str
    tpu: str
    interpret: tuple[bool, bool, bool]


_BLOCK_SUPPORT = {"pallas_gpu": pallas_gpu.supports_block, "pallas_tpu": pallas_tpu.supports_block}


def _plan(impl: Impl, fmt: Format, density: float, tokens: int, rule: DensifyRule,
          interpret: bool, block: int | None = None) -> _Plan:
    """Per platform, what ``impl`` runs; under ``"auto"`` a block size the platform's Pallas
    kernels do not take (:func:`kernels.pallas_gpu.supports_block`, ...) falls back to XLA."""
    impls = [resolve_impl(impl, platform=p, density=density, tokens=tokens, fmt=fmt, rule=rule)
             for p in _PLATFORMS]
    if impl == "auto" and block is not None:
        impls = [i if i not in _BLOCK_SUPPORT or _BLOCK_SUPPORT[i](block) else "xla"
                 for i in impls]
    # Pallas does not compile for CPU: a CPU lowering of a Pallas plan interprets it
    modes = (interpret or impls[0].startswith("pallas"), interpret, interpret)
    return _Plan(*impls, interpret=modes)


def _op(plan: _Plan, fmt: Format, which: int):
    """Operation ``which`` (0: SpMM, 1: SpMMᵀ, 2: SDDMM) of ``plan``: one function, or a
    ``platform_dependent`` choice among the platforms' functions when they differ."""
    table = _BLOCK_OPS if fmt == "block" else _COO_OPS

    def concrete(impl: str, interpret: bool):
        fn = table[impl][which]
        return functools.partial(fn, interpret=interpret) if impl.startswith("pallas") else fn

    cpu, gpu, tpu = (concrete(i, m) for i, m in zip(plan[:3], plan.interpret))
    if plan[:3] == (plan.cpu,) * 3 and len(set(plan.interpret)) == 1:
        return cpu
    return lambda *args: jax.lax.platform_dependent(*args, cpu=cpu, cuda=gpu, rocm=gpu, tpu=tpu,
                                                    default=cpu)


_INDEX_FIELDS = {"coo": ("rows", "cols"), "block": ("block_rows", "block_cols")}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, plan, fmt):
    return _op(plan, fmt, 0)(x, w)


def _matmul_fwd(x, w, plan, fmt):
    return _matmul(x, w, plan, fmt), (x, w)


def _matmul_bwd(plan, fmt, res, dy):
    x, w = res
    dx = _op(plan, fmt, 1)(dy, w).astype(x.dtype)
    dv = _op(plan, fmt, 2)(x, dy, w).astype(w.values.dtype)
    return dx, dataclasses.replace(w, values=dv, **dict.fromkeys(_INDEX_FIELDS[fmt]))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def sparse_matmul(x: jax.Array, w: SparseMatrix | BlockSparseMatrix, *, impl: Impl = "auto",
                  rule: DensifyRule = DEFAULT_RULE, interpret: bool = False) -> jax.Array:
    """``y = x @ W`` for ``x [..., n_in]`` → ``[..., n_out]`` (dtype: that of ``x`` and
    ``W.values`` promoted, at least float32), differentiable in ``x`` and ``W.values`` with
    the SpMM / SDDMM backward of the module doc. ``impl`` and ``rule`` pick the implementation
    per platform (:func:`resolve_impl` at ``W``'s density and the number of rows of ``x``);
    ``interpret`` runs the Pallas kernels in interpret mode."""
    fmt = _format(w)
    if not isinstance(rule, DensifyRule):
        raise TypeError(f"rule must be a DensifyRule, got {type(rule).__name__}")
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x must have shape [..., {w.shape[0]}] to multiply W of shape "
                         f"{w.shape}, got {x.shape}")
    lead = x.shape[:-1]
    block = w.block_size if fmt == "block" else None
    plan = _plan(impl, fmt, w.density, math.prod(lead), rule, bool(interpret), block)
    y = _matmul(x.reshape(-1, w.shape[0]), w, plan, fmt)
    return y.reshape(*lead, w.shape[1])


spmm = sparse_matmul


def sddmm(x: jax.Array, dy: jax.Array, w: SparseMatrix | BlockSparseMatrix, *,
          impl: Impl = "auto", interpret: bool = False) -> jax.Array:
    """The gradient of ``W.values`` for ``y = x @ W``: ``s[i] = Σ_t x[t, rows[i]] · dy[t,
    cols[i]]`` (COO, ``[nnz]``) or ``S_k = x[:, row_k]ᵀ dy[:, col_k]`` (BSR, ``[n_blocks, b,
    b]``), with ``x [..., n_in]``, ``dy [..., n_out]`` sharing the batch axes. ``"auto"`` and
    ``"densify"`` use the platform's sparse kernel (an SDDMM never densifies)."""
    fmt = _format(w)
    if x.shape[:-1] != dy.shape[:-1] or x.shape[-1:] != (w.shape[0],) or \
            dy.shape[-1:] != (w.shape[1],):
        raise ValueError(f"x [..., {w.shape[0]}] and dy [..., {w.shape[1]}] must share batch "
                         f"axes, got {x.shape} and {dy.shape}")
    block = w.block_size if fmt == "block" else None
    plan = _plan(impl, fmt, 0.0, 1, DensifyRule.constant(1.0), bool(interpret), block)
    return _op(plan, fmt, 2)(x.reshape(-1, w.shape[0]), dy.reshape(-1, w.shape[1]), w)
