"""Reading UTF-8 text files (optionally gzipped) so that every way a file can be wrong is one clear error.

Binary data, Latin-1 or UTF-16 text, and a truncated or corrupt `.gz` raise `FileFormatError` naming the file
(and the line where the bad bytes are), instead of a bare `UnicodeDecodeError` / `EOFError` that names
neither. A NUL byte is binary data (UTF-16 text without a byte-order mark decodes as UTF-8 full of NULs).
Torch-free.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from typing import Any

from shared_kernels.errors import FileFormatError

__all__ = ["json_lines", "numbered_lines", "read_text"]

_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _why(data: bytes, err: UnicodeDecodeError) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "is UTF-16 text (byte-order mark); save it as UTF-8"
    return f"is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); save it as UTF-8"


def _check_line(path: str | os.PathLike, line: str, line_no: int) -> str:
    if "\x00" in line:
        raise FileFormatError(path, "holds a NUL byte: binary data or UTF-16 text, not UTF-8 text", line_no)
    return line


def read_text(path: str | os.PathLike) -> str:
    """The whole file as text (`*.gz` gunzipped), strict UTF-8 without NUL bytes (a UTF-8 BOM dropped).

    Raises:
        FileNotFoundError when missing; FileFormatError (a ValueError) naming the file (and line) otherwise.
    """
    with open(path, "rb") as f:
        data = f.read()
    if os.fspath(path).endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except _GZIP_ERRORS as err:
            raise FileFormatError(
                path, f"truncated or corrupt gzip file ({type(err).__name__}: {err})"
            ) from None
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark (spreadsheet exports) is dropped
    except UnicodeDecodeError as err:
        raise FileFormatError(path, _why(data, err), data[: err.start].count(b"\n") + 1) from None
    if "\x00" in text:
        _check_line(path, "\x00", text[: text.index("\x00")].count("\n") + 1)
    return text


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file (`*.gz` gunzipped), streamed; errors as `read_text`.
    Lines keep their `\n`; a `\r\n` ending reads as `\n` (as text mode would)."""
    line_no = 0
    try:
        with gzip.open(path, "rb") if os.fspath(path).endswith(".gz") else open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):  # noqa: B007 - line_no is read after a failure
                if line_no == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                    raise FileFormatError(path, "is UTF-16 text (byte-order mark); save it as UTF-8", 1)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise FileFormatError(
                        path,
                        f"is not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                        f"{err.start + 1}); save it as UTF-8",
                        line_no,
                    ) from None
                if line_no == 1 and line.startswith("\ufeff"):
                    line = line[1:]  # a UTF-8 byte-order mark
                if line.endswith("\r\n"):
                    line = line[:-2] + "\n"
                yield line_no, _check_line(path, line, line_no)
    except _GZIP_ERRORS as err:
        raise FileFormatError(
            path,
            f"truncated or corrupt gzip file (after {line_no} complete lines) ({type(err).__name__}: {err})",
        ) from None


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, str, dict[str, Any] | None, str]]:
    """(line number, line, object, why) for each non-blank line of a JSON-lines file (`*.gz` gunzipped;
    errors as `numbered_lines`): the object and "" for a JSON object, else None and why the line is not one
    ("invalid JSON (...)", "expected a JSON object, got list"). The caller raises or skips."""
    for line_no, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.rstrip("\r\n"))  # an error's column is then on this line, not the next
        except json.JSONDecodeError as e:
            yield line_no, line, None, f"invalid JSON ({e.msg} at column {e.colno})"
            continue
        if not isinstance(obj, dict):
            yield line_no, line, None, f"expected a JSON object, got {type(obj).__name__}"
            continue
        yield line_no, line, obj, ""
