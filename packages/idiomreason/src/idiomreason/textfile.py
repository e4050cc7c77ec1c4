"""Reading a user's text and YAML files so that every way one can be unreadable is one clear error.

Text goes through the workspace's one reader, `shared_kernels.textfiles.read_text` (strict UTF-8, a UTF-8
byte-order mark dropped; Latin-1, UTF-16, binary data and NUL bytes -- which Python's csv module would read
as ordinary characters -- raise `FileFormatError` naming the file and line). This module adds the YAML step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared_kernels.errors import FileFormatError
from shared_kernels.textfiles import read_text

__all__ = ["TextFileError", "load_yaml", "read_text"]

TextFileError = FileFormatError  # a ValueError and a UserError; the message starts with `path[:line]:`


def load_yaml(path: str | Path) -> Any:
    """The YAML document in `path` (safe_load); a syntax error names the file and line."""
    import yaml

    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FileFormatError(
            path, f"invalid YAML ({problem})", mark.line + 1 if mark is not None else None
        ) from None
