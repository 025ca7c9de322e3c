"""The GPU and TPU paths lower, checked on the CPU.

``jax.export`` / ``Traced.lower(lowering_platforms=...)`` run the whole Python lowering that a
GPU or TPU machine runs — Pallas → Triton IR (cuda) and Pallas → Mosaic (tpu), with their block
shape, indexing and dtype rules — and emit the module with the kernel as a custom call. What they
cannot run without the device: compiling the Triton IR to PTX (and the PTX to a cubin), and
Mosaic's own compilation of its module (layout assignment, VMEM allocation) inside the TPU
runtime. Those steps run the first time a kernel is called on the device
(``python -m experiments.bench_sparse --device`` exercises them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

import kernels
from admm_jax.models.linears import BlockSparseLinear, SparseLinear
from kernels import pallas_gpu, pallas_tpu

TRITON, MOSAIC = "__gpu$xla.gpu.triton", "tpu_custom_call"
KERNEL_TARGETS = {"cuda": TRITON, "tpu": MOSAIC}
SMOL_MLP = (576, 1536)  # SmolLM2-135M up/gate projection, [in, out]


def custom_calls(text: str) -> list[str]:
    """Custom-call targets in a StableHLO module's text, in order."""
    return [line.split("custom_call @")[1].split("(")[0]
            for line in text.splitlines() if "custom_call @" in line]


def _export(fn, platform: str, *args) -> list[str]:
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in (TRITON, MOSAIC)]
    exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    return custom_calls(exported.mlir_module())


def _coo(density: float, seed: int = 0) -> kernels.SparseMatrix:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(SMOL_MLP).astype(np.float32)
    return kernels.from_dense(w, rng.random(SMOL_MLP) < density)


def _bsr(density: float, block: int = 16, seed: int = 0) -> kernels.BlockSparseMatrix:
    rng = np.random.default_rng(seed)
    grid = (SMOL_MLP[0] // block, SMOL_MLP[1] // block)
    keep = np.kron(rng.random(grid) < density, np.ones((block, block), bool))
    w = rng.standard_normal(SMOL_MLP).astype(np.float32)
    return kernels.block_from_dense(w, keep, block_size=block)


KERNELS = {
    "coo": {"cuda": (pallas_gpu.spmm, pallas_gpu.spmm_t, pallas_gpu.sddmm),
            "tpu": (pallas_tpu.spmm, pallas_tpu.spmm_t, pallas_tpu.sddmm)},
    "block": {"cuda": (pallas_gpu.block_spmm, pallas_gpu.block_spmm_t,
                       pallas_gpu.block_sddmm),
              "tpu": (pallas_tpu.block_spmm, pallas_tpu.block_spmm_t,
                      pallas_tpu.block_sddmm)},
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("fmt, block", [("coo", None), ("block", 16), ("block", 32)])
def test_every_kernel_lowers(fmt, block, platform, dtype):
    """SpMM, SpMMᵀ and SDDMM each lower to exactly one kernel of the platform's backend, at a
    SmolLM2 shape, a token count that is no tile multiple, f32 and bf16 inputs."""
    w = _coo(0.02) if fmt == "coo" else _bsr(0.1, block)
    x = jnp.zeros((300, SMOL_MLP[0]), dtype)
    dy = jnp.zeros((300, SMOL_MLP[1]), dtype)
    spmm, spmm_t, sddmm = KERNELS[fmt][platform]
    target = KERNEL_TARGETS[platform]
    assert _export(lambda x, w: spmm(x, w), platform, x, w) == [target]
    assert _export(lambda dy, w: spmm_t(dy, w), platform, dy, w) == [target]
    assert _export(lambda x, dy, w: sddmm(x, dy, w), platform, x, dy, w) == [target]


def _layer_step(layer_def, params, indices, x):
    """Loss and gradients (values and input) of one compact layer."""
    def loss(params, x):
        return jnp.sum(nnx.merge(layer_def, params, indices)(x) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.parametrize("fmt", ["coo", "block"])
def test_compact_layer_forward_and_backward_lower_per_platform(fmt):
    """One trace of a SmolLM2-shaped compact layer's forward + backward (on the CPU), lowered
    for each platform, carries that platform's path: no kernel on CPU (the XLA products), three
    Triton kernels on cuda (SpMM, SpMMᵀ, SDDMM), three Mosaic kernels on tpu — where the
    :class:`kernels.DensifyRule` keeps the sparse form; a rule that densifies leaves none."""
    w = _coo(0.01) if fmt == "coo" else _bsr(0.1)
    x = jnp.ones((512, SMOL_MLP[0]), jnp.bfloat16)
    for rule, expect in ((kernels.DensifyRule.constant(1.0), 3),
                         (kernels.DensifyRule.constant(0.0), 0)):
        linear = SparseLinear if fmt == "coo" else BlockSparseLinear
        layer = linear(w, compute_dtype="bfloat16", rule=rule)
        layer_def, params, indices = nnx.split(layer, nnx.Param, ...)
        traced = jax.jit(_layer_step, static_argnums=0).trace(layer_def, params, indices, x)
        assert custom_calls(traced.lower(lowering_platforms=("cpu",)).as_text()) == []
        for platform, target in KERNEL_TARGETS.items():
            lowered = traced.lower(lowering_platforms=(platform,)).as_text()
            assert custom_calls(lowered).count(target) == expect, (platform, rule)
    value, _ = jax.jit(_layer_step, static_argnums=0)(layer_def, params, indices, x[:4])
    assert np.isfinite(float(value))  # and the same function runs here, on the CPU


def test_default_rule_picks_the_kernel_per_platform():
    """With the default rule a 1 %-dense COO layer runs Triton on GPU but is densified on TPU
    (whose COO kernel walks entries one scalar at a time); a 90 %-sparse BSR layer runs Triton
    on GPU and is densified on TPU (one grid step per 16 × 16 block), a 99 %-sparse one keeps
    its kernel on both."""
    x = jnp.ones((512, SMOL_MLP[0]))
    for w, expect in ((_coo(0.01), {"cuda": 1, "tpu": 0}), (_bsr(0.1), {"cuda": 1, "tpu": 0}),
                      (_bsr(0.01), {"cuda": 1, "tpu": 1})):
        traced = jax.jit(lambda x, w: kernels.sparse_matmul(x, w)).trace(x, w)
        for platform, target in KERNEL_TARGETS.items():
            text = traced.lower(lowering_platforms=(platform,)).as_text()
            assert custom_calls(text).count(target) == expect[platform], platform


def test_block_sizes_the_kernels_do_not_take_fall_back_to_xla_or_are_refused():
    """8 × 8 tiles: ``"auto"`` lowers the XLA products on GPU and TPU (no kernel); asking for
    the Pallas kernels by name raises an error naming the block-size rule."""
    w = _bsr(0.02, block=8)
    x = jnp.ones((64, SMOL_MLP[0]))
    traced = jax.jit(lambda x, w: kernels.sparse_matmul(x, w)).trace(x, w)
    for platform in KERNEL_TARGETS:
        assert custom_calls(traced.lower(lowering_platforms=(platform,)).as_text()) == []
    for impl, match in (("pallas_gpu", "power of two ≥ 16"), ("pallas_tpu", "multiple of 16")):
        with pytest.raises(ValueError, match=match):
            kernels.sparse_matmul(x, w, impl=impl, interpret=True)
