"""Training pairs from StackExchange-style records, as InteRank built its data (arXiv 2504.03947, Sec. 3).

Input: questions with answers; answers link to web pages, whose text is supplied as files. For each question:
  * positives  = pages linked from its selected answers (the accepted one, or the top-`top_answers` by score);
  * hard negatives = the BM25 top pages for the question from the whole page pool, excluding every page
    linked from any of the question's answers (those may be relevant even if not selected).
Deduplication: pages with the same normalised text share one docid (the first seen); questions with the same
normalised title+body are merged into the first (their links pooled); a (question, page) pair appears once.
Split: by a hash of the question's normalised text, so a question (and any textual duplicate of it) lands in
exactly one of train / eval; documents may appear on both sides, questions never do.

Record format (JSON lines):
  {"id", "title", "body", "answers": [{"body", "score", "accepted", "links": [url]}]}.
Pages index (JSON lines beside the page files): {"url", "file"} with `file` relative to the index.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rerankdistill.bm25 import BM25Index
from rerankdistill.datasets import read_jsonl
from rerankdistill.teacher import Pair


@dataclass(frozen=True)
class TrainingPair:
    qid: str
    docid: str
    query: str
    document: str
    source: str  # "linked" or "bm25_negative"

    def pair(self) -> Pair:
        return Pair(self.qid, self.docid, self.query, self.document)


@dataclass
class PairSplit:
    train: list[TrainingPair]
    eval: list[TrainingPair]
    stats: dict[str, int] = field(default_factory=dict)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _digest(text: str) -> str:
    return hashlib.sha1(_norm(text).encode()).hexdigest()


def load_pages(index_path: str | os.PathLike) -> dict[str, str]:
    """{url: text} from a pages index (JSON lines {"url", "file"}, file paths relative to the index)."""
    index_path = Path(index_path)
    pages: dict[str, str] = {}
    for no, row in enumerate(read_jsonl(index_path), start=1):
        if "url" not in row or "file" not in row:
            raise ValueError(f"{index_path}: record {no} needs `url` and `file`, has {sorted(row)}")
        file = index_path.parent / row["file"]
        if not file.is_file():
            raise FileNotFoundError(f"{index_path}: record {no} points to missing file {file}")
        pages[row["url"]] = file.read_text(encoding="utf-8", errors="replace")
    return pages


def _selected_answers(answers: Sequence[Mapping], top_answers: int) -> list[Mapping]:
    accepted = [a for a in answers if a.get("accepted")]
    ranked = sorted(answers, key=lambda a: -float(a.get("score", 0)))
    chosen = accepted + [a for a in ranked if not a.get("accepted")]
    return chosen[:top_answers]


@dataclass
class _Question:
    """One distinct question (textual duplicates merged into it) and the docids its answers link to."""

    qid: str
    text: str
    positives: list[str] = field(default_factory=list)  # linked from its selected answers, in order
    linked: set[str] = field(default_factory=set)  # linked from any of its answers


def build_training_pairs(
    records: Sequence[Mapping],
    pages: Mapping[str, str],
    negatives_per_question: int = 3,
    top_answers: int = 1,
    eval_fraction: float = 0.1,
    seed: int = 0,
    min_page_chars: int = 20,
) -> PairSplit:
    """Pairs (question, page) with BM25 hard negatives, deduplicated and split by question.

    Args:
        records: StackExchange-style questions (see the module docstring).
        pages: {url: page text}; links to pages not supplied are counted as `missing_pages`.
        negatives_per_question: BM25 hard negatives per question.
        top_answers: answers whose links count as positives (accepted answer first, then by score).
        eval_fraction: share of questions (by hash) in the eval split, in [0, 1).
        seed: salts the split hash (different seeds give different splits).
        min_page_chars: shorter pages are dropped (empty/near-empty scrapes).
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if negatives_per_question < 0 or top_answers < 1:
        raise ValueError(
            f"negatives_per_question must be >= 0 and top_answers >= 1, got "
            f"{negatives_per_question}, {top_answers}"
        )
    stats = {
        "questions": 0,
        "duplicate_questions": 0,
        "missing_pages": 0,
        "duplicate_pages": 0,
        "short_pages": 0,
        "questions_without_positives": 0,
    }
    docid_of_url, documents = _deduplicate_pages(pages, min_page_chars, stats)
    questions = _merge_questions(records, pages, docid_of_url, top_answers, stats)
    kept = {digest: q for digest, q in questions.items() if q.positives}
    stats["questions_without_positives"] = len(questions) - len(kept)
    runs: dict[str, dict[str, float]] = {}
    if documents and negatives_per_question and kept:
        depth = negatives_per_question + max(len(q.linked) for q in kept.values())
        runs = BM25Index(documents).search({q.qid: q.text for q in kept.values()}, k=depth)
    train: list[TrainingPair] = []
    held: list[TrainingPair] = []
    for digest, q in kept.items():
        out = [TrainingPair(q.qid, d, q.text, documents[d], "linked") for d in q.positives]
        if runs:
            ranked = sorted(runs[q.qid].items(), key=lambda kv: (-kv[1], kv[0]))
            negatives = [d for d, _ in ranked if d not in q.linked][:negatives_per_question]
            out += [TrainingPair(q.qid, d, q.text, documents[d], "bm25_negative") for d in negatives]
        bucket = int(hashlib.sha1(f"{seed}:{digest}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if bucket < eval_fraction else train).extend(out)
    stats.update(train_pairs=len(train), eval_pairs=len(held), documents=len(documents))
    return PairSplit(train, held, stats)


def _deduplicate_pages(
    pages: Mapping[str, str], min_page_chars: int, stats: dict[str, int]
) -> tuple[dict[str, str], dict[str, str]]:
    """({url: docid}, {docid: text}): one docid per distinct normalised text; short pages dropped."""
    docid_of_url: dict[str, str] = {}
    documents: dict[str, str] = {}
    by_digest: dict[str, str] = {}
    for url, text in pages.items():
        if len(text.strip()) < min_page_chars:
            stats["short_pages"] += 1
            continue
        d = _digest(text)
        if d in by_digest:
            stats["duplicate_pages"] += 1
        else:
            by_digest[d] = f"p{len(by_digest)}"
            documents[by_digest[d]] = text
        docid_of_url[url] = by_digest[d]
    return docid_of_url, documents


def _merge_questions(
    records: Sequence[Mapping],
    pages: Mapping[str, str],
    docid_of_url: Mapping[str, str],
    top_answers: int,
    stats: dict[str, int],
) -> dict[str, _Question]:
    """{question digest: question}, textual duplicates merged into the first (their links pooled)."""
    questions: dict[str, _Question] = {}
    for no, rec in enumerate(records, start=1):
        if "id" not in rec or "answers" not in rec:
            raise ValueError(f"record {no} needs `id` and `answers`, has {sorted(rec)}")
        text = f"{rec.get('title', '')}\n{rec.get('body', '')}".strip()
        if not text:
            raise ValueError(f"record {no} (id {rec['id']!r}) has an empty question")
        stats["questions"] += 1
        q = questions.setdefault(_digest(text), _Question(str(rec["id"]), text))
        if q.qid != str(rec["id"]):
            stats["duplicate_questions"] += 1
        _add_links(q, rec["answers"], top_answers, pages, docid_of_url, stats)
    return questions


def _add_links(
    q: _Question,
    answers: Sequence[Mapping],
    top_answers: int,
    pages: Mapping[str, str],
    docid_of_url: Mapping[str, str],
    stats: dict[str, int],
) -> None:
    """Add the pages the answers link to: all to `q.linked`, the selected answers' to `q.positives`."""
    chosen = {id(a) for a in _selected_answers(answers, top_answers)}
    for a in answers:
        for url in a.get("links", []):
            if url not in pages:
                stats["missing_pages"] += 1
                continue
            doc = docid_of_url.get(url)
            if doc is None:
                continue
            q.linked.add(doc)
            if id(a) in chosen and doc not in q.positives:
                q.positives.append(doc)
