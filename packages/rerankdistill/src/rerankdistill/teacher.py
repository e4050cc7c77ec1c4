"""Teacher generation: explanations + labels for (query, document) pairs, stored append-only and resumable.

Store: one JSON line per (qid, docid, teacher), appended on an O_APPEND descriptor and fsync'ed before the
next pair is counted as done; one process at a time holds the file (`shared_kernels.appendfile`). After
`kill -9` the file holds every finished record and at most one torn last line (no trailing newline or bad
JSON); reopening truncates that torn tail, so a resumed run regenerates exactly the pairs without a complete
record: nothing lost, nothing duplicated.

Backends implement `TeacherBackend`: a `name` (recorded as the teacher id) and either `acomplete(messages)`
(async, e.g. HTTP: run with bounded concurrency) or `complete_batch(list_of_messages)` (local models: run in
batches). `QrelsTeacher` is an offline stand-in built from judgements for tests and demos; its name and every
explanation say so.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from tqdm.auto import tqdm

from rerankdistill.labels import INTERANK_PROMPT, RelevancePrompt, parse_relevance, truncate_at_stop
from shared_kernels.appendfile import AppendOnlyFile
from shared_kernels.errors import FileFormatError


@dataclass(frozen=True)
class Pair:
    """A (query, document) pair to label."""

    qid: str
    docid: str
    query: str
    document: str


@dataclass
class Completion:
    """One generated answer and its token accounting (0 when the backend does not report it)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@runtime_checkable
class TeacherBackend(Protocol):
    name: str


Messages = list[dict[str, str]]  # chat messages: [{"role": ..., "content": ...}]


@runtime_checkable
class AsyncCompleter(Protocol):
    """Answers one prompt per awaited call (HTTP servers: run with bounded concurrency)."""

    async def acomplete(self, messages: Messages) -> Completion: ...


@runtime_checkable
class BatchCompleter(Protocol):
    """Answers a batch of prompts per call (local models)."""

    def complete_batch(self, batch: list[Messages]) -> list[Completion]: ...


@runtime_checkable
class PairCompleter(Protocol):
    """Answers from the pairs' ids instead of a prompt (offline stand-ins such as `QrelsTeacher`)."""

    def complete_pairs(self, pairs: Sequence[Pair]) -> list[Completion]: ...


@dataclass
class TeacherRecord:
    qid: str
    docid: str
    teacher: str
    text: str
    label: int | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt: str = ""
    expected: float | None = None  # E[label] under label-token probabilities (reranking judgements)


def _parse_records(path: Path, data: bytes) -> tuple[dict[tuple[str, str, str], TeacherRecord], int]:
    """(records by key, bytes up to the end of the last whole line) of a store's bytes; a bad line other than
    a torn last one, or a repeated key, raises `FileFormatError` naming the line."""
    records: dict[tuple[str, str, str], TeacherRecord] = {}
    good_end = 0
    lines = data.split(b"\n")
    for no, raw in enumerate(lines, start=1):
        last = no == len(lines)
        if not raw.strip():
            if not last:
                good_end += len(raw) + 1
            continue
        try:
            if last:  # no newline after it: the write was torn
                raise ValueError("torn")
            rec = TeacherRecord(**json.loads(raw))
        except (ValueError, TypeError) as e:
            if last:
                break
            raise FileFormatError(
                path, f"corrupt teacher record ({e}); only the last line may be torn by a crash", no
            ) from None
        key = (rec.qid, rec.docid, rec.teacher)
        if key in records:
            raise FileFormatError(path, f"duplicate record for {key}", no)
        records[key] = rec
        good_end += len(raw) + 1
    return records, good_end


class TeacherStore:
    """Append-only JSONL of `TeacherRecord`s keyed by (qid, docid, teacher), held by one process at a time.

    Opening takes an exclusive lock on the file (a second run on the same file stops at once with
    `FileLockedError`, a `UserError`), then repairs a torn last line left by a crash; a bad line anywhere
    else, or a repeated key, raises.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[tuple[str, str, str], TeacherRecord] = {}
        self.repaired_bytes = 0
        self._file = AppendOnlyFile(self.path)  # locked before reading: nobody appends while we load
        try:
            self._load()
        except BaseException:
            self._file.close()
            raise

    def _load(self) -> None:
        data = self._file.read_bytes()
        self.records, good_end = _parse_records(self.path, data)
        if good_end < len(data):
            self.repaired_bytes = len(data) - good_end
            self._file.truncate_to(good_end)

    @staticmethod
    def read(path: str | os.PathLike) -> dict[tuple[str, str, str], TeacherRecord]:
        """The records of a finished store, read WITHOUT taking its lock (a torn last line is skipped, not
        repaired): for readers such as every process of a distributed run after the writer has closed it."""
        path = Path(path)
        return _parse_records(path, path.read_bytes())[0]

    def __contains__(self, key: tuple[str, str, str]) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: TeacherRecord) -> None:
        key = (record.qid, record.docid, record.teacher)
        if key in self.records:
            raise ValueError(f"record for {key} already stored")
        self._file.append((json.dumps(asdict(record), ensure_ascii=False) + "\n").encode())
        self.records[key] = record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TeacherStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class GenerationStats:
    done: int = 0
    skipped_existing: int = 0
    unparseable: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: list[str] = field(default_factory=list)


def _record(pair: Pair, teacher: str, completion: Completion, prompt: RelevancePrompt) -> TeacherRecord:
    text = truncate_at_stop(completion.text, prompt.stop)
    return TeacherRecord(
        pair.qid,
        pair.docid,
        teacher,
        text,
        parse_relevance(text),
        completion.prompt_tokens,
        completion.completion_tokens,
        f"{prompt.name}/v{prompt.version}",
    )


def generate_teacher_outputs(
    pairs: Iterable[Pair],
    backend: TeacherBackend,
    store: TeacherStore,
    prompt: RelevancePrompt = INTERANK_PROMPT,
    concurrency: int = 8,
    batch_size: int = 8,
    progress: bool = True,
) -> GenerationStats:
    """Label every pair not yet in `store` with `backend`, appending each result as soon as it arrives.

    Args:
        pairs: the (query, document) pairs; pairs already stored for this teacher are skipped.
        backend: has `name` and `acomplete(messages) -> Completion` (async), `complete_batch(list of messages)
            -> list[Completion]`, or `complete_pairs(list of Pair)` (offline).
        store: where records go (append-only; see the module docstring for crash safety).
        prompt: the versioned prompt.
        concurrency: requests in flight for async backends.
        batch_size: pairs per call for batch backends.

    Returns:
        counts (done, skipped, unparseable labels) and summed token usage. A failing request raises after the
        backend's own retries; what finished before stays stored.
    """
    if concurrency < 1 or batch_size < 1:
        raise ValueError(f"concurrency and batch_size must be >= 1, got {concurrency}, {batch_size}")
    teacher = backend.name
    todo: list[Pair] = []
    stats = GenerationStats()
    seen: set[tuple[str, str]] = set()
    for p in pairs:
        if (p.qid, p.docid) in seen:
            raise ValueError(f"pair ({p.qid!r}, {p.docid!r}) listed twice")
        if not isinstance(p.query, str) or not p.query.strip():
            raise ValueError(f"pair ({p.qid!r}, {p.docid!r}) has an empty query")
        if not isinstance(p.document, str):
            raise TypeError(f"pair ({p.qid!r}, {p.docid!r}) document must be a string")
        seen.add((p.qid, p.docid))
        if (p.qid, p.docid, teacher) in store:
            stats.skipped_existing += 1
        else:
            todo.append(p)
    bar = tqdm(total=len(todo), desc=f"teacher {teacher}", disable=not progress, unit="pair")

    def keep(pair: Pair, completion: Completion) -> None:
        rec = _record(pair, teacher, completion, prompt)
        store.append(rec)
        stats.done += 1
        stats.unparseable += rec.label is None
        stats.prompt_tokens += completion.prompt_tokens
        stats.completion_tokens += completion.completion_tokens
        bar.update(1)

    try:
        if isinstance(backend, AsyncCompleter):
            asyncio.run(_run_async(todo, backend, prompt, concurrency, keep))
        else:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for p, c in zip(chunk, _complete_chunk(backend, chunk, prompt), strict=True):
                    keep(p, c)
    finally:
        bar.close()
    return stats


def _complete_chunk(backend: TeacherBackend, chunk: list[Pair], prompt: RelevancePrompt) -> list[Completion]:
    """One batch of answers from a synchronous backend."""
    if isinstance(backend, PairCompleter):  # offline teachers look at ids, not prompts
        return backend.complete_pairs(chunk)
    if isinstance(backend, BatchCompleter):
        return backend.complete_batch([prompt.messages(p.query, p.document) for p in chunk])
    raise TypeError(f"backend {type(backend).__name__} has none of acomplete, complete_pairs, complete_batch")


async def _run_async(
    todo: Sequence[Pair],
    backend: AsyncCompleter,
    prompt: RelevancePrompt,
    concurrency: int,
    keep: Callable[[Pair, Completion], None],
) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(pair: Pair) -> tuple[Pair, Completion]:
        async with sem:
            return pair, await backend.acomplete(prompt.messages(pair.query, pair.document))

    tasks = [asyncio.create_task(one(p)) for p in todo]
    try:
        for fut in asyncio.as_completed(tasks):
            pair, completion = await fut
            keep(pair, completion)  # single-threaded event loop: appends never interleave
    finally:
        for t in tasks:
            t.cancel()
        if hasattr(backend, "aclose"):
            await backend.aclose()


EXPLANATIONS = ("per-label", "fixed", "evidence", "none")


class QrelsTeacher:
    """OFFLINE stand-in teacher for tests and demos: the label comes from the judgements, the explanation is a
    fixed sentence saying so. It is not a language model and teaches no reasoning.

    Args:
        qrels: {qid: {docid: gain}}; unjudged pairs get label 0.
        label_of_gain: maps a gain to 0..2; default clips (gain <= 0 -> 0, 1 -> 1, >= 2 -> 2).
        explanation: "per-label" (the sentence names the label: a student decides at its explanation's first
            differing word, and the label line only repeats it) or "fixed" (one sentence for every label: the
            decision is made at the label token, where E[label] is read) or "evidence"
            (`rerankdistill.evidence`: which query words the document contains, what it defines and calls --
            computed from the pair, not the label, so a student can be given the same text at inference) or
            "none" (the label line alone). The name records the choice, so stored outputs of the modes are
            never mixed.
    """

    def __init__(
        self,
        qrels: Mapping[str, Mapping[str, int]],
        name: str | None = None,
        label_of_gain=None,
        explanation: str = "per-label",
    ):
        if explanation not in EXPLANATIONS:
            raise ValueError(f"explanation must be one of {EXPLANATIONS}, got {explanation!r}")
        self.explanation_mode = explanation
        self.name = name or self._default_name(explanation)
        self.qrels = qrels
        self.label_of_gain = label_of_gain or (lambda g: max(0, min(2, int(g))))

    @staticmethod
    def _default_name(explanation: str) -> str:
        if explanation == "per-label":
            return "offline-qrels-oracle"
        if explanation == "evidence":  # a store written by an older evidence() is not reused
            from rerankdistill.evidence import EVIDENCE_VERSION

            return f"offline-qrels-oracle-evidence-v{EVIDENCE_VERSION}"
        return f"offline-qrels-oracle-{explanation}"

    def label_for(self, qid: str, docid: str) -> int:
        return self.label_of_gain(self.qrels.get(qid, {}).get(docid, 0))

    def explanation(self, label: int, query: str = "", document: str = "") -> str:
        if self.explanation_mode == "evidence":
            from rerankdistill.evidence import evidence

            return evidence(query, document)
        if self.explanation_mode == "none":  # the label directly
            return ""
        if self.explanation_mode == "fixed":
            return "[offline teacher from relevance judgements, no model reasoning] The label follows."
        what = {0: "not judged relevant", 1: "judged partially relevant", 2: "judged relevant"}[label]
        return f"[offline teacher from relevance judgements, no model reasoning] The document is {what}."

    def text_for(self, qid: str, docid: str, query: str = "", document: str = "") -> str:
        label = self.label_for(qid, docid)
        return INTERANK_PROMPT.completion(self.explanation(label, query, document), label)

    def complete_pairs(self, pairs: Sequence[Pair]) -> list[Completion]:
        return [Completion(self.text_for(p.qid, p.docid, p.query, p.document)) for p in pairs]
