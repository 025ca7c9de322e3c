"""Dataclass configs on the command line.

Every field of an experiment's config dataclass is a flag; fields of nested dataclasses are
addressed with dots and ``dict`` fields take arbitrary dotted keys::

    python -m experiments.pretrain --model tiny --train.steps 500 --arch.n_layers 2

Values are parsed with the field's type (``bool`` accepts true/false/1/0/yes/no; ``dict`` entries
are parsed as JSON when possible, else kept as strings). ``--config FILE.json`` loads a config
first; later flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _scalar_parser(tp: Any):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _scalar_parser(args[0])
        return lambda s: None if s.lower() in ("none", "null") else inner(s)
    if tp is bool:
        return _bool
    if tp in (int, float, str):
        return tp
    raise TypeError(f"unsupported config field type {tp!r}")


def _json_or_str(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _fields(cls, instance: Any = None) -> dict[str, tuple[Any, Any]]:
    """``{dotted name: (type, default)}`` of all scalar fields, recursing into dataclasses. A
    nested dataclass's defaults are those of the parent's default instance (its
    ``default_factory``), not the nested class's own."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = getattr(instance, f.name) if instance is not None else _default(f)
        if dataclasses.is_dataclass(tp):
            for sub, spec in _fields(tp, default).items():
                out[f"{f.name}.{sub}"] = spec
        else:
            out[f.name] = (tp, default)
    return out


def _set(d: dict, dotted: str, value: Any) -> None:
    head, _, rest = dotted.partition(".")
    if rest:
        _set(d.setdefault(head, {}), rest, value)
    else:
        d[head] = value


def _build(cls, values: dict[str, Any], base: Any = None):
    """``cls`` from ``values``; unset fields keep the values of ``base`` (the parent's default
    instance for nested configs), else the class defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            nested = getattr(base, name) if base is not None else _default(fields[name])
            kwargs[name] = _build(tp, value, nested)
        else:
            kwargs[name] = value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def parse_config(cls: type[T], argv: list[str] | None = None, *,
                 description: str | None = None) -> T:
    """Build ``cls`` from defaults, an optional ``--config`` JSON file, and dotted flags."""
    argv = sys.argv[1:] if argv is None else argv
    specs = _fields(cls)
    dict_fields = [name for name, (tp, _) in specs.items()
                   if tp is dict or typing.get_origin(tp) is dict]
    epilog = " ".join(f"--{d}.KEY VALUE sets entry KEY of the '{d}' mapping." for d in dict_fields)
    parser = argparse.ArgumentParser(description=description or cls.__doc__, epilog=epilog,
                                     allow_abbrev=False)
    parser.add_argument("--config", help="JSON file with config values (flags override it)")
    for name, (tp, default) in specs.items():
        if name in dict_fields:
            continue
        parser.add_argument(f"--{name}", type=_scalar_parser(tp), default=argparse.SUPPRESS,
                            help=f"(default: {default!r})")
    args, rest = parser.parse_known_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values = json.loads(open(args.config).read())
    for name, value in vars(args).items():
        if name != "config":
            _set(values, name, value)
    i = 0
    while i < len(rest):
        flag = rest[i]
        prefix = next((d for d in dict_fields if flag.startswith(f"--{d}.")), None)
        if prefix is None or i + 1 >= len(rest):
            parser.error(f"unrecognized argument {flag!r}")
        _set(values, prefix, {**_get(values, prefix), flag[len(prefix) + 3:]: _json_or_str(
            rest[i + 1])})
        i += 2
    try:
        return _build(cls, values)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def _get(d: dict, dotted: str) -> dict:
    for part in dotted.split("."):
        d = d.get(part, {})
    return dict(d)


def to_dict(config) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(config)
