"""Append-only JSON-lines record files that survive `kill -9`: the prediction cache and the definitions.

Each record is one line, written with a single `write` of complete lines followed by `flush` + `fsync`, so
after a crash the file holds whole records plus at most one partial last line. Opening the store drops
that partial line (truncating the file back to the last newline) before anything is appended, so a
resumed run neither loses a finished record nor glues a new one onto a fragment. Records are keyed; a key
already present is never written again, so re-runs add nothing twice. An exclusive `flock` on the file
(`shared_kernels.appendfile`, shared with rerankdistill's teacher store) keeps two runs from appending to it
at once (the lock dies with the process, so `kill -9` leaves none).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from shared_kernels.appendfile import AppendOnlyFile, FileLockedError

logger = logging.getLogger("idiomreason")

Key = tuple[str, ...]


StoreLockedError = FileLockedError  # another running process holds the store (a UserError)


class JsonlStore:
    """An exclusive, append-only, keyed JSON-lines file. Use as a context manager (or call `close`).

    Args:
        path: the file (created with its parent folders if missing).
        key_fields: the record fields whose values form the key.
    """

    def __init__(self, path: str | Path, key_fields: tuple[str, ...]):
        self.path = Path(path)
        self.key_fields = key_fields
        self._file = AppendOnlyFile(
            self.path
        )  # raises FileLockedError (a RuntimeError) when another run holds it
        self.records: dict[Key, dict[str, Any]] = {}
        self.duplicates = 0
        self.dropped_partial_line = False
        try:
            self._load()
        except BaseException:
            self._file.close()
            raise

    def key(self, record: dict[str, Any]) -> Key:
        try:
            return tuple(str(record[f]) for f in self.key_fields)
        except KeyError as e:
            raise ValueError(
                f"record lacks key field {e.args[0]!r} (key fields: {self.key_fields})"
            ) from None

    def _load(self) -> None:
        data = self._file.read_bytes()
        complete = data.rfind(b"\n") + 1  # bytes up to and including the last newline
        if complete < len(data):
            logger.warning(
                "%s: dropping a partial last line of %d bytes (an interrupted write)",
                self.path,
                len(data) - complete,
            )
            self._file.truncate_to(complete)
            self.dropped_partial_line = True
        for line_no, line in enumerate(data[:complete].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{self.path}:{line_no}: not a JSON record ({e.msg}); the file was edited or "
                    "corrupted other than by an interrupted write"
                ) from None
            key = tuple(
                str(record.get(f, "")) for f in self.key_fields
            )  # older records lack newer key fields
            if key in self.records:
                self.duplicates += 1
                continue
            self.records[key] = record
        if self.duplicates:
            logger.warning(
                "%s: %d duplicate records ignored (the first of each key is kept)", self.path, self.duplicates
            )

    def __contains__(self, key: Key) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: Key) -> dict[str, Any] | None:
        return self.records.get(key)

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Write the records whose keys are new, durably; returns how many were written."""
        lines, fresh = [], {}
        for record in records:
            key = self.key(record)
            if key in self.records or key in fresh:
                continue
            fresh[key] = record
            lines.append(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        if not lines:
            return 0
        self._file.append("".join(lines).encode("utf-8"))
        self.records.update(fresh)
        return len(lines)

    def select(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [r for r in self.records.values() if predicate(r)]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PREDICTION_KEY = ("model", "condition", "dataset", "example_id", "generation", "prompt")
DEFINITION_KEY = ("model", "template", "expression")


def prediction_store(path: str | Path) -> JsonlStore:
    """The prediction cache: one record per (model, condition, dataset, example_id, generation settings
    hash, prompt hash); see `evaluate`."""
    return JsonlStore(path, PREDICTION_KEY)


def definition_store(path: str | Path) -> JsonlStore:
    """Generated definitions: one record per (model, template, normalised expression)."""
    return JsonlStore(path, DEFINITION_KEY)


def read_records(path: str | Path, key_fields: tuple[str, ...] = PREDICTION_KEY) -> dict[Key, dict[str, Any]]:
    """The complete records of a store file by key (first of each key), without locking it: reports can
    read while a run appends. A partial last line is ignored, not removed."""
    out: dict[Key, dict[str, Any]] = {}
    with open(path, "rb") as f:
        data = f.read()
    for line_no, line in enumerate(data[: data.rfind(b"\n") + 1].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not a JSON record ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}:{line_no}: not a JSON record (a {type(record).__name__}, not an object)"
            )
        out.setdefault(tuple(str(record.get(f, "")) for f in key_fields), record)
    return out
