"""Run directories: ``runs/<name>/`` with config.json, metrics.jsonl, summary.md and plots
(JSON files are written with :func:`admm_jax._io.atomic_write_json`)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from admm_jax._io import atomic_write_json


def run_dir(root: str | os.PathLike, name: str) -> Path:
    """``root/name`` (created). Names may not contain path separators."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"run name must be a plain directory name, got {name!r}")
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def stored_row(path: Path, key: dict) -> dict | None:
    """The JSON row stored at ``path`` if it was computed under ``key``, else ``None``."""
    row = json.loads(path.read_text()) if path.exists() else {}
    return row if row.get("config") == key else None


def cached_row(path: Path, key: dict, compute: Callable[[], dict], *,
               stale: Sequence[str] = ()) -> dict:
    """The JSON row stored at ``path`` if it was computed under ``key`` (its ``"config"``
    entry), else ``compute()`` stored with that key, after removing the ``stale`` entries
    (e.g. a half-finished ``train/`` run) next to ``path``: one result per setting, reused
    across invocations and recomputed when what it depends on changes."""
    row = stored_row(path, key)
    if row is not None:
        return row
    if path.exists():
        print(f"{path} was computed under another format or config; recomputing", flush=True)
    for name in stale:
        shutil.rmtree(path.parent / name, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {**compute(), "config": key}
    atomic_write_json(path, row)
    return row


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 4 significant digits."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_training(history: list[dict], path: Path, title: str) -> None:
    """Train loss (left axis) and validation perplexity (right axis) against step."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["loss"] for r in history], label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    evals = [r for r in history if "val_ppl" in r]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["val_ppl"] for r in evals], "o-",
                 color="tab:red", label="val perplexity")
        ax2.set_ylabel("validation perplexity")
        ax2.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
