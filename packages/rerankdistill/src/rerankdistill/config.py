"""Command configs: dataclasses filled from a YAML file, then `key=value` overrides, validated by field type.

Self-contained (PyYAML only) so the CLI's data/evaluation commands run without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from shared_kernels.errors import UserError
from shared_kernels.textfiles import read_text

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config value or key that does not fit the command's options."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """`cls` from defaults, the YAML mapping at `path`, then `key=value` overrides (values parsed as YAML)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(read_text(path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping")
        values.update(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    hints = _types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"unknown option {key!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                              + f" (options: {', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], k) for k, v in values.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")
    return cls(**kwargs)


def options_help(cls: type) -> str:
    """One line per option: name, type, default, help (from field metadata)."""
    hints = _types(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = ("(required)" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   else f.default if f.default is not dataclasses.MISSING else f.default_factory())
        name = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"  {f.name:<26} {name:<10} = {default!r}  {f.metadata.get('help', '')}")
    return "\n".join(lines)


def option(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A dataclass field with help text (lists: pass a tuple, it becomes a default_factory list)."""
    if isinstance(default, tuple):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
