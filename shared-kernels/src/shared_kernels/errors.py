"""User errors: a mistake in the user's input (an option, a file, a line) as opposed to a bug.

Every CLI catches `UserError` in its `main` (through `exit_on_user_error`) and prints ONE line,
`prog: error: message`, on stderr with exit code 2; anything else is a bug and keeps its traceback.
Torch-free.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

__all__ = [
    "USER_ERRORS",
    "FileFormatError",
    "OneLineParser",
    "UserError",
    "exit_on_user_error",
    "positive",
    "refuse_overwriting_inputs",
    "user_error_message",
]

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input; its message names the option, file (and line) and what is allowed."""


class FileFormatError(UserError, ValueError):
    """A file that cannot be read as the format it should be; the message starts with `path[:line]:`."""

    def __init__(self, path: str | os.PathLike, message: str, line_no: int | None = None):
        where = os.fspath(path) + (f":{line_no}" if line_no is not None else "")
        super().__init__(f"{where}: {message}")
        self.path = os.fspath(path)
        self.line_no = line_no


# What a CLI reports as one line: our own user errors and the OS's "that file is not there / not readable".
USER_ERRORS = (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def refuse_overwriting_inputs(
    outputs: dict[str, str | os.PathLike], inputs: dict[str, str | os.PathLike]
) -> None:
    """Raise `UserError` when an output path is an input, holds one (an output folder), or is an existing file
    inside an input folder.

    Args:
        outputs: option name -> path the command will write (empty values are skipped).
        inputs: option name -> path the command reads (empty values and paths that do not exist are skipped).
    """
    real_inputs = {
        name: os.path.realpath(path) for name, path in inputs.items() if path and os.path.exists(path)
    }
    for out_name, out in outputs.items():
        if not out:
            continue
        real_out = os.path.realpath(out)
        for in_name, real_in in real_inputs.items():
            inside_input_folder = (
                os.path.isdir(real_in)
                and os.path.exists(real_out)
                and real_out.startswith(real_in.rstrip(os.sep) + os.sep)
            )  # an existing file of an input folder
            if (
                real_in == real_out
                or real_in.startswith(real_out.rstrip(os.sep) + os.sep)
                or inside_input_folder
            ):
                raise UserError(
                    f"{out_name}={os.fspath(out)!r} would overwrite the input {in_name}={real_in!r}; "
                    "choose another output path"
                )


def user_error_message(err: BaseException) -> str:
    """The error as one line (newlines of wrapped messages folded)."""
    return " ".join(str(err).split()) or type(err).__name__


def exit_on_user_error(prog: str, fn: Callable[[], T]) -> T | int:
    """Run `fn()`; on a `UserError` (or a missing/unreadable file) print one line on stderr and return 2."""
    try:
        return fn()
    except USER_ERRORS as err:
        print(f"{prog}: error: {user_error_message(err)}", file=sys.stderr)
        return 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage block) with exit code 2: the parser of every
    CLI that is not a config-file app (those use `shared_kernels.app.cli_main`)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive(kind: type, minimum: float = 1) -> Callable[[str], object]:
    """An argparse type: a finite `kind` >= minimum (> 0 for floats)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        ok = math.isfinite(value) and (value > 0 if kind is float else value >= minimum)
        if not ok:
            want = "a finite number > 0" if kind is float else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {want}")
        return value

    parse.__name__ = f"{kind.__name__} >= {minimum}" if kind is int else "positive float"
    return parse
