"""Sparse kernels: a sparse storage format for linear kernels and differentiable SpMM / SDDMM.

``y = sparse_matmul(x, w)`` multiplies ``x [..., n_in]`` by a :class:`SparseMatrix`
``w [n_in, n_out]`` with a Pallas kernel on GPU and an XLA formulation on CPU; its VJP gives
``dx = dy @ Wᵀ`` and the SDDMM ``∂L/∂values`` without forming the dense ``n_in × n_out`` gradient.
N:M storage is left to the layers built on top (an N:M matrix is a :class:`SparseMatrix`
with a fixed number of entries per group).
"""

from kernels.ops import (
    CPU_DENSIFY_ABOVE,
    Impl,
    densify_above,
    densify_rule,
    resolve_impl,
    sddmm,
    sparse_matmul,
    spmm,
)
from kernels.sparse import (
    INT16_MAX,
    SparseMatrix,
    column_offsets,
    from_dense,
    index_dtype_for,
    row_order,
    sparse_matrix,
    to_dense,
)

__all__ = [
    "CPU_DENSIFY_ABOVE",
    "INT16_MAX",
    "Impl",
    "SparseMatrix",
    "column_offsets",
    "densify_above",
    "densify_rule",
    "from_dense",
    "index_dtype_for",
    "resolve_impl",
    "row_order",
    "sddmm",
    "sparse_matmul",
    "sparse_matrix",
    "spmm",
    "to_dense",
]
