"""The result cache of :mod:`experiments.elsa`: one ``result.json`` per (method, setting), valid
only under the current :data:`RESULT_FORMAT` and the config fields that result depends on."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from experiments.cli import to_dict
from experiments.elsa_report import ONESHOT
from experiments.runs import cached_row

#: version of the result rows; a cached row of another format is recomputed (v2: the projection
#: fix of issue 9, two evaluation domains, tokens seen and the command in every row)
RESULT_FORMAT = "elsa-result-v2"

_EVAL = ("model", "checkpoint", "corpus", "transfer_corpus", "eval_seq_len", "eval_batch_size",
         "eval_batches")
_ADMM = ("rho_ramp", "rho_factor", "interval", "weighted", "state_dtype", "train")
#: the config fields each kind of result depends on
DEPENDS = {
    "dense": _EVAL, "dense+ft": (*_EVAL, "train"), "magnitude": _EVAL,
    "wanda": (*_EVAL, "n_calibration", "calibration_len"),
    "sparsegpt": (*_EVAL, "n_calibration", "calibration_len", "sparsegpt_blocksize",
                  "sparsegpt_damp"),
    "elsa": (*_EVAL, "rho", "decoupled_schedule", *_ADMM),
    "elsa-global": (*_EVAL, "rho", "decoupled_schedule", *_ADMM),
    "elsa-paper": (*_EVAL, "paper_rho", *_ADMM),
}
DEPENDS.update({f"{m}+ft": (*DEPENDS[m], "train") for m in ONESHOT})


def result_key(cfg, kind: str) -> dict:
    """What a cached row of ``kind`` must have been computed under to be reused."""
    values = to_dict(cfg)
    return {"format": RESULT_FORMAT, **{f: values[f] for f in DEPENDS[kind]}}


def cached(path: Path, cfg, kind: str, compute: Callable[[], dict]) -> dict:
    """The row stored at ``path`` if its key is :func:`result_key`, else ``compute()`` (after
    removing the stale ``train/`` and ``model/`` next to it), stored with that key."""
    return cached_row(path, result_key(cfg, kind), compute, stale=("train", "model"))


def collect_rows(cfg, root: Path, methods: Sequence[str]) -> list[dict]:
    """Every row cached under ``root`` that ``cfg`` would reuse (from any invocation, at any
    setting), ordered dense first, then by setting (``cfg.settings`` order) and ``methods``."""
    paths = [root / "dense.json", *sorted(root.glob("*/result.json"))]
    rows = [json.loads(p.read_text()) for p in paths if p.exists()]
    rows = [r for r in rows
            if r.get("method") in DEPENDS and r.get("config") == result_key(cfg, r["method"])]
    settings = ["dense", *cfg.settings.split(",")]
    order = ["dense", "dense+ft", *methods]

    def rank(row: dict) -> tuple:
        s = row["setting"]
        return (settings.index(s) if s in settings else len(settings), s,
                order.index(row["method"]) if row["method"] in order else len(order))

    return sorted(rows, key=rank)
