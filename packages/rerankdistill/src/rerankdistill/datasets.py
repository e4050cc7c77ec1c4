"""Collections: Cranfield (SMART format), BEIR folders, BRIGHT, generic JSONL.

Every loader returns plain dicts: corpus {docid: text}, queries {qid: text}, qrels {qid: {docid: int gain}}.

Cranfield (../shared/data/cranfield):
  * `cran.qry` numbers its queries `.I 001, 002, 004, 008, ...` (gaps), but `cranqrel` numbers them 1..225 by
    their position in `cran.qry`. We use the cranqrel numbering ("1".."225") as query ids.
  * cranqrel codes (Cleverdon, see cranqrel.readme): 1 = complete answer, 2 = high relevance, 3 = useful
    background, 4 = minimum interest, 5 = no interest (never present); two lines carry -1 (no degree given).
    Gains for nDCG (higher is better): CRANFIELD_GAINS = {1: 4, 2: 3, 3: 2, 4: 1, -1: 0}. So codes 1..4
    count as relevant for MAP/Recall and -1 counts as judged non-relevant.
  * Document text is the `.W` field (which repeats the title), with repeated `.W` sections (docs 576 and 578
    are spliced in the source file) joined; a document with an empty `.W` falls back to its title.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rerankdistill.trec import Qrels, Queries, TrecFormatError, read_qrels
from shared_kernels.textfiles import json_lines, numbered_lines

Corpus = dict[str, str]

CRANFIELD_GAINS: dict[int, int] = {1: 4, 2: 3, 3: 2, 4: 1, -1: 0}


def _read_smart(path: Path, fields: str) -> list[tuple[str, dict[str, str]]]:
    """Parse a SMART file into [(id, {field letter: text})]; repeated fields are joined with a newline."""
    records: list[tuple[str, dict[str, str]]] = []
    current: dict[str, list[str]] | None = None
    key: str | None = None
    for no, raw in numbered_lines(path):
        line = raw.rstrip("\r\n")
        if line.startswith(".I "):
            if current is not None:
                records[-1] = (records[-1][0], {k: "\n".join(v).strip() for k, v in current.items()})
            records.append((line[3:].strip(), {}))
            current, key = {}, None
        elif len(line) == 2 and line[0] == "." and line[1] in fields:
            if current is None:
                raise TrecFormatError(path, no, "field marker before the first `.I` record", line)
            key = line[1]
            current.setdefault(key, [])
        elif current is not None and key is not None:
            current[key].append(line.strip())
        elif line.strip():
            raise TrecFormatError(path, no, "text outside any field", line)
    if current is not None:
        records[-1] = (records[-1][0], {k: "\n".join(v).strip() for k, v in current.items()})
    return records


def _squash(text: str) -> str:
    return " ".join(text.split())


def load_cranfield(directory: str | os.PathLike) -> tuple[Corpus, Queries, Qrels]:
    """Load Cranfield 1400 from a folder holding `cran.all.1400`, `cran.qry` and `cranqrel`.

    Returns:
        corpus {"1".."1400": text}, queries {"1".."225": text} (cranqrel numbering, see the module docstring),
        qrels {qid: {docid: gain}} with gains from CRANFIELD_GAINS.
    """
    directory = Path(directory)
    for name in ("cran.all.1400", "cran.qry", "cranqrel"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"directory {directory} has no {name}: not a Cranfield collection folder")
    corpus: Corpus = {}
    for docid, f in _read_smart(directory / "cran.all.1400", "TABW"):
        corpus[docid] = _squash(f.get("W", "")) or _squash(f.get("T", ""))
    queries: Queries = {}
    for position, (_, f) in enumerate(_read_smart(directory / "cran.qry", "W"), start=1):
        text = _squash(f.get("W", ""))
        if not text:
            raise ValueError(f"{directory / 'cran.qry'}: query number {position} is empty")
        queries[str(position)] = text
    return corpus, queries, _read_cranqrel(directory / "cranqrel", corpus, queries)


def _read_cranqrel(path: Path, corpus: Corpus, queries: Queries) -> Qrels:
    """cranqrel's `query doc code` lines as {qid: {docid: gain}}, checked against the corpus and queries."""
    qrels: Qrels = {}
    for no, line in numbered_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise TrecFormatError(path, no, f"expected `query doc code`, got {len(parts)} fields", line)
        qid, docid, code = parts
        if qid not in queries:
            raise TrecFormatError(path, no, f"query {qid!r} is not among cran.qry's 1..{len(queries)}", line)
        if docid not in corpus:
            raise TrecFormatError(path, no, f"unknown document id {docid!r}", line)
        gain = _cranfield_gain(code, path, no, line)
        judged = qrels.setdefault(qid, {})
        if docid in judged:
            raise TrecFormatError(path, no, f"duplicate judgement for query {qid!r} doc {docid!r}", line)
        judged[docid] = gain
    return qrels


def _cranfield_gain(code: str, path: Path, no: int, line: str) -> int:
    """The nDCG gain of a cranqrel relevance code (CRANFIELD_GAINS); another code names the file and line."""
    try:
        return CRANFIELD_GAINS[int(code)]
    except (ValueError, KeyError):
        raise TrecFormatError(
            path, no, f"relevance code {code!r} not in {sorted(CRANFIELD_GAINS)}", line
        ) from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file (optionally .gz); a bad line raises with the file and line number."""
    rows = []
    for no, line, row, why in json_lines(path):
        if row is None:
            raise TrecFormatError(path, no, why, line)
        rows.append(row)
    return rows


def load_jsonl(
    path: str | os.PathLike, id_field: str = "id", text_field: str = "text", title_field: str | None = None
) -> dict[str, str]:
    """Load {id: text} from JSON lines, e.g. a corpus or a query file.

    Args:
        id_field, text_field: keys holding the identifier and the text.
        title_field: optional key whose value is prepended to the text (BEIR `title`).
    """
    out: dict[str, str] = {}
    for no, row in enumerate(read_jsonl(path), start=1):
        if id_field not in row or text_field not in row:
            raise ValueError(
                f"{os.fspath(path)}: record {no} lacks {id_field!r} or {text_field!r}: keys are {sorted(row)}"
            )
        key = str(row[id_field])
        if key in out:
            raise ValueError(f"{os.fspath(path)}: record {no} repeats id {key!r}")
        text = str(row[text_field] or "")
        if title_field and row.get(title_field):
            text = f"{row[title_field]}\n{text}" if text else str(row[title_field])
        out[key] = text
    return out


def read_beir_qrels(path: str | os.PathLike) -> Qrels:
    """Read a BEIR qrels TSV (`query-id<TAB>corpus-id<TAB>score`, with a header line)."""
    qrels: Qrels = {}
    for no, line in numbered_lines(path):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if no == 1 and parts[0] == "query-id":
            continue
        if len(parts) != 3:
            raise TrecFormatError(path, no, f"expected 3 tab-separated fields, got {len(parts)}", line)
        try:
            gain = int(parts[2])
        except ValueError:
            raise TrecFormatError(path, no, f"score {parts[2]!r} is not an integer", line) from None
        judged = qrels.setdefault(parts[0], {})
        if parts[1] in judged:
            raise TrecFormatError(path, no, f"duplicate judgement for {parts[0]!r}/{parts[1]!r}", line)
        judged[parts[1]] = gain
    return qrels


def load_beir(directory: str | os.PathLike, split: str = "test") -> tuple[Corpus, Queries, Qrels]:
    """Load a BEIR folder: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/<split>.tsv.

    Only queries that have judgements in the split are returned.
    """
    directory = Path(directory)
    qrels_path = directory / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise FileNotFoundError(f"no qrels for split {split!r} at {qrels_path}")
    corpus = load_jsonl(_first_existing(directory, "corpus"), "_id", "text", title_field="title")
    queries = load_jsonl(_first_existing(directory, "queries"), "_id", "text")
    qrels = read_beir_qrels(qrels_path)
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise ValueError(
            f"{qrels_path}: {len(missing)} judged queries are not in queries.jsonl, e.g. {missing[:3]}"
        )
    return corpus, {q: queries[q] for q in qrels}, qrels


def _first_existing(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} has no {stem}.jsonl(.gz)")


@dataclass
class BrightTask:
    """One BRIGHT domain: queries, graded qrels, per-query excluded doc ids, and the corpus when given."""

    queries: Queries
    qrels: Qrels
    excluded: dict[str, set[str]] = field(default_factory=dict)
    corpus: Corpus | None = None
    reasoning: dict[str, str] = field(default_factory=dict)


def load_bright(
    topics: str | os.PathLike,
    qrels: str | os.PathLike | None = None,
    corpus: str | os.PathLike | None = None,
    long_documents: bool = False,
) -> BrightTask:
    """Load a BRIGHT domain from local files.

    Args:
        topics: `topics.bright-<domain>-original.jsonl(.gz)` with fields id, query, reasoning, gold_ids,
            gold_ids_long, excluded_ids.
        qrels: TREC qrels; when None they are built from `gold_ids` (or `gold_ids_long`) with gain 1.
        corpus: JSON lines of documents with `id` and `content` (BRIGHT's `documents` config exported
            from the hub), or None when only queries and judgements are needed.
        long_documents: use `gold_ids_long` when building qrels from the topics.
    """
    queries: Queries = {}
    excluded: dict[str, set[str]] = {}
    reasoning: dict[str, str] = {}
    built: Qrels = {}
    for no, row in enumerate(read_jsonl(topics), start=1):
        if "id" not in row or "query" not in row:
            raise ValueError(f"{os.fspath(topics)}: record {no} lacks `id` or `query`")
        qid, text = str(row["id"]), str(row["query"]).strip()
        if not text:
            raise ValueError(f"{os.fspath(topics)}: query {qid!r} (record {no}) is empty")
        queries[qid] = text
        reasoning[qid] = str(row.get("reasoning") or "")
        excluded[qid] = {d for d in row.get("excluded_ids") or [] if d != "N/A"}
        gold = row.get("gold_ids_long" if long_documents else "gold_ids") or []
        built[qid] = {str(d): 1 for d in gold}
    judged = read_qrels(qrels) if qrels is not None else built
    unknown = sorted(set(judged) - set(queries))
    if unknown:
        raise ValueError(
            f"qrels {os.fspath(qrels or topics)} judge queries absent from the topics: {unknown[:5]}"
        )
    docs = None
    if corpus is not None:
        docs = load_jsonl(corpus, "id", "content")
    return BrightTask(queries=queries, qrels=judged, excluded=excluded, corpus=docs, reasoning=reasoning)


def drop_excluded(
    run: dict[str, dict[str, float]], excluded: dict[str, set[str]]
) -> dict[str, dict[str, float]]:
    """Remove BRIGHT's excluded ids from each query's ranking (as BRIGHT's evaluation does)."""
    return {q: {d: s for d, s in docs.items() if d not in excluded.get(q, ())} for q, docs in run.items()}
