"""One example schema for every idiom dataset, and the bookkeeping of rows that could not be read.

Every loader returns an `Examples` list of `Example`s. A row that cannot be read (missing column, unknown
label, bad JSON) is a `RowProblem` naming the file and the line; the loader either raises `MalformedRowError`
at the first one (`on_error="raise"`, the default) or skips it and keeps it in `Examples.skipped`
(`on_error="skip"`). Rows left out by design (VNC-Tokens' unknown `Q` label, MAGPIE's non-idiomatic/literal
senses) are counted in `Examples.excluded`. Nothing is dropped silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LABELS: tuple[str, str] = ("idiomatic", "literal")
OnError = Literal["raise", "skip"]

logger = logging.getLogger("idiomreason")


@dataclass(frozen=True)
class Example:
    """One usage of a potentially idiomatic expression in context.

    Attributes:
        id: unique within the dataset (the source's id where it has one, else `<file stem>:<line>`).
        language: lower-case ISO 639-1 code ("en", "pt", "gl").
        expression: the multiword expression in dictionary form ("spill the beans", "blow smoke").
        target: the sentence that contains the expression.
        previous / next: the neighbouring sentences where the source has them, else "".
        label: "idiomatic", "literal", or None for unlabelled rows (a test set without gold labels).
        split: the source's split name ("train_zero_shot", "dev", "test", ...), "" when it has none.
        dataset: the loader name ("semeval2022-2a", "magpie", "vnc-tokens", "generic", "hf").
        source: the source row's original fields, kept verbatim for analysis.
    """

    id: str
    language: str
    expression: str
    target: str
    label: str | None
    previous: str = ""
    next: str = ""
    split: str = ""
    dataset: str = ""
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.label is not None and self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS} or None, got {self.label!r}")


@dataclass(frozen=True)
class RowProblem:
    """A row that could not be turned into an `Example`."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class MalformedRowError(ValueError):
    """A malformed input row, with the file and line it came from."""

    def __init__(self, problem: RowProblem):
        super().__init__(
            f"malformed row at {problem} (pass on_error='skip' to skip such rows and count them)"
        )
        self.problem = problem


class Examples(list):
    """A list of `Example`s plus what was skipped (`skipped`: RowProblems) or excluded by design
    (`excluded`: reason -> count)."""

    def __init__(self, items=(), skipped: list[RowProblem] | None = None, excluded: Counter | None = None):
        super().__init__(items)
        self.skipped: list[RowProblem] = list(skipped or [])
        self.excluded: Counter = Counter(excluded or {})

    def label_counts(self) -> Counter:
        return Counter(ex.label for ex in self)

    def summary(self) -> str:
        parts = [f"{len(self)} examples"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} malformed rows skipped")
        parts += [f"{n} excluded ({reason})" for reason, n in sorted(self.excluded.items())]
        return ", ".join(parts)


class RowSink:
    """Collects examples and row problems under one `on_error` policy while a loader reads a file."""

    def __init__(self, on_error: OnError):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.examples = Examples()
        self._first_seen: dict[str, str] = {}

    def problem(self, path: str | Path, line: int, reason: str) -> None:
        problem = RowProblem(str(path), line, reason)
        if self.on_error == "raise":
            raise MalformedRowError(problem)
        self.examples.skipped.append(problem)

    def exclude(self, reason: str) -> None:
        self.examples.excluded[reason] += 1

    def add(self, example: Example, path: str | Path, line: int) -> None:
        where = f"{path}:{line}"
        if example.id in self._first_seen:
            self.problem(path, line, f"duplicate id {example.id!r} (first at {self._first_seen[example.id]})")
            return
        self._first_seen[example.id] = where
        self.examples.append(example)

    def finish(self) -> Examples:
        out = self.examples
        if out.skipped:
            shown = "; ".join(str(p) for p in out.skipped[:5])
            more = f" (and {len(out.skipped) - 5} more)" if len(out.skipped) > 5 else ""
            logger.warning("skipped %d malformed rows: %s%s", len(out.skipped), shown, more)
        return out
