"""RA-SpaRC: compressors (SVD_r, Top_k and the sparse-plus-low-rank SpaRC, Alg. 1–2, batched over
layers), the compressor quality metric M(C) (eq. 9), kernel gradients and the adapter
initialisations built from them (LoRA, LoRA-One, RoSA, RA-SpaRC §3.5).

    compressors.py  svd_compress, topk_compress, sparc_compress(_stack/_dict), budgets
    metrics.py      compressor(kind), compressor_quality -> M(C), relative errors
    gradients.py    kernel_gradients, gradient_statistics (mean, mean square, samples)
    initialise.py   adapter_inits(method, gradient, rank=, alpha=, gamma=) -> {path: AdapterInit}
"""

from admm_jax.sparc.compressors import (
    LowRankFactors,
    SparcResult,
    SparseEntries,
    bisection_curve,
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
from admm_jax.sparc.gradients import GradientStats, gradient_statistics, kernel_gradients
from admm_jax.sparc.initialise import (
    METHODS,
    Method,
    adapter_inits,
    init_from_parts,
    lora_one_init,
    ra_sparc_init,
    rosa_init,
    rosa_split,
)
from admm_jax.sparc.metrics import CompressorQuality, compressor, compressor_quality

__all__ = [
    "METHODS",
    "CompressorQuality",
    "GradientStats",
    "LowRankFactors",
    "Method",
    "SparcResult",
    "SparseEntries",
    "adapter_inits",
    "bisection_curve",
    "check_budget",
    "compressor",
    "compressor_quality",
    "exact_parts",
    "gradient_statistics",
    "init_from_parts",
    "is_unimodal",
    "kernel_gradients",
    "lora_one_init",
    "low_rank_dense",
    "ra_sparc_init",
    "reconstruct",
    "rosa_init",
    "rosa_split",
    "sparc_budget",
    "sparc_compress",
    "sparc_compress_dict",
    "sparc_compress_stack",
    "sparse_dense",
    "svd_compress",
    "topk_compress",
]
