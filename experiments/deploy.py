"""Deploy a SALAAD checkpoint at a parameter budget (Homomorphic Parameter Allocation); evaluate.

    python -m experiments.deploy --checkpoint runs/salaad-tiny --budget 0.5
    python -m experiments.deploy --checkpoint runs/salaad-tiny --budget 0.3 --kappa 0.7 \\
        --text held_out.txt --out runs/salaad-tiny-30pct

Loads the checkpoint's dense model and its surrogate (``<checkpoint>/surrogate/``, see
:mod:`admm_jax.salaad.surrogate`), allocates ``--budget`` (a fraction of the dense parameter
count) with mixing coefficient ``--kappa`` (:func:`admm_jax.salaad.hpa.allocate`; ``--strategy
sensitivity`` ranks triplets and entries by a diagonal Fisher from ``--fisher_windows`` train
windows of the checkpoint's corpus instead), rebuilds the
dense weights (:func:`admm_jax.salaad.hpa.deploy`) and prints ``params: <int>`` — the exact
deployed count under the convention of :mod:`admm_jax.salaad.hpa`. It then evaluates perplexity
exactly like ``python -m experiments.evaluate`` (on ``--text`` or the checkpoint's validation
split) and prints ``perplexity: <float>`` as its last line. Allocation + reconstruction time
goes to stderr.

``--out DIR`` keeps the deployed model as a checkpoint (``python -m experiments.evaluate
--checkpoint DIR`` evaluates it) whose meta records the corpus split and an ``hpa`` entry (budget,
kappa, counts, ratios, kept ranks and sparse counts, resident bytes); without it nothing is
written. By default (``--compact true``) that checkpoint is compact
(:func:`admm_jax.salaad.compact.compact_from_surrogate`): every deployed linear is stored and run
as its kept low-rank factors plus its kept sparse entries (values + int16/int32 indices), so bytes
on disk and in memory follow the budget; the model evaluated is then that compact model (the same
function as the dense ``L + S`` to float rounding). ``--compact false`` writes the dense
reconstruction instead.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Literal, NamedTuple

import jax

from admm_jax._checks import check_choice, check_int, check_real
from admm_jax.data import calibration_samples
from admm_jax.models.compact import resident_bytes
from admm_jax.models.layouts import Layout
from admm_jax.salaad.compact import compact_from_surrogate
from admm_jax.salaad.hpa import Allocation, allocate, deploy
from admm_jax.salaad.sensitivity import Sensitivity
from admm_jax.salaad.surrogate import Surrogate, load_surrogate
from admm_jax.training.checkpoint import (
    LoadedModel,
    model_graphdef,
    resolve_checkpoint_dir,
    save_model,
)
from experiments.cli import parse_config
from experiments.evaluate import EvaluateConfig, corpus_of, evaluate_params
from experiments.loading import load_model_source
from experiments.salaad import surrogate_sensitivity

#: Checkpoint meta fields that identify the training corpus split (admm_jax.data.corpus_meta).
_CORPUS_KEYS = ("corpus", "val_fraction", "split_seed")


@dataclasses.dataclass(frozen=True)
class DeployConfig(EvaluateConfig):
    """HPA deployment of --checkpoint DIR at --budget FRACTION of its dense size, then the
    evaluation of experiments.evaluate."""

    budget: float = 0.0
    """Deployed parameter count as a fraction in (0, 1] of RELATIVE_TO."""
    relative_to: Literal["dense", "constrained"] = "dense"
    """BUDGET as a fraction of all parameters, or of the constrained blocks' dense parameters
    (the rest of the model always stays dense)."""
    kappa: float = 0.5
    """HPA mixing coefficient: share of the reduction taken from the low-rank parts."""
    strategy: Literal["homomorphic", "sensitivity"] = "homomorphic"
    """homomorphic: HPA's shared ratios; sensitivity: keep the triplets and entries whose
    removal costs least under a diagonal Fisher (:mod:`admm_jax.salaad.sensitivity`)."""
    fisher_windows: int = 32
    """--strategy sensitivity: Fisher windows from the train split of the checkpoint's corpus."""
    fisher_seq_len: int = 128
    """--strategy sensitivity: tokens per Fisher window."""
    exact: bool = True
    """Spend the budget to within one parameter (else nested kept sets across budgets)."""
    out: str = ""
    """Keep the deployed model as a checkpoint here (default: write nothing)."""
    compact: bool = True
    """With --out: write and evaluate the compact model (low-rank factors + sparse values and
    indices per block); false: the dense reconstruction L + S. Without --out: dense."""

    def __post_init__(self):
        super().__post_init__()
        check_real("kappa", self.kappa, low=0.0, high=1.0)
        check_choice("strategy", self.strategy, ("homomorphic", "sensitivity"))
        check_int("fisher_windows", self.fisher_windows, minimum=1)
        check_int("fisher_seq_len", self.fisher_seq_len, minimum=1)


class Deployment(NamedTuple):
    """The loaded source, its allocation, and the deployed params with their layouts (empty:
    dense params)."""

    loaded: LoadedModel
    allocation: Allocation
    params: dict
    layouts: dict[str, Layout]


def fisher_sensitivity(cfg: DeployConfig, loaded: LoadedModel, surrogate: Surrogate
                       ) -> Sensitivity:
    """Unit sensitivities of ``surrogate`` (:func:`experiments.salaad.surrogate_sensitivity`)
    from ``cfg.fisher_windows`` windows of the train split of the checkpoint's corpus."""
    t0 = time.perf_counter()
    corpus = corpus_of(cfg, loaded.meta, loaded.tokenizer)
    windows = calibration_samples(corpus, cfg.fisher_windows, cfg.fisher_seq_len + 1, seed=0)
    sensitivity = surrogate_sensitivity(model_graphdef(loaded), loaded.params, surrogate,
                                        windows)
    print(f"Fisher sensitivities from {cfg.fisher_windows} x {cfg.fisher_seq_len} tokens of "
          f"{corpus.name} (train split) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return sensitivity


def deploy_checkpoint(cfg: DeployConfig) -> Deployment:
    """The deployment of ``cfg``: compact when ``cfg.out`` and ``cfg.compact``, else dense."""
    if not cfg.checkpoint or cfg.model:
        raise ValueError("deploy needs --checkpoint DIR (a checkpoint with a surrogate/), "
                         "not --model")
    loaded = load_model_source(cfg.checkpoint)
    surrogate = load_surrogate(cfg.checkpoint)
    sensitivity = fisher_sensitivity(cfg, loaded, surrogate) if cfg.strategy == "sensitivity" \
        else None
    t0 = time.perf_counter()
    allocation = allocate(surrogate, cfg.budget, cfg.kappa, params=loaded.params,
                          exact=cfg.exact, relative_to=cfg.relative_to, strategy=cfg.strategy,
                          sensitivity=sensitivity)
    if cfg.out and cfg.compact:
        layouts, params = compact_from_surrogate(loaded.config, loaded.params, surrogate,
                                                 allocation)
    else:
        params, layouts = deploy(loaded.params, surrogate, allocation), {}
    params = jax.block_until_ready(params)
    print(f"deployed {allocation.params:,} / {allocation.dense_params:,} params (target "
          f"{allocation.budget:,}; phi_low_rank {allocation.phi_low_rank:.4f}, phi_sparse "
          f"{allocation.phi_sparse:.4f}) {'compact' if layouts else 'dense'}, "
          f"{resident_bytes(params):,} resident bytes, in {time.perf_counter() - t0:.3f}s",
          file=sys.stderr)
    return Deployment(loaded, allocation, params, layouts)


def hpa_meta(cfg: DeployConfig, deployed: Deployment) -> dict:
    """Checkpoint meta of a deployed model: the source's corpus split plus an ``hpa`` record."""
    loaded, allocation = deployed.loaded, deployed.allocation
    meta = {k: loaded.meta[k] for k in _CORPUS_KEYS if k in loaded.meta}
    meta["hpa"] = {
        "source": str(resolve_checkpoint_dir(cfg.checkpoint)), "source_step": loaded.step,
        "budget": cfg.budget, "relative_to": cfg.relative_to, "kappa": cfg.kappa,
        "strategy": cfg.strategy,
        "exact": cfg.exact,
        "params": allocation.params, "budget_params": allocation.budget,
        "dense_params": allocation.dense_params, "phi_low_rank": allocation.phi_low_rank,
        "phi_sparse": allocation.phi_sparse, "ranks": allocation.ranks,
        "n_sparse": allocation.n_sparse, "compact": bool(deployed.layouts),
        "resident_bytes": resident_bytes(deployed.params)}
    return meta


def main(argv: list[str] | None = None) -> float:
    cfg = parse_config(DeployConfig, argv)
    deployed = deploy_checkpoint(cfg)
    loaded = deployed.loaded
    print(f"params: {deployed.allocation.params}")
    meta = hpa_meta(cfg, deployed)
    if cfg.out:
        save_model(cfg.out, deployed.params, model_config=loaded.config,
                   tokenizer=loaded.tokenizer, step=loaded.step, meta=meta,
                   layouts=deployed.layouts)
    ppl = evaluate_params(cfg, loaded.config, deployed.params, loaded.tokenizer, meta,
                          layouts=deployed.layouts)
    print(f"perplexity: {ppl:.4f}")
    return ppl


if __name__ == "__main__":
    main()
