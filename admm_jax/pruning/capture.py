"""Layer-by-layer activation capture for one-shot compression of LLaMA models.

One-shot pruners (SparseGPT, Wanda) and structured compressors (SPAP) solve one small problem per
decoder block from the inputs its linear layers see on a calibration set. :func:`capture_blocks`
walks the blocks in order and, for block ``i``:

1. runs the block with its *current* parameters over the calibration samples, in mini-batches,
   and sums a statistic of its activations (by default the Gram matrix ``H = Σ_t x_t x_tᵀ`` of
   the input of every linear, fp32);
2. hands the block (parameters, statistics, residual inputs, on-demand activations) to a user
   callback that returns the block's new parameters (e.g. pruned);
3. recomputes the block's output with the new parameters: the input of block ``i + 1``.

Later blocks therefore see the already-compressed earlier blocks, while all linears inside one
block are compressed from inputs captured in a single pass with the block's original weights: the
sequential protocol of SparseGPT (Frantar & Alistarh, 2023, Sec. 3) and Wanda (Sun et al., 2023,
Sec. 3). Only the residual stream ``[n, T, dim]`` of the current block and the summed statistics are
kept, never the ``[n·T, in]`` inputs of every linear of the model.

The activations are not recomputed here: each block runs its *own* forward with the model's input
hooks on (:func:`admm_jax.models.llama.sown_inputs`), so a linear built by a custom factory (an
adapter, a compact sparse layer) is seen exactly as the model applies it. The inputs of the
linears of a block are named by *site* (see :class:`BlockActivations`)::

    attn_in    = attn_norm(x)                  -> attn/q_proj, attn/k_proj, attn/v_proj
    attn_ctx   = softmax attention, pre o_proj -> attn/o_proj
    mid        = x + o_proj(attn_ctx)
    mlp_in     = mlp_norm(mid)                 -> mlp/gate_proj, mlp/up_proj
    mlp_hidden = silu(gate(mlp_in)) · up(mlp_in) -> mlp/down_proj
    out        = mid + down_proj(mlp_hidden)

A statistic is any function ``BlockActivations -> pytree`` whose value over the calibration set is
the *sum* of its values over mini-batches (Gram matrices, squared norms, cross-covariances,
counts); it runs inside one compiled function per block shape, reused by every block.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from tqdm.auto import tqdm

from admm_jax._checks import check_int
from admm_jax.models.llama import (
    DecoderBlock,
    LinearFactory,
    Llama,
    LlamaConfig,
    abstract_params,
    dense_linear,
    rope_tables,
    sown_inputs,
)

Array = jax.Array
Statistic = Callable[["BlockActivations"], Any]

#: Activation sites that feed a linear layer, in block order.
INPUT_SITES: tuple[str, ...] = ("attn_in", "attn_ctx", "mlp_in", "mlp_hidden")

#: The input site of every linear of a decoder block, keyed by its path inside the block.
LINEAR_INPUTS: dict[str, str] = {
    "attn/q_proj": "attn_in",
    "attn/k_proj": "attn_in",
    "attn/v_proj": "attn_in",
    "attn/o_proj": "attn_ctx",
    "mlp/gate_proj": "mlp_in",
    "mlp/up_proj": "mlp_in",
    "mlp/down_proj": "mlp_hidden",
}

#: The sown input that defines each site: that of the first linear reading it.
_SITE_SOURCES: dict[str, str] = {
    site: next(f"{linear}/inputs" for linear, s in LINEAR_INPUTS.items() if s == site)
    for site in INPUT_SITES}


class BlockActivations(NamedTuple):
    """Every intermediate of one decoder block on a batch ``[B, T]`` (see the module docstring).

    Attributes:
        x: block input (residual stream) ``[B, T, dim]``.
        attn_in: attention-norm output, input of q/k/v ``[B, T, dim]``.
        attn_ctx: attention output before ``o_proj`` ``[B, T, n_heads·head_dim]``.
        mid: residual stream after attention ``[B, T, dim]``.
        mlp_in: MLP-norm output, input of gate/up ``[B, T, dim]``.
        mlp_hidden: ``silu(gate)·up``, input of ``down_proj`` ``[B, T, mlp_dim]``.
        out: block output ``[B, T, dim]`` (the MLP output is ``out − mid``).
    """

    x: Array
    attn_in: Array
    attn_ctx: Array
    mid: Array
    mlp_in: Array
    mlp_hidden: Array
    out: Array


def block_activations(block: DecoderBlock, x: Array, cos: Array, sin: Array) -> BlockActivations:
    """Runs ``block``'s own forward on ``x: [B, T, dim]`` with its input hooks on and returns all
    of its intermediates (``out`` is ``block(x, cos, sin)``; every site is what the block's linears
    actually received)."""
    out, sown = sown_inputs(block, x, cos, sin)
    sites = {site: sown[source] for site, source in _SITE_SOURCES.items()}
    return BlockActivations(x=x, mid=sown["mid"], out=out, **sites)


def site_widths(config: LlamaConfig, layer: int) -> dict[str, int]:
    """The width of every site of :data:`INPUT_SITES` in decoder block ``layer``."""
    shape = config.block(layer)
    return {"attn_in": config.dim, "attn_ctx": shape.n_heads * shape.head_dim,
            "mlp_in": config.dim, "mlp_hidden": shape.mlp_dim}


def _rows(a: Array) -> Array:
    """``[..., d] -> f32[N, d]``: one row per token."""
    return a.reshape(-1, a.shape[-1]).astype(jnp.float32)


def gram_stats(acts: BlockActivations) -> dict[str, Array]:
    """``{site: H = Σ_t x_t x_tᵀ}`` (fp32 ``[in, in]``) for every site in :data:`INPUT_SITES`.

    ``H = XᵀX`` is, up to the factor 2, the Hessian of the layer-wise reconstruction loss
    ``‖XW − XŴ‖²_F`` minimised by SparseGPT (Frantar & Alistarh, 2023, Eq. 1–2).
    """
    def gram(a):
        x = _rows(a)
        return jnp.matmul(x.T, x, precision=lax.Precision.HIGHEST)

    return {site: gram(getattr(acts, site)) for site in INPUT_SITES}


def sqnorm_stats(acts: BlockActivations) -> dict[str, Array]:
    """``{site: ‖X_j‖²₂ = Σ_t x_tj²}`` (fp32 ``[in]``): the input norms of Wanda's score, the
    diagonal of :func:`gram_stats` at a fraction of its cost."""
    return {site: jnp.sum(jnp.square(_rows(getattr(acts, site))), axis=0)
            for site in INPUT_SITES}


# ---------------------------------------------------------------------------------------------
# Compiled per-block steps (one compilation per block graph and shapes, shared by the blocks)
# ---------------------------------------------------------------------------------------------

def _stat(block_def: nnx.GraphDef, stat: Statistic, block_params: dict, x: Array, cos: Array,
          sin: Array) -> Any:
    return stat(block_activations(nnx.merge(block_def, block_params), x, cos, sin))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _accumulate(block_def: nnx.GraphDef, stat: Statistic, acc: Any, block_params: dict, x: Array,
                cos: Array, sin: Array) -> Any:
    return jax.tree_util.tree_map(jnp.add, acc, _stat(block_def, stat, block_params, x, cos, sin))


@functools.partial(jax.jit, static_argnums=(0,))
def _activations(block_def: nnx.GraphDef, block_params: dict, x: Array, cos: Array,
                 sin: Array) -> BlockActivations:
    return block_activations(nnx.merge(block_def, block_params), x, cos, sin)


@functools.partial(jax.jit, static_argnums=(0,))
def _output(block_def: nnx.GraphDef, block_params: dict, x: Array, cos: Array,
            sin: Array) -> Array:
    return nnx.merge(block_def, block_params)(x, cos, sin)


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _rope(config: LlamaConfig, seq_len: int) -> tuple[Array, Array]:
    return rope_tables(seq_len, config.resolved_head_dim, config.rope_base)


@dataclasses.dataclass(frozen=True)
class CapturedBlock:
    """What the callback of :func:`capture_blocks` receives for one decoder block.

    Attributes:
        index: block index ``i``.
        params: the block's current parameters (``params["layers"][i]``, a pure dict).
        inputs: the block's residual-stream input on the calibration set ``[n, T, dim]``, computed
            by the (possibly already modified) earlier blocks.
        stats: the statistic summed over all ``n·T`` calibration tokens, computed with ``params``.
        config: the model's configuration.
        batch_size: calibration samples per forward pass of :meth:`activations`.
        block_def: the block's graph (with the model's linear factory); ``None`` builds the
            default dense block of ``config``.
    """

    index: int
    params: dict
    inputs: Array
    stats: Any
    config: LlamaConfig = dataclasses.field(repr=False)
    batch_size: int = dataclasses.field(repr=False)
    block_def: nnx.GraphDef | None = dataclasses.field(default=None, repr=False)

    @property
    def n_tokens(self) -> int:
        """Number of calibration tokens ``n·T`` the statistics sum over."""
        return self.inputs.shape[0] * self.inputs.shape[1]

    def activations(self, params: dict | None = None) -> BlockActivations:
        """All intermediates of the block on the whole calibration set (``[n, T, ·]`` each),
        with ``params`` (default: the block's current parameters). Computed on request in
        mini-batches; holds ``n·T·(3·dim + n_heads·head_dim + mlp_dim + 2·dim)`` floats."""
        params = self.params if params is None else params
        block_def = self.block_def
        if block_def is None:
            block_def = _dense_block_def(self.config, self.index)
        cos, sin = _rope(self.config, self.inputs.shape[1])
        parts = [_activations(block_def, params, self.inputs[s], cos, sin)
                 for s in _batches(self.inputs.shape[0], self.batch_size)]
        return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)


Callback = Callable[[CapturedBlock], dict]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

@functools.cache
def _abstract_params(config: LlamaConfig, linear: LinearFactory) -> dict:
    return abstract_params(config, linear=linear)[1]


@functools.cache
def _dense_block_def(config: LlamaConfig, layer: int) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: DecoderBlock(config, layer, rngs=nnx.Rngs(0))))


def _same_shapes(a: Any, b: Any) -> bool:
    """Whether two pytrees have the same structure and leaf shapes."""
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(np.shape(x) == np.shape(y) for x, y in zip(flat_a, flat_b))


def _model(model: LlamaConfig | nnx.GraphDef, params: dict) -> Llama:
    """The :class:`Llama` of ``model`` (a config: dense linears; a graphdef: its own) holding
    ``params``, after checking that they have the shapes its config and factory imply."""
    if isinstance(model, LlamaConfig):
        graphdef, factory = abstract_params(model)[0], dense_linear
    elif isinstance(model, nnx.GraphDef):
        graphdef, factory = model, None
    else:
        raise TypeError(f"model must be a LlamaConfig or an nnx.GraphDef, got "
                        f"{type(model).__name__}")
    try:
        llama = nnx.merge(graphdef, params)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"params do not match the model's graph: {e}") from e
    if not isinstance(llama, Llama):
        raise TypeError("model must be a LlamaConfig or the graphdef of a Llama model")
    factory = factory or llama.linear_factory
    if not _same_shapes(params, _abstract_params(llama.config, factory)):
        raise ValueError("params do not match the model: expected the structure and shapes of "
                         "init_params(config, linear=...) for the given config and factory")
    return llama


def resolve_config(model: LlamaConfig | nnx.GraphDef, params: dict) -> LlamaConfig:
    """The :class:`LlamaConfig` of ``model`` (a config, or the graphdef of a :class:`Llama`),
    after checking that ``params`` have exactly its parameter shapes (those of
    ``init_params(config, linear=model.linear_factory)``; per-layer widths included)."""
    return _model(model, params).config
def check_tokens(tokens: Any, config: LlamaConfig, seq_len: int | None = None) -> np.ndarray:
    """Validates calibration tokens eagerly and returns them as int32 ``[n, T]``.

    Raises:
        ValueError: ``tokens`` is not a 2-D integer array, is empty (``n == 0`` or ``T == 0``),
            its length exceeds ``config.max_seq_len`` or differs from ``seq_len``, or an id lies
            outside ``[0, vocab_size)``.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise ValueError(f"calibration tokens must be a 2-D [n, seq_len] array, got shape "
                         f"{arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"calibration tokens must be integer ids, got dtype {arr.dtype}")
    n, t = arr.shape
    if n == 0 or t == 0:
        raise ValueError(f"calibration set is empty (tokens shape {arr.shape}); pass at least "
                         "one sample of at least one token")
    if t > config.max_seq_len:
        raise ValueError(f"calibration seq_len {t} exceeds the model's max_seq_len "
                         f"{config.max_seq_len}")
    if seq_len is not None and t != seq_len:
        raise ValueError(f"calibration tokens have seq_len {t}, expected seq_len={seq_len}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"calibration token ids must lie in [0, {config.vocab_size}), got "
                         f"[{lo}, {hi}]")
    return arr.astype(np.int32)


def _check_block_params(new: Any, old: dict, index: int) -> dict:
    if not _same_shapes(new, old):
        raise ValueError(f"callback must return the parameters of block {index} with their "
                         "structure and shapes unchanged")
    return jax.tree_util.tree_map(lambda a, b: jnp.asarray(a, jnp.result_type(b)), new, old)


def capture_blocks(model: LlamaConfig | nnx.GraphDef, params: dict, tokens: Any,
                   callback: Callback, *, stats: Statistic = gram_stats, batch_size: int = 8,
                   seq_len: int | None = None, num_blocks: int | None = None,
                   verbose: bool = True) -> tuple[dict, Array]:
    """Sequential layer-by-layer capture: statistics of each block's linear inputs, then a callback
    that may replace the block's parameters before the next block is run.

    For ``i = 0, 1, …``: ``S_i = Σ_batches stats(block_activations(θ_i, h_i))`` with ``h_0`` the
    token embedding; ``θ_i ← callback(CapturedBlock(i, θ_i, h_i, S_i))``;
    ``h_{i+1} = block(θ_i, h_i)`` with the new ``θ_i``.

    Args:
        model: the model's :class:`LlamaConfig` (dense linears) or its graphdef (from
            ``init_params``; its blocks run as built, adapters or custom linears included).
        params: parameter pytree with the structure of ``init_params(config, linear=...)``.
        tokens: calibration token ids ``int[n, T]`` (e.g. from
            :func:`admm_jax.data.calibration_samples`).
        callback: ``CapturedBlock -> block params``; return ``block.params`` to keep the block.
        stats: a sum-decomposable statistic of :class:`BlockActivations`, e.g. :func:`gram_stats`
            (default) or :func:`sqnorm_stats`. Must be hashable (a module-level function), as it
            is a static argument of the compiled per-block step.
        batch_size: calibration samples per forward pass.
        seq_len: if given, the required ``T``.
        num_blocks: process only the first ``num_blocks`` blocks (default: all).
        verbose: show a progress bar on stderr.

    Returns:
        ``(params, hidden)``: the parameters with every processed block replaced by the callback's
        result, and the residual stream ``[n, T, dim]`` after the last processed block (before the
        final norm).
    """
    llama = _model(model, params)
    config = llama.config
    tokens = check_tokens(tokens, config, seq_len)
    batch_size = check_int("batch_size", batch_size, 1)
    num_blocks = config.n_layers if num_blocks is None else check_int(
        "num_blocks", num_blocks, 0, config.n_layers)

    batches = _batches(tokens.shape[0], batch_size)
    hidden = llama.embed_tokens(jnp.asarray(tokens))
    cos, sin = llama.rope(tokens.shape[1])
    layers = dict(params["layers"])
    for i in tqdm(range(num_blocks), desc="blocks", unit="block", file=sys.stderr,
                  disable=not verbose, leave=False):
        block_def, block_params = nnx.graphdef(llama.layers[i]), layers[i]
        captured = CapturedBlock(
            index=i, params=block_params, inputs=hidden, config=config, batch_size=batch_size,
            stats=_sum_stat(block_def, stats, block_params, hidden, cos, sin, batches),
            block_def=block_def)
        layers[i] = block_params = _check_block_params(callback(captured), block_params, i)
        hidden = jnp.concatenate([_output(block_def, block_params, hidden[s], cos, sin)
                                  for s in batches])
    return {**params, "layers": layers}, hidden


def _sum_stat(block_def: nnx.GraphDef, stat: Statistic, block_params: dict, hidden: Array,
              cos: Array, sin: Array, batches: list[slice]) -> Any:
    """``Σ_batches stat(block_activations(block, hidden[batch]))``."""
    shapes = jax.eval_shape(functools.partial(_stat, block_def, stat), block_params,
                            hidden[batches[0]], cos, sin)
    acc = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    for s in batches:
        acc = _accumulate(block_def, stat, acc, block_params, hidden[s], cos, sin)
    return acc
