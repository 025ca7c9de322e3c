"""RA-SpaRC compressors: SVD_r, Top_k and the sparse-plus-low-rank SpaRC (Alg. 1–2), batched over
layers, and the compressor quality metric M(C) (eq. 9)."""

from admm_jax.sparc.compressors import (
    LowRankFactors,
    SparcResult,
    SparseEntries,
    check_budget,
    exact_parts,
    is_unimodal,
    low_rank_dense,
    reconstruct,
    sparc_budget,
    sparc_compress,
    sparc_compress_dict,
    sparc_compress_stack,
    sparse_dense,
    svd_compress,
    topk_compress,
)
from admm_jax.sparc.metrics import CompressorQuality, compressor, compressor_quality

__all__ = [
    "CompressorQuality",
    "LowRankFactors",
    "SparcResult",
    "SparseEntries",
    "check_budget",
    "compressor",
    "compressor_quality",
    "exact_parts",
    "is_unimodal",
    "low_rank_dense",
    "reconstruct",
    "sparc_budget",
    "sparc_compress",
    "sparc_compress_dict",
    "sparc_compress_stack",
    "sparse_dense",
    "svd_compress",
    "topk_compress",
]
