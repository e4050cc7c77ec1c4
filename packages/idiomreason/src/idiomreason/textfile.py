"""Reading a user's text file so that every way it can be unreadable is one clear error naming the file.

`read_text` refuses what would otherwise pass silently or fail deep inside a parser: a file that is not
UTF-8 (latin-1, UTF-16 with or without its byte-order mark, binary), and NUL bytes (which Python's csv
module reads as ordinary characters). The error names the file, the 1-based line and what was found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class TextFileError(ValueError):
    """A file that cannot be read as UTF-8 text (the message names the file and line)."""


def decode_text(data: bytes, where: str | Path) -> str:
    """`data` decoded as UTF-8 (a leading BOM dropped), or TextFileError naming `where` and the line."""
    if data.startswith(_UTF16_BOMS):
        raise TextFileError(f"{where}: UTF-16 text (byte-order mark); save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        kind = "UTF-16 or binary data" if data[:4096].count(b"\x00") > 1 else "a NUL byte"
        raise TextFileError(f"{where}:{line}: {kind} (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TextFileError(
            f"{where}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}; latin-1 or binary?); "
            "save it as UTF-8"
        ) from None


def read_text(path: str | Path) -> str:
    """The UTF-8 text of `path` (see the module docstring); FileNotFoundError / IsADirectoryError name it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return decode_text(path.read_bytes(), path)


def load_yaml(path: str | Path) -> Any:
    """The YAML document in `path` (safe_load); a syntax error names the file and line."""
    import yaml

    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TextFileError(f"{where}: invalid YAML ({problem})") from None
