"""Run configuration for the apps: a YAML file plus `key=value` overrides into a typed dataclass, and the run
directory the run writes (resolved config, metrics through accelerate's trackers and a JSONL file).

A config is a (possibly nested) dataclass whose fields are declared with `option(default, "help text")`.
`load_config(cls, path, overrides)` reads the YAML mapping, applies overrides such as `train.lr=1e-4` or
`models=[a,b]`, checks every value against the field's type (int, float, bool, str, Path, Literal, Optional,
list/tuple, dict, nested dataclass), rejects unknown keys with the nearest valid name, and finally runs the
dataclass's `__post_init__` (where each app checks value ranges). `options_help(cls)` lists every option with
its type, default and help for `--help`.

Only the standard library and PyYAML are needed; accelerate is imported lazily by `make_trackers`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from shared_kernels.errors import UserError
from shared_kernels.textfiles import read_text

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "JSONLTracker",
    "add_config_arguments",
    "config_from_args",
    "config_to_dict",
    "load_config",
    "make_trackers",
    "option",
    "options_help",
    "write_json_atomic",
    "write_text_atomic",
    "write_yaml_atomic",
]


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the config dataclass (names the key and what fits)."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a help string shown by `--help` (`default_factory` for lists, dicts and
    dataclasses)."""
    if default is not dataclasses.MISSING and default_factory is not dataclasses.MISSING:
        raise ValueError("option: give default or default_factory, not both")
    if isinstance(default, list | dict | set):
        raise ValueError("option: use default_factory for a mutable default")
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------- type checks


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = ", ".join(_type_name(a) for a in args)
        return f"{origin.__name__ if hasattr(origin, '__name__') else origin}[{inner}]"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _mismatch(value: Any, tp: Any, key: str) -> ConfigError:
    """The error for a value that does not fit its annotation (names the key, the type and the value)."""
    return ConfigError(
        f"config key {key!r}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first member of `X | Y | None` that accepts `value` (None only where the union allows it)."""
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise _mismatch(value, tp, key)
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError:
            continue
    raise _mismatch(value, tp, key)


def _coerce_literal(value: Any, tp: Any, key: str) -> Any:
    """One of the literal's values, of the same type (`1` is not `True`, `"1"` is not `1`)."""
    if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
        return value
    raise _mismatch(value, tp, key)


def _coerce_dataclass(value: Any, tp: type[Any], key: str) -> Any:
    """A nested config: an instance as is, a mapping built field by field (keys named `key.field`)."""
    if isinstance(value, tp):
        return value
    if not isinstance(value, Mapping):
        raise _mismatch(value, tp, key)
    return _build(tp, value, prefix=key + ".")


def _coerce_float(value: Any, tp: Any, key: str) -> float:
    """An int or float (never a bool) as float; a string that parses as one too."""
    if isinstance(value, bool):
        raise _mismatch(value, tp, key)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise _mismatch(value, tp, key) from None
    raise _mismatch(value, tp, key)


def _coerce_scalar(value: Any, tp: type[Any], key: str) -> Any:
    """bool, int (never a bool), float (see `_coerce_float`), str, or Path (from a str)."""
    if tp is float:
        return _coerce_float(value, tp, key)
    if tp is Path and isinstance(value, str | Path):
        return Path(value)
    exact = {bool: bool, int: int, str: str, Path: Path}[tp]
    if isinstance(value, exact) and not (tp is int and isinstance(value, bool)):
        return value
    raise _mismatch(value, tp, key)


def _coerce_list(value: Any, tp: Any, key: str) -> list[Any]:
    """`list[X]` or `Sequence[X]`: a list or tuple, each item checked as X (keys named `key[i]`)."""
    if not isinstance(value, list | tuple):
        raise _mismatch(value, tp, key)
    args = typing.get_args(tp)
    item = args[0] if args else Any
    return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_tuple(value: Any, tp: Any, key: str) -> tuple[Any, ...]:
    """`tuple[X, ...]` (any length) or `tuple[X, Y]` (that many items, each of its type)."""
    if not isinstance(value, list | tuple):
        raise _mismatch(value, tp, key)
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if args and len(args) != len(value):
        raise ConfigError(f"config key {key!r}: expected {len(args)} items, got {len(value)}")
    items = args or [Any] * len(value)
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, items)))


def _coerce_dict(value: Any, tp: Any, key: str) -> dict[Any, Any]:
    """`dict[K, V]`: a mapping, each key checked as K and each value as V (named `key.k`)."""
    if not isinstance(value, Mapping):
        raise _mismatch(value, tp, key)
    kt, vt = typing.get_args(tp) or (Any, Any)
    return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}


_SCALARS = (bool, int, float, str, Path)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert where lossless (int -> float, str -> Path)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        return _coerce_literal(value, tp, key)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _coerce_dataclass(value, tp, key)
    if tp in _SCALARS:
        return _coerce_scalar(value, tp, key)
    if origin in (list, Sequence) or tp is list:
        return _coerce_list(value, tp, key)
    if origin is tuple:
        return _coerce_tuple(value, tp, key)
    if origin is dict or tp is dict:
        return _coerce_dict(value, tp, key)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _mismatch(value, tp, key)
    raise ConfigError(f"config key {key!r}: unsupported annotation {tp!r}")


def _init_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of dataclass `cls` that its `__init__` takes."""
    return [f for f in dataclasses.fields(cls) if f.init]


def _field_types(cls: type) -> dict[str, Any]:
    """Each init field's name -> its resolved annotation."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in _init_fields(cls)}


def _build(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    types_ = _field_types(cls)
    unknown = [k for k in values if k not in types_]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(types_), n=1)
        hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown config key {prefix + str(k)!r}{hint}; "
            f"allowed keys here: {', '.join(prefix + n for n in types_)}"
        )
    kwargs = {name: _coerce(v, types_[name], prefix + name) for name, v in values.items()}
    missing = [
        f.name
        for f in _init_fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(prefix + m for m in missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # __post_init__ range checks
        where = f" in {prefix[:-1]!r}" if prefix else ""
        raise ConfigError(f"invalid config{where}: {err}") from err


# ------------------------------------------------------------------------------------------ load and dump


def _is_plain(tp: Any) -> bool:
    plain = {str, Path}
    return tp in plain or (
        typing.get_origin(tp) in (Union, types.UnionType) and set(typing.get_args(tp)) - {type(None)} <= plain
    )


def _override_value(cls: type, dotted: str, raw: str) -> Any:
    """Parse an override's text: kept verbatim for str/Path fields, YAML for everything else; a list field
    also takes comma-separated items (`runs=a=x.run,b=y.run`; its items parsed by the same rule)."""
    tp: Any = cls
    for part in dotted.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return yaml.safe_load(raw)
        tp = _field_types(tp).get(part, Any)
    if _is_plain(tp):
        return None if raw in ("null", "None", "~") and type(None) in typing.get_args(tp) else raw
    if typing.get_origin(tp) in (list, Sequence) and not raw.lstrip().startswith("["):
        (item,) = typing.get_args(tp) or (Any,)
        return [x if _is_plain(item) else yaml.safe_load(x) for x in raw.split(",") if x]
    return yaml.safe_load(raw)


def _apply_override(tree: dict[str, Any], cls: type, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
    dotted, raw = item.split("=", 1)
    dotted = dotted.strip()
    if not dotted:
        raise ConfigError(f"override {item!r} has an empty key")
    value = _override_value(cls, dotted, raw)
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None or not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> T:
    """Build `cls` from `base` (a mapping, e.g. an app's embedded default), then the YAML file, then the
    overrides.

    Args:
        cls: a dataclass type (fields may be nested dataclasses).
        path: a YAML file holding a mapping (or None).
        overrides: `key=value` strings; dotted keys reach nested dataclasses; values parse as YAML
            (strings stay verbatim for str/Path fields).
        base: values applied before the file.
    Raises:
        ConfigError (a ValueError) naming the key, the value given and what is allowed.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"cls must be a dataclass type, got {cls!r}")
    tree: dict[str, Any] = _deep_copy(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(read_text(path))  # binary, Latin-1 or UTF-16: one line naming the file
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
        _deep_merge(tree, loaded)
    for item in overrides:
        _apply_override(tree, cls, item)
    return _build(cls, tree)


def _deep_copy(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _deep_merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = _deep_copy(v) if isinstance(v, Mapping) else v


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON-safe data (Paths become strings, tuples lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def options_help(cls: type) -> str:
    """Every option of `cls` (nested ones dotted) with its type, default and help, one per line."""
    lines: list[str] = []

    def walk(c: type, prefix: str) -> None:
        types_ = _field_types(c)
        for f in dataclasses.fields(c):
            if not f.init:
                continue
            tp = types_[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            text = f.metadata.get("help", "")
            lines.append(f"  {prefix + f.name:<32} {_type_name(tp)} = {config_to_dict(default)!r}")
            if text:
                lines.append(f"      {text}")

    walk(cls, "")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the CLI


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, example: str = "train.lr=1e-4") -> None:
    """Add `--config PATH`, `--print-config` and positional `key=value` overrides; list options in --help.
    `example` is the override shown in the help (use one that `cls` accepts)."""
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML config file (its values over the defaults)"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"overrides, e.g. {example}")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        (parser.epilog or "") + "\noptions (set in the YAML file or as key=value):\n" + options_help(cls)
    )


def config_from_args(cls: type[T], args: argparse.Namespace, base: Mapping[str, Any] | None = None) -> T:
    """The config from parsed `add_config_arguments` arguments (prints it and exits on --print-config)."""
    cfg = load_config(cls, args.config, args.overrides, base=base)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        raise SystemExit(0)
    return cfg


# ------------------------------------------------------------------------------------- run-dir outputs


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """The one atomic file writer: `write(tmp)` fills a temp file in `path`'s directory, which is fsynced and
    `os.replace`d onto `path`, so readers see the old file or the new one, never a partial one. The temp
    file is removed if `write` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Atomically write `text` as UTF-8, newlines untranslated (`write_atomic`)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

    write_atomic(path, write)


def save_figure_atomic(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure (format from `path`'s suffix; `savefig_kwargs` such as dpi go to
    `fig.savefig`) atomically (`write_atomic`), then close it. Returns the path."""
    import matplotlib.pyplot as plt

    fmt = Path(path).suffix.lstrip(".") or "png"
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))
    finally:
        plt.close(fig)
    return Path(path)


def write_yaml_atomic(path: str | Path, data: Any) -> None:
    """Atomically write `data` (a dataclass config or plain data) as YAML."""
    if dataclasses.is_dataclass(data):
        data = config_to_dict(data)
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class JSONLTracker:
    """An accelerate tracker appending one JSON object per `log` call to `<run_dir>/metrics.jsonl`.

    Built lazily as a subclass of `accelerate.tracking.GeneralTracker` by `make_trackers`, so that this module
    does not import accelerate. Lines are flushed as written: a killed run keeps every finished line, and a
    resumed run appends (drop lines with step > the resumed step first with `truncate_after`).
    """

    @staticmethod
    def truncate_after(path: str | Path, step: int, upto: int | None = None) -> None:
        """Drop lines whose "step" is > `step` (and <= `upto` when given: a later phase's rows, logged on the
        same step axis, are kept), used when a run resumes from a checkpoint."""
        path = Path(path)
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                logged = json.loads(line).get("step")
                # rows logged without a step are kept
                if not isinstance(logged, int) or logged <= step or (upto is not None and logged > upto):
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        write_text_atomic(path, "".join(k + "\n" for k in keep))


def _jsonl_tracker_class():
    from accelerate.tracking import GeneralTracker, on_main_process

    class _JSONL(GeneralTracker):
        name = "jsonl"
        requires_logging_directory = True
        main_process_only = True

        def __init__(self, run_name: str, logging_dir: str | Path):
            super().__init__()
            self.run_name = run_name
            self.path = Path(logging_dir) / "metrics.jsonl"
            self.path.parent.mkdir(parents=True, exist_ok=True)

        @property
        def tracker(self):
            return self.path

        @on_main_process
        def store_init_configuration(self, values: dict) -> None:
            pass  # the resolved config is written as config.yaml by the app

        @on_main_process
        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            row = {"step": step, **{k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()}}
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()

    return _JSONL


def make_trackers(run_dir: str | Path, requested: Sequence[str] = ("auto",), run_name: str = "run") -> list:
    """Trackers for `Accelerator(log_with=...)`: always the JSONL file; TensorBoard when installed (for
    "auto") or asked for ("tensorboard"); Weights & Biases only when asked ("wandb").

    Raises:
        ValueError: for an unknown tracker name, or one asked for explicitly that is not installed.
    """
    import importlib.util

    known = {"auto", "none", "tensorboard", "wandb"}
    for name in requested:
        if name not in known:
            raise ValueError(f"trackers: unknown tracker {name!r}; allowed: {sorted(known)}")
    out: list = [_jsonl_tracker_class()(run_name, run_dir)]
    if "none" in requested:
        return out
    has_tb = (
        importlib.util.find_spec("tensorboard") is not None
        or importlib.util.find_spec("tensorboardX") is not None
    )
    if "tensorboard" in requested and not has_tb:
        raise ValueError(
            "trackers: 'tensorboard' asked for but neither tensorboard nor tensorboardX is installed"
        )
    if "tensorboard" in requested or ("auto" in requested and has_tb):
        out.append("tensorboard")
    if "wandb" in requested:
        if importlib.util.find_spec("wandb") is None:
            raise ValueError("trackers: 'wandb' asked for but wandb is not installed (pip install wandb)")
        out.append("wandb")
    return out
