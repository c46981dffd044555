"""One config dataclass per service, read from defaults < file (YAML) < environment < CLI.

Each field documents itself once through ``knob(default, "help")``; CLI flags (``--field-name``),
the environment variables (``<PREFIX>_FIELD_NAME``) and the YAML keys (``field_name``) are derived
from the field, so ``--help`` and the docs cannot drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file, variable or flag that does not fit the service's config."""


def knob(default: Any, help: str, *, factory: Any = None,  # noqa: A002 - mirrors argparse
         flag: bool = True) -> Any:
    """A documented config field (use ``factory`` for mutable defaults; ``flag=False``: no
    ``--flag`` of its own, for structured values a command line spells its own way)."""
    meta = {"help": help, "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _convert(raw: Any, tp: Any, name: str) -> Any:
    base, optional = _base_type(tp)
    if raw is None:
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if base in (int, float):
            if isinstance(raw, bool):
                raise ValueError(f"not a number: {raw!r}")
            return base(raw)
        if base is str:
            if isinstance(raw, (dict, list)):
                raise ValueError(f"not a string: {raw!r}")
            return str(raw)
        if origin is list:
            (item,) = typing.get_args(base) or (str,)
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return [
                _convert(i.strip() if isinstance(i, str) else i, item, name)
                for i in items
                if i != ""
            ]
        if origin is dict or base is dict:
            _, value_type = typing.get_args(base) or (str, str)
            if isinstance(raw, str):
                if value_type is not str:
                    raise ValueError(f"not a mapping: {raw!r}")
                pairs = [p.split("=", 1) for p in raw.split(",") if p]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError(f"not KEY=VALUE pairs: {raw!r}")
                return {k.strip(): v.strip() for k, v in pairs}
            if not isinstance(raw, dict):
                raise ValueError(f"not a mapping: {raw!r}")
            if value_type is str:
                return {str(k): str(v) for k, v in raw.items()}
            return {str(k): _convert(v, value_type, f"{name}.{k}") for k, v in raw.items()}
        if origin is typing.Literal:
            if raw not in typing.get_args(base):
                raise ValueError(f"{raw!r} is not one of {typing.get_args(base)}")
            return raw
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {e}") from None
    return raw


def convert(raw: Any, tp: Any, name: str) -> Any:
    """``raw`` (a string from a flag or the environment, or a YAML value) as type ``tp``, as a
    field of that type is read; :class:`ConfigError` naming ``name`` when it is not one."""
    return _convert(raw, tp, name)


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one ``--flag`` per field of ``cls`` (all default to "not given")."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base_type(hints[f.name])
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else f.default_factory()
            if f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
            else None
        )
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        if base is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def load_config(
    cls: type[C],
    args: argparse.Namespace | None = None,
    *,
    env_prefix: str,
    env: dict[str, str] | None = None,
    file: str | Path | None = None,
) -> C:
    """Build ``cls`` from defaults, then a YAML ``file``, then ``<env_prefix>_*`` vars, then CLI."""
    env = dict(os.environ) if env is None else env
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if file:
        try:
            data = yaml.safe_load(Path(file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {file}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file} must hold a mapping at its top level")
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"config file {file}: unknown keys {sorted(unknown)}")
        for k, v in data.items():
            values[k] = _convert(v, hints[k], k)
    for name in names:
        key = f"{env_prefix}_{name.upper()}"
        if key in env:
            values[name] = _convert(env[key], hints[name], key)
    if args is not None:
        for name in names:
            v = getattr(args, name, None)
            if v is not None:
                values[name] = _convert(v, hints[name], "--" + name.replace("_", "-"))
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def default_of(cls: type[Any], name: str) -> Any:
    """The default of field ``name`` of config class ``cls`` (what a caller must not restate)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            raise ConfigError(f"{cls.__name__}.{name} has no default")
    raise ConfigError(f"{cls.__name__} has no field {name!r}")


def _flag_value(value: Any, name: str) -> str:
    if isinstance(value, (list, tuple)):
        items = [_flag_value(v, name) for v in value]
        if any("," in i for i in items):
            raise ConfigError(f"{name}: list items must not contain ',' on a command line")
        return ",".join(items)
    if isinstance(value, Mapping):
        pairs = [f"{_flag_value(k, name)}={_flag_value(v, name)}" for k, v in value.items()]
        if any("," in p for p in pairs):
            raise ConfigError(f"{name}: mapping entries must not contain ',' on a command line")
        return ",".join(pairs)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_argv(cls: type[Any], values: Mapping[str, Any]) -> list[str]:
    """The flags that set ``values`` on ``cls`` — the inverse of :func:`add_arguments` and
    :func:`load_config`, so a launcher never spells a flag by hand.

    Every key must be a field of ``cls``; values are checked by building ``cls`` from them (its
    ``__post_init__`` runs), so a bad value fails here, before any process starts.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no setting {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(names))})")
    hints = typing.get_type_hints(cls)
    converted = {k: _convert(v, hints[k], k) for k, v in values.items()}
    try:
        cls(**converted)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None
    argv: list[str] = []
    for name, value in converted.items():
        flag = "--" + name.replace("_", "-")
        base, _ = _base_type(hints[name])
        if base is bool:
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is None:
            continue
        else:
            argv += [flag, _flag_value(value, name)]
    return argv
