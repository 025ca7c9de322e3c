"""Dataclass configs on the command line, built on `tyro <https://brentyi.github.io/tyro/>`_.

Every field of an experiment's config dataclass is a flag whose ``--help`` text is the field's
docstring; fields of nested dataclasses are addressed with dots (``--train.steps 500``,
``--train.optimizer.lr 1e-4``), booleans take a value (``--dense_reference false``) and ``dict``
fields take ``KEY VALUE`` pairs (``--arch n_layers 2 max_seq_len 64``). ``--config FILE.json``
loads values first (nested objects for nested configs); the other flags override them::

    python -m experiments.pretrain --model tiny --train.steps 500 --arch n_layers 2
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import tyro

T = TypeVar("T")

_CONFIG_HELP = ("--config FILE.json loads config values from a JSON file first (nested objects "
                "for nested configs); the other flags override them.")
_MARKERS = (tyro.conf.FlagConversionOff,)
_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
          "false": False, "0": False, "no": False, "off": False}
_REGISTRY = tyro.constructors.ConstructorRegistry()


@_REGISTRY.primitive_rule
def _bool_rule(type_info: tyro.constructors.PrimitiveTypeInfo):
    """Booleans take a value, any case: true/false, yes/no, on/off, 1/0."""
    if type_info.type is not bool:
        return None

    def parse(args: list[str]) -> bool:
        if args[0].lower() not in _BOOLS:
            raise ValueError(f"expected a boolean (true/false), got {args[0]!r}")
        return _BOOLS[args[0].lower()]

    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="{true,false}", instance_from_str=parse,
        is_instance=lambda x: isinstance(x, bool),
        str_from_instance=lambda value: [str(value).lower()])


def _with_values(base: T, values: dict[str, Any], where: str) -> T:
    """``base`` with the fields in ``values`` replaced, recursing into nested dataclasses."""
    hints = typing.get_type_hints(type(base))
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown {where} fields {unknown}; known: {sorted(fields)}")
    changes = {}
    for name, value in values.items():
        nested = getattr(base, name)
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            changes[name] = _with_values(nested, value, f"{where}.{name}")
        else:
            changes[name] = value
    return dataclasses.replace(base, **changes)


def load_config(cls: type[T], path: str | Path, base: T | None = None) -> T:
    """``base`` (default: ``cls()``) updated with the values of the JSON file at ``path``."""
    values = json.loads(Path(path).read_text())
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a JSON object")
    return _with_values(cls() if base is None else base, values, cls.__name__)


def _pop_config(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(path of --config FILE, remaining args)``."""
    rest, path, args = [], None, list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config":
            if not args:
                raise ValueError("--config needs a FILE.json argument")
            path = args.pop(0)
        elif arg.startswith("--config="):
            path = arg.partition("=")[2]
        else:
            rest.append(arg)
    return path, rest


def _prog(cls: type) -> str | None:
    """``python -m experiments.NAME`` for an experiment's config, else tyro's default."""
    module = cls.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else ""
    return f"python -m {module}" if module.startswith("experiments.") else None


def _fail(message: str) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_config(cls: type[T], argv: list[str] | None = None, *,
                 description: str | None = None) -> T:
    """Build ``cls`` from its defaults, an optional ``--config`` JSON file, and flags.

    Args:
        cls: a (frozen) dataclass; nested dataclass fields become dotted flag groups.
        argv: command-line arguments (default: ``sys.argv[1:]``).
        description: ``--help`` header (default: the class docstring).

    Returns:
        the config. Unknown flags, unparsable values, bad ``--config`` files and values that
        the dataclasses' ``__post_init__`` checks reject exit with status 2 and a message on
        stderr.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        path, rest = _pop_config(argv)
        default = cls() if path is None else load_config(cls, path)
    except (OSError, ValueError, TypeError) as e:
        _fail(str(e))
    header = description or cls.__doc__ or cls.__name__
    # tyro reports the ValueErrors of the configs' __post_init__ checks like parse errors
    return tyro.cli(cls, args=rest, default=default, prog=_prog(cls), use_underscores=True,
                    description=f"{header.strip()}\n\n{_CONFIG_HELP}", config=_MARKERS,
                    registry=_REGISTRY)


def to_dict(config) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(config)


def csv_items(csv: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option (``"a, b,"`` → ``["a", "b"]``)."""
    return [s.strip() for s in csv.split(",") if s.strip()]
