"""One-shot pruning baselines for LLaMA models: magnitude, Wanda and SparseGPT.

Every method prunes the seven linear kernels of every decoder block (``attn/{q,k,v,o}_proj``,
``mlp/{gate,up,down}_proj``; never the embedding, norms or LM head). Kernels are ``[in, out]``, so a
layer computes ``y = x W`` and the PyTorch ``[out, in]`` weight of the papers is ``Wᵀ``: an output
"row" of the papers is a column here, an input "column" a row.

=========  ===========================================  ==========================================
method     score                                        mask selection
=========  ===========================================  ==========================================
magnitude  ``|W_ij|``                                   top-k per tensor
Wanda      ``|W_ij| · ‖X_i‖₂``                          top-k per output (column), no update
SparseGPT  ``W_ij² / [U]_ii²``, ``H⁻¹ = UᵀU``            per ``blocksize`` inputs, with OBS updates
=========  ===========================================  ==========================================

``structure="N:M"`` keeps ``N`` of every ``M`` consecutive inputs of each output for all three
(``M`` must divide every input dimension) and then fixes the sparsity at ``1 − N/M``.

Wanda and SparseGPT use calibration activations captured block by block with
:func:`~admm_jax.pruning.capture.capture_blocks`: each block is pruned from inputs computed by the
already-pruned earlier blocks, all linears of a block from one pass with its original weights.

References:
    Han et al., "Learning both Weights and Connections for Efficient Neural Networks", 2015.
    Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models"
    (Wanda), 2023.
    Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
    2023.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from tqdm.auto import tqdm

from admm_jax.models.llama import LlamaConfig
from admm_jax.ops.projection import keep_count, nm_mask, parse_structure, topk_mask
from admm_jax.pruning.capture import (
    LINEAR_INPUTS,
    CapturedBlock,
    capture_blocks,
    gram_stats,
    resolve_config,
    sqnorm_stats,
)

Array = jax.Array
NM = tuple[int, int] | None

#: Pruning methods of :func:`prune`.
METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")


# ---------------------------------------------------------------------------------------------
# Argument checks (eager, outside jit)
# ---------------------------------------------------------------------------------------------

def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
            or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_structure(structure: Any, d_in: int, what: str = "the kernel") -> NM:
    if not isinstance(structure, str):
        raise ValueError(f"structure must be 'unstructured' or 'N:M', got {structure!r}")
    nm = parse_structure(structure)
    if nm is not None and d_in % nm[1]:
        raise ValueError(f"structure {structure!r}: M = {nm[1]} must divide the input dimension "
                         f"of every pruned kernel, but {what} has {d_in} inputs")
    return nm


def _check_kernel(w: Any) -> Array:
    w = jnp.asarray(w)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"w must be a non-empty 2-D [in, out] kernel, got shape {w.shape}")
    return w


def _check_sparsegpt_args(blocksize: Any, percdamp: Any, nm: NM) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize ({blocksize}) must be a multiple of M = {nm[1]} for "
                         f"{nm[0]}:{nm[1]} sparsity")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or percdamp < 0:
        raise ValueError(f"percdamp must be a non-negative number, got {percdamp!r}")


# ---------------------------------------------------------------------------------------------
# Magnitude
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("k", "nm"))
def _magnitude(w: Array, *, k: int, nm: NM) -> tuple[Array, Array]:
    score = jnp.abs(w)
    keep = topk_mask(score, k) if nm is None else nm_mask(score, *nm)
    return jnp.where(keep, w, 0), keep


def magnitude_prune(w: Array, *, sparsity: float = 0.5,
                    structure: str = "unstructured") -> tuple[Array, Array]:
    """Magnitude pruning (Han et al., 2015): keep the ``keep_count(size, sparsity)`` largest
    ``|W_ij|`` of the tensor, or the ``N`` largest of every ``M`` consecutive inputs.

    Returns:
        ``(pruned kernel, keep mask)`` with ``pruned = where(mask, w, 0)``.
    """
    w = _check_kernel(w)
    sparsity = _check_sparsity(sparsity)
    nm = _check_structure(structure, w.shape[0])
    return _magnitude(w, k=keep_count(w.size, sparsity), nm=nm)


# ---------------------------------------------------------------------------------------------
# Wanda
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("k", "nm"))
def _wanda(w: Array, sqnorm: Array, *, k: int, nm: NM) -> tuple[Array, Array]:
    score = jnp.abs(w).astype(jnp.float32) * jnp.sqrt(sqnorm.astype(jnp.float32))[:, None]
    if nm is None:  # top-k within every output column (ties: lowest row first)
        keep = jax.vmap(topk_mask, in_axes=(1, None), out_axes=1)(score, k)
    else:
        keep = nm_mask(score, *nm)
    return jnp.where(keep, w, 0), keep


def wanda_prune(w: Array, sqnorm: Array, *, sparsity: float = 0.5,
                structure: str = "unstructured") -> tuple[Array, Array]:
    """Wanda (Sun et al., 2023, Eq. 1 and Alg. 1): score ``S_ij = |W_ij| · ‖X_i‖₂`` and keep, for
    every output ``j`` (a column of the ``[in, out]`` kernel), its ``keep_count(in, sparsity)``
    highest-scoring inputs — or the ``N`` highest of every ``M`` consecutive inputs. Weights are
    not updated.

    Args:
        w: kernel ``[in, out]``.
        sqnorm: ``‖X_i‖²₂ = Σ_t x_ti²`` per input ``[in]`` (e.g. from
            :func:`~admm_jax.pruning.capture.sqnorm_stats`, or the diagonal of a Gram matrix).
        sparsity: fraction of zeros per output, in ``[0, 1)`` (ignored for ``N:M``).
        structure: ``"unstructured"`` or ``"N:M"``.

    Returns:
        ``(pruned kernel, keep mask)``.
    """
    w = _check_kernel(w)
    sparsity = _check_sparsity(sparsity)
    nm = _check_structure(structure, w.shape[0])
    sqnorm = jnp.asarray(sqnorm)
    if sqnorm.shape != (w.shape[0],):
        raise ValueError(f"sqnorm must have shape ({w.shape[0]},) = [in], got {sqnorm.shape}")
    return _wanda(w, sqnorm, k=keep_count(w.shape[0], sparsity), nm=nm)


# ---------------------------------------------------------------------------------------------
# SparseGPT
# ---------------------------------------------------------------------------------------------

def _lowest_mask(score: Array, count: Array) -> Array:
    """Bool mask of the ``count`` (traced) smallest entries of ``score`` (ties: lowest flat index
    first)."""
    flat = score.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (rank < count).reshape(score.shape)


def _block_counts(d_in: int, d_out: int, sparsity: float, blocksize: int,
                  n_blocks: int) -> np.ndarray:
    """Entries to prune in each block of ``blocksize`` inputs: ``⌊s·out·r_b⌋ − ⌊s·out·r_{b−1}⌋``
    with ``r_b = min((b + 1)·blocksize, in)``, so the blocks together prune exactly
    ``⌊s·in·out⌋`` entries (the per-tensor count of :func:`~admm_jax.ops.projection.keep_count`)."""
    ends = np.minimum(np.arange(n_blocks + 1) * blocksize, d_in)
    pruned = np.array([int(sparsity * (d_out * int(r))) for r in ends])
    return np.diff(pruned).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("nm", "blocksize"))
def _sparsegpt(w: Array, h: Array, counts: Array, percdamp: Array, *, nm: NM,
               blocksize: int) -> tuple[Array, Array]:
    d_in, d_out = w.shape
    pad = (-d_in) % blocksize
    d = d_in + pad
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)

    # Dead inputs (diag H = 0) never fire: set H_ii = 1 and zero their weights; then dampen.
    dead = jnp.diagonal(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[:, None], 0.0, w)
    h = h + percdamp * jnp.mean(jnp.diagonal(h)) * jnp.eye(d_in, dtype=jnp.float32)

    # Pad to whole blocks with decoupled unit-curvature inputs (zero weight, never selected).
    h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag((jnp.arange(d) >= d_in).astype(jnp.float32))
    w = jnp.pad(w, ((0, pad), (0, 0)))
    valid = jnp.arange(d) < d_in

    # H⁻¹ = UᵀU with U upper triangular: the rows of U are the OBS update directions.
    lower = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(d, dtype=jnp.float32))
    u = jnp.triu(jnp.linalg.cholesky(hinv).T)

    def select_group(i, prune1, w1, d1):
        """N:M at every M-th input: prune the M − N lowest ``w²/[U]_ii²`` of the next M inputs."""
        n, m = nm
        wg = lax.dynamic_slice_in_dim(w1, i, m, 0)
        dg = lax.dynamic_slice_in_dim(d1, i, m, 0)
        return lax.dynamic_update_slice_in_dim(prune1, ~nm_mask(jnp.square(wg / dg[:, None]),
                                                                n, m), i, 0)

    def block(b, carry):
        w, keep = carry
        i1 = b * blocksize
        w1 = lax.dynamic_slice_in_dim(w, i1, blocksize, 0)                    # [B, out]
        u_rows = lax.dynamic_slice_in_dim(u, i1, blocksize, 0)                # [B, d]
        u1 = lax.dynamic_slice_in_dim(u_rows, i1, blocksize, 1)               # [B, B]
        d1 = jnp.diagonal(u1)
        if nm is None:  # adaptive mask selection over the whole block (Alg. 1, line 6)
            score = jnp.square(w1 / d1[:, None])
            score = jnp.where(lax.dynamic_slice_in_dim(valid, i1, blocksize)[:, None], score,
                              jnp.inf)
            prune1 = _lowest_mask(score, counts[b])
        else:
            prune1 = jnp.zeros(w1.shape, bool)

        def column(i, carry):  # Alg. 1, lines 7-11, one input (a row here) at a time
            w1, prune1, err1 = carry
            if nm is not None:
                prune1 = lax.cond(i % nm[1] == 0, select_group, lambda i, p, *_: p,
                                  i, prune1, w1, d1)
            err = jnp.where(prune1[i], w1[i], 0.0) / u1[i, i]                 # (w − q) / [U]_ii
            w1 = w1 - u1[i][:, None] * err[None, :]                           # U_i,i: = 0 left of i
            return w1, prune1, err1.at[i].set(err)

        err1 = jnp.zeros(w1.shape, jnp.float32)
        w1, prune1, err1 = lax.fori_loop(0, blocksize, column, (w1, prune1, err1))
        # Lazy batch update of all later inputs (Alg. 1, line 12); earlier rows of U vanish
        # left of i1, and the block itself is overwritten with its pruned weights.
        w = w - jnp.matmul(u_rows.T, err1, precision=lax.Precision.HIGHEST)
        w = lax.dynamic_update_slice_in_dim(w, jnp.where(prune1, 0.0, w1), i1, 0)
        keep = lax.dynamic_update_slice_in_dim(keep, ~prune1, i1, 0)
        return w, keep

    keep = jnp.ones((d, d_out), bool)
    w, keep = lax.fori_loop(0, d // blocksize, block, (w, keep))
    return w[:d_in], keep[:d_in]


def sparsegpt_prune(w: Array, gram: Array, *, sparsity: float = 0.5,
                    structure: str = "unstructured", blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[Array, Array]:
    """SparseGPT (Frantar & Alistarh, 2023, Alg. 1): prune and reconstruct a kernel by optimal
    brain surgeon updates that minimise ``‖XW − XŴ‖²_F`` with ``H = XᵀX``.

    With ``H ← H + λI``, ``λ = percdamp · mean(diag H)`` (dead inputs with ``H_ii = 0`` get
    ``H_ii = 1`` and zero weight first) and ``H⁻¹ = UᵀU`` (``U`` upper Cholesky), the inputs are
    swept in blocks of ``blocksize``:

    * line 6: unstructured — in each block, prune the entries with the smallest
      ``W_ij² / U_ii²``; the per-block counts add up to exactly ``⌊sparsity·in·out⌋``;
      N:M — at every ``M``-th input, prune the ``M − N`` smallest of the next ``M`` per output;
    * lines 7–11: for input ``i`` of the block, ``E_i = (W_i − Q_i) / U_ii`` with ``Q_i`` its pruned
      row, and ``W_{i:} ← W_{i:} − U_{i,i:}ᵀ E_i`` inside the block;
    * line 12: lazy batch update of the later inputs ``W_{i₂:} ← W_{i₂:} − U_{i₁:i₂, i₂:}ᵀ E``.

    Args:
        w: kernel ``[in, out]``.
        gram: ``H = Σ_t x_t x_tᵀ`` ``[in, in]`` (any positive scale; see
            :func:`~admm_jax.pruning.capture.gram_stats`).
        sparsity: fraction of zeros of the tensor, in ``[0, 1)`` (ignored for ``N:M``).
        structure: ``"unstructured"`` or ``"N:M"`` (``blocksize`` must be a multiple of ``M``).
        blocksize: inputs per lazy-update block (128 in the paper).
        percdamp: dampening relative to the mean diagonal of ``H`` (0.01 in the paper).

    Returns:
        ``(pruned kernel, keep mask)``; the pruned kernel is zero wherever the mask is False.

    Raises:
        ValueError: bad arguments, or a dampened ``H`` that is not numerically positive definite
            (increase ``percdamp``).
    """
    w = _check_kernel(w)
    sparsity = _check_sparsity(sparsity)
    nm = _check_structure(structure, w.shape[0])
    _check_sparsegpt_args(blocksize, percdamp, nm)
    gram = jnp.asarray(gram)
    d_in, d_out = w.shape
    if gram.shape != (d_in, d_in):
        raise ValueError(f"gram must have shape ({d_in}, {d_in}) = [in, in], got {gram.shape}")
    n_blocks = -(-d_in // blocksize)
    counts = _block_counts(d_in, d_out, sparsity, blocksize, n_blocks)
    pruned, keep = _sparsegpt(w, gram, jnp.asarray(counts), jnp.float32(percdamp), nm=nm,
                              blocksize=blocksize)
    if not bool(jnp.all(jnp.isfinite(pruned))):
        raise ValueError("SparseGPT produced non-finite weights: the dampened Hessian is not "
                         f"positive definite; increase percdamp (got {percdamp})")
    return pruned.astype(w.dtype), keep


# ---------------------------------------------------------------------------------------------
# Whole-model API
# ---------------------------------------------------------------------------------------------

def _input_dims(config: LlamaConfig) -> dict[str, int]:
    d_attn = config.n_heads * config.resolved_head_dim
    return {"attn_in": config.dim, "attn_ctx": d_attn, "mlp_in": config.dim,
            "mlp_hidden": config.mlp_dim}


def prune(model: LlamaConfig | nnx.GraphDef, params: dict, calibration: Any = None, *,
          method: str = "magnitude", sparsity: float = 0.5, structure: str = "unstructured",
          blocksize: int = 128, percdamp: float = 0.01, batch_size: int = 8,
          verbose: bool = True) -> tuple[dict, dict[str, Array]]:
    """One-shot pruning of every decoder-block linear of a LLaMA model.

    Args:
        model: the model's :class:`LlamaConfig` or graphdef.
        params: parameter pytree of ``init_params(config)``'s structure (e.g. ``load_smollm2()``).
        calibration: calibration token ids ``int[n, T]`` (e.g. from
            :func:`admm_jax.data.calibration_samples`); required by ``"wanda"`` and
            ``"sparsegpt"``, ignored by ``"magnitude"``.
        method: ``"magnitude"`` (:func:`magnitude_prune`, per tensor), ``"wanda"``
            (:func:`wanda_prune`, per output) or ``"sparsegpt"`` (:func:`sparsegpt_prune`, per
            tensor, with weight reconstruction).
        sparsity: fraction of zeros in ``[0, 1)`` (ignored for ``N:M``).
        structure: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``, ``"4:8"``) along the input
            dimension.
        blocksize, percdamp: SparseGPT's block size and relative dampening.
        batch_size: calibration samples per forward pass.
        verbose: progress bar on stderr.

    Returns:
        ``(pruned_params, masks)``: ``masks["layers/{i}/{attn|mlp}/{name}/kernel"]`` is the bool
        keep mask ``[in, out]`` of every pruned kernel, and ``pruned_params`` is zero wherever a
        mask is False.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    config = resolve_config(model, params)
    sparsity = _check_sparsity(sparsity)
    dims = _input_dims(config)
    nm = None
    for linear, site in LINEAR_INPUTS.items():
        nm = _check_structure(structure, dims[site], f"{linear} ({site})")
    if method == "sparsegpt":
        _check_sparsegpt_args(blocksize, percdamp, nm)
    elif method == "magnitude":
        calibration = None
    elif calibration is None:
        raise ValueError(f"method={method!r} needs calibration tokens [n, seq_len]")

    kernel_fn = {
        "magnitude": lambda w, _: magnitude_prune(w, sparsity=sparsity, structure=structure),
        "wanda": lambda w, s: wanda_prune(w, s, sparsity=sparsity, structure=structure),
        "sparsegpt": lambda w, s: sparsegpt_prune(w, s, sparsity=sparsity, structure=structure,
                                                  blocksize=blocksize, percdamp=percdamp),
    }[method]
    masks: dict[str, Array] = {}

    def prune_block(index: int, block_params: dict, stats: dict[str, Array] | None) -> dict:
        new = {group: dict(sub) for group, sub in block_params.items()}
        for linear, site in LINEAR_INPUTS.items():
            group, name = linear.split("/")
            stat = None if stats is None else stats[site]
            kernel, masks[f"layers/{index}/{linear}/kernel"] = kernel_fn(
                block_params[group][name]["kernel"], stat)
            new[group][name] = {**block_params[group][name], "kernel": kernel}
        return new

    if method == "magnitude":
        layers = {i: prune_block(i, params["layers"][i], None)
                  for i in tqdm(range(config.n_layers), desc="magnitude", unit="block",
                                file=sys.stderr, disable=not verbose, leave=False)}
        return {**params, "layers": layers}, masks

    def callback(block: CapturedBlock) -> dict:
        return prune_block(block.index, block.params, block.stats)

    stats = gram_stats if method == "sparsegpt" else sqnorm_stats
    pruned, _ = capture_blocks(config, params, calibration, callback, stats=stats,
                               batch_size=batch_size, verbose=verbose)
    return pruned, masks
