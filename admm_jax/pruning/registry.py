"""The one-shot pruning registry and the whole-model driver :func:`prune`.

A one-shot method is one immutable :class:`Pruner` record: the statistic it needs from the
calibration set (``None`` for data-free methods), one hook that prunes a decoder block, its
default options and the sparsity structures it supports. :func:`prune` only looks the method up
and runs the hook block by block, so a new method (e.g. SPAP) is one :func:`register_pruner` call
and never an edit here — the registry-plus-one-hook shape of jaxpruner's ``api.py`` and
``algorithms/pruners.py``, with frozen records instead of mutable dataclasses.

The hook sees a :class:`~admm_jax.pruning.capture.CapturedBlock` (its ``params``, summed
``stats``, and the full activations on request via ``CapturedBlock.activations()``) and returns
the block's new parameters plus the keep mask of every kernel it pruned. Most methods prune each
linear independently; :func:`per_kernel` lifts a ``(kernel, stat, sparsity, structure, **opts) ->
(kernel, mask)`` function into a block hook.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from admm_jax._checks import check_real
from admm_jax.models.llama import LlamaConfig
from admm_jax.ops.structures import (
    NM,
    Block,
    Channel,
    Structure,
    StructureSpec,
    Unstructured,
    check_kernel_structure,
    parse_structure,
)
from admm_jax.pruning.capture import LINEAR_INPUTS, CapturedBlock, capture_blocks, resolve_config

Array = jax.Array
#: A sum-decomposable statistic of a block's activations (see ``capture_blocks``).
Statistic = Callable[[Any], Any]
#: ``(block, sparsity, structure, **options) -> (block params, {linear: keep mask})``.
BlockPruneFn = Callable[..., tuple[dict, dict[str, Array]]]
#: ``(kernel [in, out], stat or None, *, sparsity, structure, **options) -> (kernel, mask)``.
KernelPruneFn = Callable[..., tuple[Array, Array]]

ALL_STRUCTURES: tuple[type, ...] = (Unstructured, NM, Channel, Block)


class Pruner(NamedTuple):
    """A registered one-shot method (immutable).

    Attributes:
        name: the ``method=`` name of :func:`prune`.
        prune_block: hook ``(block, sparsity: float, structure: Structure, **options) ->
            (block params, {"attn/q_proj": keep mask, ...})``; ``block`` is a
            :class:`~admm_jax.pruning.capture.CapturedBlock`, or a :class:`DataFreeBlock` when
            ``stats`` is ``None``.
        stats: the statistic to capture per block (e.g.
            :func:`~admm_jax.pruning.capture.gram_stats`), or ``None`` for a data-free method,
            which then runs without calibration tokens.
        defaults: every option the method accepts, with its default (read-only mapping).
        structures: the structure types it supports, e.g. ``(Unstructured, NM)``.
        check: optional eager check ``(config, structure, **options) -> None`` run before any
            block (e.g. SparseGPT's ``blocksize`` / ``percdamp``).
    """

    name: str
    prune_block: BlockPruneFn
    stats: Statistic | None
    defaults: Mapping[str, Any]
    structures: tuple[type, ...]
    check: Callable[..., None] | None = None


class DataFreeBlock(NamedTuple):
    """What the hook of a data-free method (``stats=None``) receives for one decoder block."""

    index: int
    params: dict
    config: LlamaConfig
    stats: None = None


_PRUNERS: dict[str, Pruner] = {}
#: Read-only view of the registered methods, by name.
PRUNERS: Mapping[str, Pruner] = MappingProxyType(_PRUNERS)


def register_pruner(name: str, prune_block: BlockPruneFn, *, stats: Statistic | None,
                    structures: tuple[type, ...], defaults: Mapping[str, Any] | None = None,
                    check: Callable[..., None] | None = None,
                    replace: bool = False) -> Pruner:
    """Registers a one-shot method under ``name`` and returns its :class:`Pruner` record.

    Args:
        name: method name for ``prune(..., method=name)``.
        prune_block: the block hook (see :class:`Pruner`; :func:`per_kernel` builds one from a
            per-kernel function).
        stats: statistic to capture per block, or ``None`` (no calibration needed).
        structures: supported structure types (a subset of :data:`ALL_STRUCTURES`:
            ``(Unstructured, NM, Channel, Block)``).
        defaults: the method's options and their defaults.
        check: optional eager argument check, see :class:`Pruner`.
        replace: allow overwriting an existing registration.

    Raises:
        ValueError: ``name`` is already registered (and ``replace`` is False), or
            ``structures`` is empty or holds an unknown type.
        TypeError: ``name`` is not a string, or ``prune_block`` / ``stats`` / ``check`` is not
            callable.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if name in _PRUNERS and not replace:
        raise ValueError(f"pruner {name!r} is already registered (pass replace=True)")
    if not all(f is None or callable(f) for f in (prune_block, stats, check)) \
            or prune_block is None:
        raise TypeError("prune_block must be callable, stats and check callables or None")
    structures = tuple(structures)
    if not structures or any(s not in ALL_STRUCTURES for s in structures):
        raise ValueError(f"structures must be a non-empty subset of "
                         f"{_names(ALL_STRUCTURES)}, got {structures!r}")
    record = Pruner(name, prune_block, stats, MappingProxyType(dict(defaults or {})),
                    structures, check)
    _PRUNERS[name] = record
    return record


def unregister_pruner(name: str) -> Pruner:
    """Removes and returns the registration of ``name`` (e.g. a test's toy method)."""
    return _PRUNERS.pop(get_pruner(name).name)


def get_pruner(name: str) -> Pruner:
    """The :class:`Pruner` registered as ``name``; ``ValueError`` listing the registered ones."""
    if not isinstance(name, str) or name not in _PRUNERS:
        raise ValueError(f"method must be one of {sorted(_PRUNERS)} (the registered pruners), "
                         f"got {name!r}")
    return _PRUNERS[name]


def registered_methods() -> tuple[str, ...]:
    """Names of the registered methods, in registration order."""
    return tuple(_PRUNERS)


def _names(types: tuple[type, ...]) -> str:
    return ", ".join(t.__name__ for t in types)


def supported_structure(pruner: Pruner, structure: StructureSpec) -> Structure:
    """``structure`` parsed, after checking that ``pruner`` supports its type."""
    structure = parse_structure(structure)
    if not isinstance(structure, pruner.structures):
        raise ValueError(f"method {pruner.name!r} does not support structure {structure} "
                         f"({type(structure).__name__}); it supports: "
                         f"{_names(pruner.structures)}")
    return structure


def check_kernel_args(pruner: Pruner, w: Any, sparsity: Any,
                      structure: StructureSpec) -> tuple[Array, float, Structure]:
    """The eager checks of a per-kernel function: ``w`` a non-empty ``[in, out]`` kernel,
    ``sparsity`` in ``[0, 1)``, ``structure`` supported by ``pruner`` and fitting ``w``."""
    w = jnp.asarray(w)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"w must be a non-empty 2-D [in, out] kernel, got shape {w.shape}")
    sparsity = check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
    structure = check_kernel_structure(supported_structure(pruner, structure), w.shape)
    return w, sparsity, structure


def per_kernel(kernel_fn: KernelPruneFn) -> BlockPruneFn:
    """A block hook that prunes each linear of :data:`LINEAR_INPUTS` independently:
    ``kernel_fn(kernel, block.stats[site], sparsity=..., structure=..., **options)``, or
    ``kernel_fn(kernel, sparsity=..., ...)`` when the block has no statistics (data-free)."""

    def prune_block(block: CapturedBlock | DataFreeBlock, sparsity: float,
                    structure: Structure, **options) -> tuple[dict, dict[str, Array]]:
        new = {group: dict(sub) for group, sub in block.params.items()}
        masks = {}
        for linear, site in LINEAR_INPUTS.items():
            group, name = linear.split("/")
            stat = () if block.stats is None else (block.stats[site],)
            kernel, masks[linear] = kernel_fn(block.params[group][name]["kernel"], *stat,
                                              sparsity=sparsity, structure=structure, **options)
            new[group][name] = {**block.params[group][name], "kernel": kernel}
        return new, masks

    prune_block.__doc__ = f"Block hook applying {kernel_fn.__name__} to every linear."
    return prune_block


def _check_model_structure(config: LlamaConfig, params: dict, structure: Structure) -> None:
    """Checks that ``structure`` fits every pruned kernel of the model (N:M divisibility)."""
    for i in range(config.n_layers):
        for linear in LINEAR_INPUTS:
            group, name = linear.split("/")
            shape = jnp.shape(params["layers"][i][group][name]["kernel"])
            check_kernel_structure(structure, shape, f"{linear} (layer {i})")


def _options(pruner: Pruner, options: dict[str, Any]) -> dict[str, Any]:
    """``pruner``'s defaults updated with its own entries of ``options``. Options of other
    registered methods are dropped (one set of options can drive several methods); a name no
    registered method accepts raises ``TypeError``."""
    known = {key for record in _PRUNERS.values() for key in record.defaults}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown pruning options {unknown}; method {pruner.name!r} accepts "
                        f"{sorted(pruner.defaults)}")
    return {**pruner.defaults, **{k: v for k, v in options.items() if k in pruner.defaults}}


def prune(model: LlamaConfig | nnx.GraphDef, params: dict, calibration: Any = None, *,
          method: str = "magnitude", sparsity: float = 0.5,
          structure: StructureSpec | None = None, batch_size: int = 8, verbose: bool = True,
          **method_options: Any) -> tuple[dict, dict[str, Array]]:
    """One-shot pruning of every decoder-block linear of a LLaMA model with a registered method.

    Data-free methods (``stats=None``, e.g. magnitude) prune each block directly; the others
    prune block by block inside :func:`~admm_jax.pruning.capture.capture_blocks`, so each block
    is pruned from inputs computed by the already-pruned earlier blocks.

    Args:
        model: the model's :class:`LlamaConfig` or graphdef.
        params: parameter pytree of ``init_params(config)``'s structure (e.g. ``load_smollm2()``).
        calibration: calibration token ids ``int[n, T]`` (e.g. from
            :func:`admm_jax.data.calibration_samples`); required by methods with a statistic
            (``"wanda"``, ``"sparsegpt"``), ignored by data-free ones (``"magnitude"``).
        method: a name in :data:`PRUNERS` (``"magnitude"``, ``"wanda"``, ``"sparsegpt"``, ...).
        sparsity: fraction of zeros in ``[0, 1)`` (ignored for ``N:M``; a fraction of tiles
            for block).
        structure: ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``), ``"channel"`` or
            ``"blockB"`` (e.g. ``"block16"``), or the value
            (:class:`~admm_jax.ops.structures.NM` ``(2, 4)``, ...); must be one the method
            supports. Default: unstructured, or the method's first structure where it has no
            unstructured one (SPAP's ``channel``).
        batch_size: calibration samples per forward pass.
        verbose: progress bar on stderr.
        **method_options: the method's own options (see ``PRUNERS[method].defaults``), e.g.
            SparseGPT's ``blocksize=128, percdamp=0.01``.

    Returns:
        ``(pruned_params, masks)``: ``masks["layers/{i}/{attn|mlp}/{name}/kernel"]`` is the bool
        keep mask ``[in, out]`` of every pruned kernel, and ``pruned_params`` is zero wherever a
        mask is False.
    """
    pruner = get_pruner(method)
    config = resolve_config(model, params)
    sparsity = check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
    if structure is None:  # the method's natural structure: unstructured where it has one
        structure = Unstructured() if Unstructured in pruner.structures else \
            pruner.structures[0]()
    structure = supported_structure(pruner, structure)
    _check_model_structure(config, params, structure)
    options = _options(pruner, method_options)
    if pruner.check is not None:
        pruner.check(config, structure, **options)
    if pruner.stats is not None and calibration is None:
        raise ValueError(f"method={method!r} needs calibration tokens [n, seq_len]")
    masks: dict[str, Array] = {}

    def callback(block: CapturedBlock | DataFreeBlock) -> dict:
        new, block_masks = pruner.prune_block(block, sparsity, structure, **options)
        masks.update({f"layers/{block.index}/{linear}/kernel": mask
                      for linear, mask in block_masks.items()})
        return new

    if pruner.stats is None:
        layers = {i: callback(DataFreeBlock(i, params["layers"][i], config))
                  for i in tqdm(range(config.n_layers), desc=method, unit="block",
                                file=sys.stderr, disable=not verbose, leave=False)}
        return {**params, "layers": layers}, masks
    pruned, _ = capture_blocks(model, params, calibration, callback, stats=pruner.stats,
                               batch_size=batch_size, verbose=verbose)
    return pruned, masks
