"""Turn a pruned dense checkpoint (zeros in the projection kernels) into a compact one.

    python -m experiments.compact --checkpoint runs/elsa/elsa-0.9/model --out runs/elsa-0.9c
    python -m experiments.compact --checkpoint runs/elsa/sparsegpt-2:4/model --out runs/sgpt-24c \
        --structure 2:4
    python -m experiments.compact --checkpoint runs/x/sparsegpt-block16/model --out runs/x-b16c \
        --structure block16
    python -m experiments.evaluate --checkpoint runs/elsa-0.9c

The seven projection kernels of every decoder block are stored as their nonzeros
(:func:`admm_jax.models.compact.masks_from_nonzeros`, :func:`~admm_jax.models.compact.
compact_from_masks`): COO values + int16/int32 indices (``--structure unstructured``), N:M values +
uint8 in-group indices (``--structure 2:4`` etc.; a kernel with more than N nonzeros in some group
of M inputs is refused by name), or the ``b × b`` tiles that hold a nonzero + int16 block indices
(``--structure block16`` / ``block32``: BSR, for block-pruned sources; any other source is stored
exactly too, with the zeros of its partly filled tiles). Embeddings, norms and ``lm_head`` are
copied as they are; meta is the source's plus a ``compact`` record (source, structure, bytes).
Prints the bytes on disk and resident of both checkpoints; the compact model computes the same
function as the source (the stored entries are the source's nonzeros, exactly).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from admm_jax.models.compact import compact_from_masks, masks_from_nonzeros, resident_bytes
from admm_jax.training.checkpoint import (
    checkpoint_bytes,
    load_model,
    resolve_checkpoint_dir,
    save_model,
)
from experiments.cli import parse_config


@dataclasses.dataclass(frozen=True)
class CompactConfig:
    """Compact checkpoint at --out from the pruned dense checkpoint at --checkpoint."""

    checkpoint: str = ""
    """Pruned dense checkpoint (or run) directory, e.g. runs/<name>/<method>-<setting>/model."""
    out: str = ""
    """Directory of the compact checkpoint to write."""
    structure: str = "unstructured"
    """unstructured (COO of the nonzeros), N:M, e.g. 2:4 (N:M values + in-group indices), or
    blockB, e.g. block16 (BSR: the b × b tiles holding a nonzero + block indices)."""


def write_compact(out, config, params, masks: dict, *, structure: str, tokenizer, step: int = 0,
                  meta: dict | None = None) -> dict:
    """Save the compact twin of the pruned ``params`` (keep ``masks``, see
    :func:`~admm_jax.models.compact.compact_from_masks`) at ``out``; returns its ``compact``
    record (structure, kernel count, density, resident bytes of both, bytes on disk), which is
    also stored in the checkpoint's meta."""
    model = compact_from_masks(config, params, masks, structure=structure)
    kept = sum(int(np.sum(np.asarray(m))) for m in masks.values())
    record = {"structure": structure, "kernels": len(masks),
              "density": kept / max(sum(np.asarray(m).size for m in masks.values()), 1),
              "resident_bytes": resident_bytes(model.params),
              "dense_resident_bytes": resident_bytes(params)}
    save_model(out, model.params, model_config=config, tokenizer=tokenizer, step=step,
               meta={**(meta or {}), "compact": record}, layouts=model.layouts)
    record["checkpoint_bytes"] = checkpoint_bytes(out)
    return record


def compact_checkpoint(cfg: CompactConfig) -> dict:
    """Write the compact checkpoint of ``cfg``; returns the ``compact`` record of its meta."""
    if not cfg.checkpoint or not cfg.out:
        raise ValueError("give --checkpoint DIR (a pruned dense checkpoint) and --out DIR")
    source = load_model(cfg.checkpoint)
    if source.layouts:
        raise ValueError(f"{cfg.checkpoint!r} is already a compact checkpoint")
    masks = masks_from_nonzeros(source.config, source.params)
    meta = {**source.meta, "source": str(resolve_checkpoint_dir(cfg.checkpoint))}
    record = write_compact(cfg.out, source.config, source.params, masks,
                           structure=cfg.structure, tokenizer=source.tokenizer,
                           step=source.step, meta=meta)
    return {**record, "source_checkpoint_bytes": checkpoint_bytes(cfg.checkpoint)}


def main(argv: list[str] | None = None) -> dict:
    record = compact_checkpoint(parse_config(CompactConfig, argv))
    print(f"density of the projection kernels: {record['density']:.4f}", file=sys.stderr)
    print(f"checkpoint_bytes: {record['checkpoint_bytes']} (dense source: "
          f"{record['source_checkpoint_bytes']})")
    print(f"resident_bytes: {record['resident_bytes']} (dense source: "
          f"{record['dense_resident_bytes']})")
    return record


if __name__ == "__main__":
    main()
