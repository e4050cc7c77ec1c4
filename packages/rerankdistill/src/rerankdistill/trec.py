"""TREC formats: topics, qrels and runs, read and written.

Formats (trec_eval's):
  qrels  `qid iter docid rel`             (iter ignored; rel an integer, may be negative)
  run    `qid Q0 docid rank score tag`    (rank ignored by trec_eval: it re-sorts by score)
  topics either `qid<TAB>text` lines or the classic SGML `<top><num>...<title>...</top>` form.

Types used across the package:
  Qrels = {qid: {docid: int gain}},  Run = {qid: {docid: float score}},  Queries = {qid: text}.

Every malformed line raises `TrecFormatError` naming the file and the 1-based line number; nothing is skipped
silently.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]
Queries = dict[str, str]


class TrecFormatError(ValueError):
    """A malformed line in a TREC/BEIR file; the message names the file and the line."""

    def __init__(self, path: str | os.PathLike, line_no: int, message: str, line: str | None = None):
        shown = f": {line.rstrip()[:120]!r}" if line is not None else ""
        super().__init__(f"{os.fspath(path)}:{line_no}: {message}{shown}")
        self.path = os.fspath(path)
        self.line_no = line_no


def open_text(path: str | os.PathLike, mode: str = "rt"):
    """Open a text file, transparently gunzipping `*.gz`."""
    if os.fspath(path).endswith(".gz"):
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8", newline=None)


def _numbered_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    with open_text(path) as f:
        yield from enumerate(f, start=1)


def read_qrels(path: str | os.PathLike) -> Qrels:
    """Read TREC qrels (`qid iter docid rel`, whitespace separated).

    A (qid, docid) pair judged twice raises: trec_eval would silently keep one, and which one is an accident.
    """
    qrels: Qrels = {}
    for no, line in _numbered_lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 4:
            raise TrecFormatError(path, no, f"expected 4 fields `qid iter docid rel`, got {len(parts)}", line)
        qid, _, docid, rel = parts
        try:
            gain = int(rel)
        except ValueError:
            raise TrecFormatError(path, no, f"relevance {rel!r} is not an integer", line) from None
        judged = qrels.setdefault(qid, {})
        if docid in judged:
            raise TrecFormatError(path, no, f"duplicate judgement for query {qid!r} doc {docid!r}", line)
        judged[docid] = gain
    return qrels


def read_run(path: str | os.PathLike) -> Run:
    """Read a TREC run (`qid Q0 docid rank score tag`); the rank column is checked to be an int, then ignored."""
    run: Run = {}
    for no, line in _numbered_lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise TrecFormatError(path, no, f"expected 6 fields `qid Q0 docid rank score tag`, got {len(parts)}",
                                  line)
        qid, _, docid, rank, score, _ = parts
        try:
            int(rank)
            value = float(score)
        except ValueError:
            raise TrecFormatError(path, no, "rank must be an integer and score a number", line) from None
        if not math.isfinite(value):
            raise TrecFormatError(path, no, f"score {score!r} is not finite", line)
        docs = run.setdefault(qid, {})
        if docid in docs:
            raise TrecFormatError(path, no, f"document {docid!r} retrieved twice for query {qid!r}", line)
        docs[docid] = value
    return run


def sorted_ranking(docs: dict[str, float]) -> list[tuple[str, float]]:
    """Documents in trec_eval's order: score descending, ties by docid descending (byte order)."""
    return sorted(docs.items(), key=lambda kv: (-kv[1], _neg_key(kv[0])))


class _neg_key:  # noqa: N801 - a sort key object, used like a function
    """Reverse string order inside an ascending sort key."""

    __slots__ = ("s",)

    def __init__(self, s: str):
        self.s = s.encode()

    def __lt__(self, other: _neg_key) -> bool:
        return self.s > other.s

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _neg_key) and self.s == other.s


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temp file in the same directory, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_run(run: Run, tag: str = "rerankdistill", depth: int | None = None) -> str:
    """The run as TREC text, each query's documents in trec_eval order with ranks 1..n (cut at `depth`)."""
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"tag must be a non-empty string without whitespace, got {tag!r}")
    lines = []
    for qid in sorted(run):
        _check_id(qid, "query id")
        ranking = sorted_ranking(run[qid])
        for rank, (docid, score) in enumerate(ranking[:depth], start=1):
            _check_id(docid, "document id")
            if not math.isfinite(score):
                raise ValueError(f"run score for query {qid!r} doc {docid!r} is not finite: {score!r}")
            lines.append(f"{qid} Q0 {docid} {rank} {score!r} {tag}\n")
    return "".join(lines)


def write_run(run: Run, path: str | os.PathLike, tag: str = "rerankdistill", depth: int | None = None) -> None:
    """Write a TREC run atomically; ranks follow trec_eval's order so any reader sees the same ranking."""
    atomic_write_text(path, format_run(run, tag=tag, depth=depth))


def write_qrels(qrels: Qrels, path: str | os.PathLike) -> None:
    """Write TREC qrels (`qid 0 docid rel`) atomically."""
    lines = []
    for qid in sorted(qrels):
        _check_id(qid, "query id")
        for docid, rel in sorted(qrels[qid].items()):
            _check_id(docid, "document id")
            lines.append(f"{qid} 0 {docid} {int(rel)}\n")
    atomic_write_text(path, "".join(lines))


def _check_id(value: str, what: str) -> None:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} must be non-empty without whitespace for TREC files, got {value!r}")


_TOP = re.compile(r"<top>(.*?)</top>", re.S | re.I)
_NUM = re.compile(r"<num>\s*(?:Number:)?\s*(\S+)", re.I)
_TITLE = re.compile(r"<title>\s*(?:Topic:)?\s*(.*?)\s*(?=<desc>|<narr>|</top>|$)", re.S | re.I)


def read_topics(path: str | os.PathLike) -> Queries:
    """Read topics: SGML `<top>` blocks (title field) or `qid<TAB>text` lines. Empty queries raise."""
    with open_text(path) as f:
        text = f.read()
    queries: Queries = {}
    if "<top>" in text.lower():
        for block in _TOP.findall(text):
            num, title = _NUM.search(block), _TITLE.search(block)
            if num is None or title is None or not title.group(1).strip():
                raise TrecFormatError(path, text[: text.find(block)].count("\n") + 1,
                                      "topic without <num> or a non-empty <title>")
            queries[num.group(1)] = " ".join(title.group(1).split())
        return queries
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        qid, sep, query = line.partition("\t")
        if not sep or not qid.strip():
            raise TrecFormatError(path, no, "expected `qid<TAB>query`", line)
        if not query.strip():
            raise TrecFormatError(path, no, f"empty query for {qid!r}", line)
        if qid in queries:
            raise TrecFormatError(path, no, f"duplicate query id {qid!r}", line)
        queries[qid.strip()] = query.strip()
    return queries


def write_topics(queries: Queries, path: str | os.PathLike) -> None:
    """Write `qid<TAB>text` topics atomically (newlines and tabs inside a query become spaces)."""
    lines = []
    for qid, text in queries.items():
        _check_id(qid, "query id")
        flat = " ".join(text.split())
        if not flat:
            raise ValueError(f"query {qid!r} is empty")
        lines.append(f"{qid}\t{flat}\n")
    atomic_write_text(path, "".join(lines))
