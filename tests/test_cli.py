"""Dataclass configs on the command line (tyro): nested flags keep the experiment's own defaults,
``--config FILE`` then flags, help text from field docstrings, clear errors for bad values."""

import dataclasses
import json

import pytest

from admm_jax.training import OptimizerConfig, TrainConfig
from experiments.cli import parse_config


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A toy experiment."""

    name: str = "run"
    """Name of the run directory."""
    rho: float = 0.1
    """Penalty weight of the toy method."""
    dense: bool = True
    """Also run the dense reference."""
    arch: dict[str, int | float | bool | str] = dataclasses.field(default_factory=dict)
    """Architecture overrides."""
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        steps=150, batch_size=4, optimizer=OptimizerConfig(lr=1e-4, weight_decay=0.0)))


def test_a_nested_flag_changes_only_that_field():
    cfg = parse_config(Experiment, ["--train.steps", "300", "--rho", "0.5",
                                    "--train.optimizer.b2", "0.99"])
    default = Experiment().train
    assert cfg.train == dataclasses.replace(
        default, steps=300, optimizer=dataclasses.replace(default.optimizer, b2=0.99))
    assert cfg.rho == 0.5 and cfg.name == "run" and cfg.dense
    assert parse_config(Experiment, []) == Experiment()


def test_bool_and_dict_values():
    cfg = parse_config(Experiment, ["--dense", "false", "--arch", "n_layers", "2", "tie", "True"])
    assert cfg.dense is False
    assert cfg.arch == {"n_layers": 2, "tie": True}


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"name": "x", "train": {"batch_size": 8,
                                                       "optimizer": {"lr": 3e-4}}}))
    cfg = parse_config(Experiment, ["--config", str(path), "--train.batch_size", "16"])
    assert cfg.name == "x"
    default = Experiment().train
    assert cfg.train == dataclasses.replace(
        default, batch_size=16, optimizer=dataclasses.replace(default.optimizer, lr=3e-4))
    assert parse_config(Experiment, [f"--config={path}"]).train.batch_size == 8


def test_help_shows_field_docstrings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Experiment, ["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("A toy experiment.", "Penalty weight of the toy method.", "--train.steps",
                 "Optimizer steps of the whole run", "--train.optimizer.lr", "Peak learning rate",
                 "--config FILE.json"):
        assert text in out, text


@pytest.mark.parametrize(("argv", "message"), [
    (["--train.stepz", "3"], "--train.stepz"),
    (["--train.steps", "0"], "TrainConfig.steps must be an integer in [1, inf], got 0"),
    (["--train.optimizer.lr", "-1"], "OptimizerConfig.lr must be in (0.0, inf)"),
    (["--rho", "abc"], "abc"),
    (["--config", "missing.json"], "missing.json"),
])
def test_bad_values_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Experiment, argv)
    assert exit_info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_unknown_config_file_field_is_named(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"lr": 1e-3}}))
    with pytest.raises(SystemExit):
        parse_config(Experiment, ["--config", str(path)])
    assert "unknown Experiment.train fields ['lr']" in capsys.readouterr().err
