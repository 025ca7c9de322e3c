"""Turn a pruned dense checkpoint (zeros in the projection kernels) into a compact one.

    python -m experiments.compact --checkpoint runs/elsa/elsa-0.9/model --out runs/elsa-0.9c
    python -m experiments.compact --checkpoint runs/elsa/sparsegpt-2:4/model --out runs/sgpt-24c \
        --structure 2:4
    python -m experiments.evaluate --checkpoint runs/elsa-0.9c

The seven projection kernels of every decoder block are stored as their nonzeros
(:func:`admm_jax.models.compact.masks_from_nonzeros`, :func:`~admm_jax.models.compact.
compact_from_masks`): COO values + int16/int32 indices (``--structure unstructured``), or N:M
values + uint8 in-group indices (``--structure 2:4`` etc.; a kernel with more than N nonzeros in
some group of M inputs is refused by name). Embeddings, norms and ``lm_head`` are copied as they
are; meta is the source's plus a ``compact`` record (source, structure, bytes). Prints the bytes
on disk and resident of both checkpoints; the compact model computes the same function as the
source (the stored entries are the source's nonzeros, exactly).
"""

from __future__ import annotations

import dataclasses
import sys

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
    """unstructured (COO of the nonzeros) or N:M, e.g. 2:4 (N:M values + in-group indices)."""


def compact_checkpoint(cfg: CompactConfig) -> dict:
    """Write the compact checkpoint of ``cfg``; returns the ``compact`` record of its meta."""
    if not cfg.checkpoint or not cfg.out:
        raise ValueError("give --checkpoint DIR (a pruned dense checkpoint) and --out DIR")
    source = load_model(cfg.checkpoint)
    if source.layouts:
        raise ValueError(f"{cfg.checkpoint!r} is already a compact checkpoint")
    masks = masks_from_nonzeros(source.config, source.params)
    model = compact_from_masks(source.config, source.params, masks, structure=cfg.structure)
    kept = sum(int(m.sum()) for m in masks.values())
    record = {"source": str(resolve_checkpoint_dir(cfg.checkpoint)),
              "structure": cfg.structure, "kernels": len(masks),
              "density": kept / max(sum(m.size for m in masks.values()), 1),
              "resident_bytes": resident_bytes(model.params),
              "source_resident_bytes": resident_bytes(source.params),
              "source_checkpoint_bytes": checkpoint_bytes(cfg.checkpoint)}
    save_model(cfg.out, model.params, model_config=source.config, tokenizer=source.tokenizer,
               step=source.step, meta={**source.meta, "compact": record}, layouts=model.layouts)
    record["checkpoint_bytes"] = checkpoint_bytes(cfg.out)
    return record


def main(argv: list[str] | None = None) -> dict:
    record = compact_checkpoint(parse_config(CompactConfig, argv))
    print(f"density of the projection kernels: {record['density']:.4f}", file=sys.stderr)
    for what in ("checkpoint_bytes", "resident_bytes"):
        print(f"{what}: {record[what]} (dense source: {record['source_' + what]})")
    return record


if __name__ == "__main__":
    main()
