"""Sparse kernels: COO and block-sparse (BSR) storage of linear kernels and differentiable
SpMM / SDDMM on CPU, GPU and TPU.

``y = sparse_matmul(x, w)`` multiplies ``x [..., n_in]`` by a :class:`SparseMatrix` (COO) or a
:class:`BlockSparseMatrix` (``b × b`` tiles) ``w [n_in, n_out]``; its VJP gives ``dx = dy @ Wᵀ``
and the SDDMM ``∂L/∂values`` without forming the dense ``n_in × n_out`` gradient. The path is
chosen per platform when the function is lowered (:mod:`kernels.ops`): XLA gathers on CPU,
Triton kernels on GPU (:mod:`kernels.pallas_gpu`), Mosaic kernels on TPU
(:mod:`kernels.pallas_tpu`), a dense product above the :class:`DensifyRule` crossover.
N:M storage is left to the layers built on top.
"""

from kernels.block import (
    BlockSparseMatrix,
    block_column_offsets,
    block_from_dense,
    block_row_order,
    block_sparse_matrix,
)
from kernels.ops import (
    BLOCK_CROSSOVER,
    COO_CROSSOVER,
    DEFAULT_RULE,
    Crossover,
    DensifyRule,
    Impl,
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
    "BLOCK_CROSSOVER",
    "COO_CROSSOVER",
    "DEFAULT_RULE",
    "INT16_MAX",
    "BlockSparseMatrix",
    "Crossover",
    "DensifyRule",
    "Impl",
    "SparseMatrix",
    "block_column_offsets",
    "block_from_dense",
    "block_row_order",
    "block_sparse_matrix",
    "column_offsets",
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
