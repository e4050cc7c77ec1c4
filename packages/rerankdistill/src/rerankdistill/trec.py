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

import math
import os
import re

from shared_kernels.errors import FileFormatError
from shared_kernels.runconfig import write_text_atomic
from shared_kernels.textfiles import numbered_lines, read_text

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]
Queries = dict[str, str]


class TrecFormatError(FileFormatError):
    """A malformed line in a TREC/BEIR file; the message names the file and the line (a `UserError`)."""

    def __init__(self, path: str | os.PathLike, line_no: int | None, message: str, line: str | None = None):
        shown = f": {line.rstrip()[:120]!r}" if line is not None else ""
        super().__init__(path, f"{message}{shown}", line_no)


def read_qrels(path: str | os.PathLike) -> Qrels:
    """Read TREC qrels (`qid iter docid rel`, whitespace separated).

    A (qid, docid) pair judged twice raises: trec_eval would silently keep one, and which one is an accident.
    """
    qrels: Qrels = {}
    for no, line in numbered_lines(path):
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
    if not qrels:
        raise TrecFormatError(path, None, "holds no judgements (an empty qrels file)")
    return qrels


def read_run(path: str | os.PathLike) -> Run:
    """Read a TREC run (`qid Q0 docid rank score tag`); the rank column must be an int and is then
    ignored."""
    run: Run = {}
    for no, line in numbered_lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise TrecFormatError(
                path, no, f"expected 6 fields `qid Q0 docid rank score tag`, got {len(parts)}", line
            )
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


def write_run(
    run: Run, path: str | os.PathLike, tag: str = "rerankdistill", depth: int | None = None
) -> None:
    """Write a TREC run atomically; ranks follow trec_eval's order so any reader sees the same ranking."""
    write_text_atomic(path, format_run(run, tag=tag, depth=depth))


def write_qrels(qrels: Qrels, path: str | os.PathLike) -> None:
    """Write TREC qrels (`qid 0 docid rel`) atomically."""
    lines = []
    for qid in sorted(qrels):
        _check_id(qid, "query id")
        for docid, rel in sorted(qrels[qid].items()):
            _check_id(docid, "document id")
            lines.append(f"{qid} 0 {docid} {int(rel)}\n")
    write_text_atomic(path, "".join(lines))


def _check_id(value: str, what: str) -> None:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} must be non-empty without whitespace for TREC files, got {value!r}")


_TOP_TAG = re.compile(r"<(/?)top>", re.I)
_NUM = re.compile(r"<num>\s*(?:Number:)?\s*(\S+)", re.I)
_TITLE = re.compile(r"<title>\s*(?:Topic:)?\s*(.*?)\s*(?=<desc>|<narr>|</top>|$)", re.S | re.I)


def _sgml_blocks(path: str | os.PathLike, text: str) -> list[tuple[int, str]]:
    """(line of `<top>`, body) of each `<top>...</top>` block; an unclosed or stray tag raises, naming its
    line."""
    blocks, opened = [], None
    for tag in _TOP_TAG.finditer(text):
        line_no = text.count("\n", 0, tag.start()) + 1
        if not tag.group(1):
            if opened is not None:
                raise TrecFormatError(path, opened[0], "<top> not closed by </top> before the next <top>")
            opened = (line_no, tag.end())
        elif opened is None:
            raise TrecFormatError(path, line_no, "</top> without an opening <top>")
        else:
            blocks.append((opened[0], text[opened[1] : tag.start()]))
            opened = None
    if opened is not None:
        raise TrecFormatError(path, opened[0], "<top> not closed by </top>: the file is truncated")
    return blocks


def read_topics(path: str | os.PathLike) -> Queries:
    """Read topics: SGML `<top>` blocks (title field) or `qid<TAB>text` lines.

    An empty query, a repeated query id, an unclosed `<top>` (a truncated file) or a file without any topic
    raises `TrecFormatError` naming the file and the line.
    """
    text = read_text(path)
    queries: Queries = {}
    if "<top>" in text.lower():
        for line_no, block in _sgml_blocks(path, text):
            num, title = _NUM.search(block), _TITLE.search(block)
            if num is None or title is None or not title.group(1).strip():
                raise TrecFormatError(path, line_no, "topic without <num> or a non-empty <title>")
            if num.group(1) in queries:
                raise TrecFormatError(path, line_no, f"duplicate topic number {num.group(1)!r}")
            queries[num.group(1)] = " ".join(title.group(1).split())
    else:
        for no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            qid, sep, query = line.partition("\t")
            if not sep or not qid.strip():
                raise TrecFormatError(path, no, "expected `qid<TAB>query`", line)
            if not query.strip():
                raise TrecFormatError(path, no, f"empty query for {qid!r}", line)
            if qid.strip() in queries:
                raise TrecFormatError(path, no, f"duplicate query id {qid!r}", line)
            queries[qid.strip()] = query.strip()
    if not queries:
        raise TrecFormatError(path, None, "holds no topics")
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
    write_text_atomic(path, "".join(lines))
