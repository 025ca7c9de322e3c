"""Dataclass configs on the command line: nested flags keep the experiment's own defaults."""

import dataclasses
import json

import pytest

from admm_jax.training.loop import TrainConfig
from experiments.cli import parse_config


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str = "run"
    rho: float = 0.1
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=150, batch_size=4, lr=1e-4, weight_decay=0.0))


def test_a_nested_flag_changes_only_that_field():
    cfg = parse_config(Experiment, ["--train.steps", "300", "--rho", "0.5"])
    assert cfg.train == dataclasses.replace(Experiment().train, steps=300)
    assert cfg.rho == 0.5 and cfg.name == "run"
    assert parse_config(Experiment, []) == Experiment()


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"name": "x", "train": {"lr": 3e-4, "batch_size": 8}}))
    cfg = parse_config(Experiment, ["--config", str(path), "--train.batch_size", "16"])
    assert cfg.name == "x"
    assert cfg.train == dataclasses.replace(Experiment().train, lr=3e-4, batch_size=16)


def test_unknown_or_bad_flags_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        parse_config(Experiment, ["--train.stepz", "3"])
    with pytest.raises(SystemExit):
        parse_config(Experiment, ["--train.steps", "0"])
    assert "steps must be >= 1" in capsys.readouterr().err
