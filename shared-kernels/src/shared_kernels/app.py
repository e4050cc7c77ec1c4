"""Plumbing every app needs, once: the CLI `main` (config file + overrides, exit code 2 on bad input), the
Accelerator with the run directory's trackers, the FSDP2 guard, tracker-safe config values, logging to a file.

Importing this module needs neither torch nor accelerate (they are imported by the functions that use them).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from shared_kernels.errors import UserError, exit_on_user_error, user_error_message
from shared_kernels.runconfig import add_config_arguments, config_from_args, make_trackers

__all__ = ["cli_main", "flat_config", "log_to_file", "make_accelerator", "require_fsdp2", "run_recipe"]


def flat_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as one level of dotted keys with scalar values (what trackers accept): lists and
    other values become their JSON text."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, int | float | str | bool) or v is None else json.dumps(v)
    return out


def log_to_file(path: str | Path, logger_name: str) -> logging.Logger:
    """Send logger `logger_name`'s INFO lines to `path` (appended), replacing an earlier file handler of
    it."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger(logger_name)
    for h in list(logger.handlers):
        if isinstance(h, logging.FileHandler):
            logger.removeHandler(h)
            h.close()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def make_accelerator(run_dir: str | Path, trackers: Sequence[str], project: str) -> Any:
    """`accelerate.Accelerator` on the GPU when there is one (else CPU), no mixed precision (the recipes cast
    themselves), logging to the run directory's trackers (`runconfig.make_trackers`)."""
    import torch
    from accelerate import Accelerator

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="no",
        log_with=make_trackers(run_dir, trackers, project),
        project_dir=str(run_dir),
    )


def require_fsdp2(acc: Any, config_hint: str) -> bool:
    """Refuse FSDP version 1 (flat parameter buffers the recipes cannot gather); True under FSDP2.

    Args:
        config_hint: the app's FSDP2 accelerate config, named in the error.
    """
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.FSDP:
        return False
    if not acc.is_fsdp2:
        raise ValueError(f"FSDP version 1 is not supported: set fsdp_config.fsdp_version: 2 ({config_hint})")
    return True


def run_recipe(recipe: Any) -> Any:
    """setup() -> train() -> evaluate() -> cleanup() (cleanup also after an error); evaluate's result."""
    recipe.setup()
    try:
        recipe.train()
        return recipe.evaluate()
    finally:
        recipe.cleanup()


def cli_main(
    prog: str,
    description: str,
    config_cls: type,
    run: Callable[..., None],
    argv: Sequence[str] | None = None,
    user_errors: tuple[type[BaseException], ...] = (),
    example: str = "train.lr=1e-4",
    default_config: Callable[[], Mapping[str, Any]] | None = None,
    extra_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> int:
    """An app's `main`: parse `--config FILE`, `--print-config`, `--no-progress` and `key=value` overrides,
    build the config, call `run(cfg, progress)` (which prints the app's closing lines).

    `example` is the override shown in --help (one the config accepts); `default_config()`, when given, is
    the base mapping used without --config (an app's offline default, kept as data). `extra_options` adds
    a command's own options beside the config's ({"--seeds": argparse keyword arguments}); their values
    reach `run` as keyword arguments named by each option's dest (`run(cfg, progress, seeds=[0, 1])`).

    A user error -- a bad config value or file (`ConfigError`), any `shared_kernels.errors.UserError` found
    while running (unreadable input, a non-finite loss, a stale checkpoint, a teacher server's refusal), or an
    exception of `user_errors` -- prints ONE line `prog: error: ...` on stderr and returns 2; anything else
    is a bug and keeps its traceback.

    Returns:
        the exit code: 0, or 2 after a user error.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser, config_cls, example=example)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    extras = [parser.add_argument(flag, **kwargs).dest for flag, kwargs in (extra_options or {}).items()]
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))

    def go() -> int:
        base = default_config() if default_config is not None and args.config is None else None
        try:
            cfg: Any = config_from_args(config_cls, args, base=base)
            run(cfg, not args.no_progress, **{dest: getattr(args, dest) for dest in extras})
        except user_errors as err:
            raise _AppUserError(user_error_message(err)) from err
        return 0

    return exit_on_user_error(prog, go)


class _AppUserError(UserError):
    """An app-specific user error (one of `cli_main`'s `user_errors`), reported as one line."""
