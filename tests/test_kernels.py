"""Sparse kernels: storage format, SpMM forward, and both gradients of every implementation
against the dense reference ``jax.grad`` of ``x @ to_dense(W)``."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import pallas_gpu as kpallas
from kernels import reference as kreference
from kernels import xla as kxla
from kernels.sparse import SparseMatrix, from_dense, sparse_matrix, to_dense

N_IN, N_OUT = 37, 70  # not multiples of any tile size


def _planted(n_in=N_IN, n_out=N_OUT, density=0.2, seed=0):
    """A random sparse matrix with an empty row (2) and an empty column (3)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    w *= rng.random((n_in, n_out)) < density
    w[2, :] = 0.0
    w[:, 3] = 0.0
    return w


def _dense_grads(x, w_dense, m, dy):
    """Reference ``(y, dx, dvalues)`` for the loss ``⟨y, dy⟩`` through the dense product."""
    def loss(x, values):
        y = x.astype(jnp.float32) @ to_dense(m.with_values(values))
        return jnp.sum(y * dy), y

    (_, y), (dx, dv) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, m.values)
    return y, dx, dv


def _kernel_grads(x, m, dy, impl):
    def loss(x, values):
        y = kernels.sparse_matmul(x, m.with_values(values), impl=impl, interpret=True)
        return jnp.sum(y * dy), y

    (_, y), (dx, dv) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, m.values)
    return y, dx, dv


CASES = {
    "batch1-f32": dict(batch=(5,), dtype=jnp.float32, density=0.2, tol=1e-5),
    "batch2-f32": dict(batch=(2, 3), dtype=jnp.float32, density=0.2, tol=1e-5),
    "bf16": dict(batch=(4,), dtype=jnp.bfloat16, density=0.2, tol=2e-2),
    "nnz0": dict(batch=(3,), dtype=jnp.float32, density=0.0, tol=1e-6),
    "many-tiles": dict(batch=(70,), dtype=jnp.float32, density=0.9, tol=1e-4),
}


IMPLS = ["reference", "xla", "pallas_gpu", "pallas_tpu", "densify"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_dense(impl, case):
    c = CASES[case]
    w = _planted(density=c["density"])
    m = from_dense(w)
    assert m.nnz == int((w != 0).sum())
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((*c["batch"], N_IN)), c["dtype"])
    dy = jnp.asarray(rng.standard_normal((*c["batch"], N_OUT)), jnp.float32)
    y_ref, dx_ref, dv_ref = _dense_grads(x, w, m, dy)
    y, dx, dv = _kernel_grads(x, m, dy, impl)
    assert y.shape == (*c["batch"], N_OUT) and y.dtype == jnp.float32
    assert dx.dtype == x.dtype and dv.shape == (m.nnz,)
    tol = c["tol"]
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(dv, dv_ref, rtol=tol, atol=tol * 10)
    assert np.all(np.asarray(y)[..., 3] == 0) and np.all(np.asarray(dx, np.float32)[..., 2] == 0)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
def test_sddmm_and_transpose_match_reference(impl):
    """Direct products, with more entries per column tile than one Pallas chunk holds."""
    w = _planted(n_in=300, n_out=40, density=0.6)
    m = from_dense(w)
    assert np.diff(np.asarray(kernels.column_offsets(m, kpallas.BC))).max() > kpallas.BNZ
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 300)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((3, 40)), jnp.float32)
    s = kernels.sddmm(x, dy, m, impl=impl, interpret=True)
    np.testing.assert_allclose(s, (x.T @ dy)[np.asarray(m.rows), np.asarray(m.cols)],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(kernels.spmm(x, m, impl=impl, interpret=True), x @ w,
                               rtol=1e-4, atol=1e-4)


def _shapes_in(jaxpr, primitive=None):
    """Every array shape produced anywhere in ``jaxpr`` (by ``primitive`` only, if named),
    nested jaxprs (scan, pallas) included."""
    shapes = set()
    for eqn in jaxpr.eqns:
        if primitive is None or eqn.primitive.name == primitive:
            shapes.update(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    shapes |= _shapes_in(inner, primitive)
    return shapes


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_never_builds_the_dense_gradient(impl):
    m = from_dense(_planted())
    x = jnp.ones((5, N_IN))

    def loss(values):
        return jnp.sum(kernels.sparse_matmul(x, m.with_values(values), impl=impl,
                                             interpret=True) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(m.values).jaxpr
    # the dense gradient xᵀ dy is a matmul with an n_in × n_out result: only the reference has one
    assert ((N_IN, N_OUT) in _shapes_in(jaxpr, "dot_general")) == (impl == "reference")
    # densify builds the dense W itself (a scatter); xla and pallas never hold n_in × n_out
    assert ((N_IN, N_OUT) in _shapes_in(jaxpr)) == (impl in ("reference", "densify"))


def test_auto_densifies_on_cpu_above_the_measured_crossover():
    assert jax.default_backend() == "cpu"
    rule = kernels.DEFAULT_RULE
    table = rule.coo.cpu
    for t, d in table:
        assert rule.densify_above("coo", "cpu", t) == d
    (t0, d0), (t1, d1) = next((a, b) for a, b in itertools.pairwise(table) if a[1] != b[1])
    between = rule.densify_above("coo", "cpu", round(np.sqrt(t0 * t1)))  # log-midpoint
    assert min(d0, d1) < between < max(d0, d1)
    d0, (t_end, d_end) = table[0][1], table[-1]
    assert rule.densify_above("coo", "cpu", 10 * t_end) == d_end
    assert rule.densify_above("coo", "cpu", 0) == d0
    for tokens in (1, 16, 512):
        d = rule.densify_above("coo", "cpu", tokens)
        assert kernels.resolve_impl("auto", density=1.01 * d, tokens=tokens) == "densify"
        assert kernels.resolve_impl("auto", density=0.99 * d, tokens=tokens) == "xla"
    assert kernels.resolve_impl("auto", density=0.9) == "xla"  # no token count: no rule
    assert kernels.resolve_impl("xla", density=0.9, tokens=512) == "xla"  # explicit impl wins
    always, never = kernels.DensifyRule.constant(0.0), kernels.DensifyRule.constant(1.0)
    for platform in ("cpu", "gpu", "tpu"):
        assert kernels.resolve_impl(density=1e-4, tokens=1, platform=platform,
                                    rule=always) == "densify"
        assert kernels.resolve_impl(density=0.99, tokens=512, platform=platform, fmt="block",
                                    rule=never) != "densify"
    assert kernels.resolve_impl(platform="gpu") == "pallas_gpu"
    assert kernels.resolve_impl(platform="tpu") == "pallas_tpu"
    assert kernels.resolve_impl("pallas", platform="cpu") == "pallas_gpu"  # interpreted
    with pytest.raises(ValueError, match="density must lie in"):
        kernels.DensifyRule.constant(1.5)
    bad = kernels.DensifyRule(coo=kernels.Crossover(cpu=((0, 0.5),), gpu=(), tpu=()))
    with pytest.raises(ValueError, match="crossover table needs"):
        bad.densify_above("coo", "cpu", 4)
    with pytest.raises(TypeError, match="rule must be a DensifyRule"):
        kernels.sparse_matmul(jnp.ones((1, 37)), from_dense(_planted()), rule=((1, 0.5),))
    # sparse_matmul dispatches on W's density and x's rows: both regimes give x @ W
    rng = np.random.default_rng(7)
    for density, batch in ((0.9, (4, 128)), (0.01, (1,))):
        w = (rng.standard_normal((64, 96)) * (rng.random((64, 96)) < density)).astype(np.float32)
        m, x = from_dense(w), rng.standard_normal((*batch, 64)).astype(np.float32)
        impl = kernels.resolve_impl(density=m.density, tokens=int(np.prod(batch)))
        assert impl == ("densify" if density == 0.9 else "xla")
        np.testing.assert_allclose(kernels.sparse_matmul(x, m), x @ w, rtol=1e-4, atol=1e-4)
        for rule in (always, never):  # either form, forced by an explicit rule
            np.testing.assert_allclose(kernels.sparse_matmul(x, m, rule=rule), x @ w,
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt, name", [("coo", "bench_sparse_crossover.json"),
                                       ("block", "bench_sparse_crossover_block16.json")])
def test_densify_above_matches_the_committed_benchmark(fmt, name):
    """The CPU dispatch constants are the crossovers the committed benchmarks measured."""
    import json
    from pathlib import Path
    bench = json.loads((Path(__file__).parents[1] / "results" / name).read_text())
    assert bench.get("crossover_structure", "unstructured") == (
        "block16" if fmt == "block" else "unstructured")
    measured = {int(t): round(d, 3) for t, d in bench["densify_above"].items()}
    assert measured == dict(getattr(kernels.DEFAULT_RULE, fmt).cpu)


def test_jit_does_not_retrace_for_new_values():
    m = from_dense(_planted())
    traces = []

    @jax.jit
    def f(x, w):
        traces.append(1)
        return kernels.sparse_matmul(x, w, impl="xla")

    x = jnp.ones((4, N_IN))
    y1 = f(x, m)
    y2 = f(2 * x, m.with_values(3 * m.values))
    assert len(traces) == 1
    np.testing.assert_allclose(y2, 6 * y1, rtol=1e-5)


def test_format_roundtrip_order_and_index_dtypes():
    w = _planted()
    m = from_dense(w)
    np.testing.assert_array_equal(to_dense(m), w)
    key = np.asarray(m.cols, np.int64) * N_IN + np.asarray(m.rows)
    assert np.all(np.diff(key) > 0)  # strictly column-major
    assert m.rows.dtype == jnp.int16 and m.cols.dtype == jnp.int16
    wide = sparse_matrix(jnp.ones(2), jnp.array([1, 0]), jnp.array([40_000, 5]), (2, 40_001))
    assert wide.rows.dtype == jnp.int16 and wide.cols.dtype == jnp.int32
    np.testing.assert_array_equal(wide.cols, [5, 40_000])
    np.testing.assert_array_equal(wide.rows, [0, 1])
    assert isinstance(jax.tree.map(lambda a: a, m), SparseMatrix)
    mask = np.zeros_like(w, bool)
    mask[0, 0] = True
    assert from_dense(w, mask).nnz == 1 and kernels.resolve_impl() == "xla"


@pytest.mark.parametrize("args, match", [
    ((jnp.ones(2), jnp.array([0, 5]), jnp.array([0, 1]), (5, 3)), r"rows\[1\] = 5 is out of"),
    ((jnp.ones(2), jnp.array([0, 1]), jnp.array([0, -1]), (5, 3)), r"cols\[0\] = -1 is out"),
    ((jnp.ones(2), jnp.array([1, 1]), jnp.array([2, 2]), (5, 3)), r"duplicated entry .* \(1, 2\)"),
    ((jnp.ones(3), jnp.array([1, 1]), jnp.array([2, 2]), (5, 3)), "equal length"),
])
def test_bad_indices_raise(args, match):
    with pytest.raises(ValueError, match=match):
        sparse_matrix(*args)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="int16 indices cannot address a dimension of size"):
        sparse_matrix(jnp.ones(1), jnp.array([0]), jnp.array([0]), (40_000, 3),
                      index_dtype="int16")
    with pytest.raises(ValueError, match="mask shape"):
        from_dense(np.ones((3, 4)), np.ones((4, 3)))
    m = from_dense(_planted())
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 37\]"):
        kernels.sparse_matmul(jnp.ones((2, 36)), m)
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.sparse_matmul(jnp.ones((2, 37)), m, impl="cuda")
    with pytest.raises(ValueError, match="values must have shape"):
        m.with_values(jnp.ones(3))
    with pytest.raises(ValueError, match=r"budget must be an integer in \[1, inf\]"):
        kxla.sddmm(jnp.ones((2, 37)), jnp.ones((2, 70)), m, budget=0)


@pytest.mark.parametrize("budget", [1, 600, 4096, 1 << 30])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_sddmm_tiles_match_reference_at_any_budget(budget, dtype):
    """Token tiles and entry chunks that divide neither T = 11 nor nnz (clamped, overlapping
    last blocks) give the reference values; ``budget = 1`` means 1 token × 1 entry blocks."""
    m = from_dense(_planted(density=0.3))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((11, N_IN)), dtype)
    dy = jnp.asarray(rng.standard_normal((11, N_OUT)), jnp.float32)
    tt, chunk = kxla._budget_tiles(budget, 4, 11, N_IN, N_OUT, m.nnz)
    if budget == 4096:
        assert 11 % tt and m.nnz % chunk  # both last blocks overlap their predecessors
    if budget == 1 << 30:
        assert (tt, chunk) == (11, m.nnz)  # one block: the untiled formulation
    np.testing.assert_allclose(kxla.sddmm(x, dy, m, budget=budget),
                               kreference.sddmm(x, dy, m), rtol=1e-5, atol=1e-5)


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("budget", [64 * 1024, kxla.TEMP_BUDGET])
def test_xla_sddmm_temporaries_stay_within_budget(budget):
    """At a SmolLM2 MLP shape (576 × 1536, 512 tokens, 1 %) the compiled SDDMM's temporaries
    are the budget's tiles (plus its length-``chunk`` index vectors) and, at the default budget,
    under a tenth of the dense gradient ``xᵀ dy`` the dense-then-gather path materialises."""
    shape, t = (576, 1536), 512
    rng = np.random.default_rng(4)
    m = from_dense(rng.standard_normal(shape).astype(np.float32), rng.random(shape) < 0.01)
    x = jnp.asarray(rng.standard_normal((t, shape[0])), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((t, shape[1])), jnp.float32)
    temp = _temp_bytes(lambda x, dy, w: kxla.sddmm(x, dy, w, budget=budget), x, dy, m)
    _, chunk = kxla._budget_tiles(budget, 4, t, *shape, m.nnz)
    assert temp <= budget + 4 * 4 * chunk
    dense = _temp_bytes(kreference.sddmm, x, dy, m)
    assert dense >= shape[0] * shape[1] * 4  # the dense gradient is a temporary there
    if budget == kxla.TEMP_BUDGET:
        assert temp <= 0.1 * dense
    np.testing.assert_allclose(kxla.sddmm(x, dy, m, budget=budget), kreference.sddmm(x, dy, m),
                               rtol=1e-4, atol=1e-4)


def _planted_blocks(b: int, n_in=N_IN, n_out=N_OUT, density=0.5, seed=0):
    """A dense ``[n_in, n_out]`` matrix whose nonzeros fill random whole ``b × b`` tiles of the
    zero-padded grid, with tile row 1 and tile column 0 empty (shapes are not multiples of b)."""
    rng = np.random.default_rng(seed)
    grid = (-(-n_in // b), -(-n_out // b))
    keep = rng.random(grid) < density
    keep[min(1, grid[0] - 1), :] = False
    keep[:, 0] = False
    mask = np.kron(keep, np.ones((b, b), bool))[:n_in, :n_out]
    return np.where(mask, rng.standard_normal((n_in, n_out)), 0).astype(np.float32), mask


BLOCK_CASES = {
    "b16-f32": dict(b=16, dtype=jnp.float32, density=0.5, tokens=(5,), tol=1e-5),
    "b32-f32": dict(b=32, dtype=jnp.float32, density=0.7, tokens=(2, 35), tol=1e-5),
    "b16-bf16": dict(b=16, dtype=jnp.bfloat16, density=0.5, tokens=(4,), tol=2e-2),
    "no-blocks": dict(b=16, dtype=jnp.float32, density=0.0, tokens=(3,), tol=1e-6),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_sparse_forward_and_gradients_match_dense(impl, case):
    """BSR through every implementation (Pallas GPU and TPU in interpret mode): ``y``, ``∂x``
    and the tile gradients equal the dense reference's, on shapes no tile divides, with an empty
    tile row and column, more token tiles than one (35 > 16 tokens) and no stored tile at all."""
    c = BLOCK_CASES[case]
    w, mask = _planted_blocks(c["b"], density=c["density"])
    m = kernels.block_from_dense(w, mask, block_size=c["b"])
    assert (m.n_blocks == 0) == (c["density"] == 0) and m.block_size == c["b"]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((*c["tokens"], N_IN)), c["dtype"])
    dy = jnp.asarray(rng.standard_normal((*c["tokens"], N_OUT)), jnp.float32)

    def loss(x, values, product):
        y = product(x, m.with_values(values))
        return jnp.sum(y * dy), y

    dense = lambda x, w: x.astype(jnp.float32) @ w.to_dense()
    sparse = lambda x, w: kernels.sparse_matmul(x, w, impl=impl, interpret=True)
    (_, y_ref), (dx_ref, dv_ref) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        x, m.values, dense)
    (_, y), (dx, dv) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, m.values, sparse)
    tol = c["tol"]
    assert y.dtype == jnp.float32 and dx.dtype == x.dtype and dv.shape == m.values.shape
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(dv, dv_ref, rtol=tol, atol=10 * tol)
    assert np.all(np.asarray(y)[..., :c["b"]] == 0)  # the empty tile column


def _readme_block(marker: str) -> str:
    """The README's Python code block that contains ``marker``."""
    from pathlib import Path
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (block,) = [b for b in blocks if marker in b]
    return block


def test_readme_block_sparse_snippet_runs_as_written():
    scope = {}
    exec(_readme_block("kernels.block_from_dense"), scope)
    w_bsr, x = scope["w_bsr"], scope["x"]
    dense = w_bsr.to_dense()
    assert w_bsr.block_size == 16 and 0 < w_bsr.density < 0.2
    np.testing.assert_allclose(scope["y"], x @ dense, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scope["y_sparse"], scope["y"], rtol=1e-5, atol=1e-4)
    assert scope["grad"].shape == w_bsr.values.shape


@pytest.mark.parametrize("budget", [1, 4 * (N_IN + 2 * N_OUT + kxla.CHUNK) * 4, 1 << 30])
def test_xla_spmm_token_tiles_match_reference_at_any_budget(budget):
    """The SpMMs' token tiles: 1 token per tile, 4 (not dividing T = 11: the last tile is clamped
    and overlaps its predecessor) and the whole input as one tile give the reference products."""
    m = from_dense(_planted(density=0.3))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((11, N_IN)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((11, N_OUT)), jnp.float32)
    tt = kxla._spmm_token_tile(budget, 4, 11, N_IN, N_OUT)
    assert tt == {1: 1, 1 << 30: 11}.get(budget, 4)
    np.testing.assert_allclose(kxla.spmm(x, m, budget=budget), kreference.spmm(x, m),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kxla.spmm_t(dy, m, budget=budget), kreference.spmm_t(dy, m),
                               rtol=1e-5, atol=1e-5)
