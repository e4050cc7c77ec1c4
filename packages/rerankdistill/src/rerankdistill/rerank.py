"""Pointwise reranking of first-stage candidates with explanations (InteRank inference).

For each query, the first-stage top-k documents are judged one by one: the model writes an explanation and
`Relevance Label: n`; the label is parsed (`parse_relevance`; unparseable ones are counted and score 0, as in
InteRank). The reranking key is, in order:
  1. E[label] under the label-token probabilities when the backend gives them (the transformers backend),
     else the parsed label;
  2. the first-stage score (higher first);
  3. the docid (trec_eval's tie order: descending).
The written run scores are rank-based (k, k-1, ..., 1 above every document beyond the top-k, which keep their
first-stage order), so any TREC tool reads the same ranking; labels and E[label] go to the judgement store.

Judgements are cached in a `TeacherStore` keyed by (qid, docid, model name): an interrupted rerank resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from tqdm.auto import tqdm

from rerankdistill.labels import INTERANK_PROMPT, RelevancePrompt, parse_relevance
from rerankdistill.teacher import TeacherRecord, TeacherStore
from rerankdistill.trec import Run, sorted_ranking


@dataclass
class Judgement:
    text: str
    label: int | None
    expected: float | None = None  # E[label] when label probabilities are available


class PointwiseJudge(Protocol):
    name: str

    def judge(self, pairs: list[tuple[str, str]]) -> list[Judgement]: ...


class TransformersJudge:
    """Explanation + label + E[label] with a local model (`TransformersBackend`), `batch_size` pairs at once.

    Args:
        backend: a `rerankdistill.backends.hf.TransformersBackend` (greedy: temperature 0).
        prompt: the versioned prompt.
        use_label_probabilities: score by E[label]; False uses the parsed label only.
    """

    def __init__(
        self, backend, prompt: RelevancePrompt = INTERANK_PROMPT, use_label_probabilities: bool = True
    ):
        self.backend, self.prompt = backend, prompt
        self.name = backend.name
        self.use_label_probabilities = use_label_probabilities

    def judge(self, pairs: list[tuple[str, str]]) -> list[Judgement]:
        prompts = [self.backend.render(self.prompt.messages(q, d)) for q, d in pairs]
        texts = [c.text for c in self.backend.generate_texts(prompts)]
        expected: list[float | None] = [None] * len(pairs)
        if self.use_label_probabilities:
            probs = self.backend.label_probabilities(prompts, texts)  # (N, 3)
            expected = (probs * probs.new_tensor([0.0, 1.0, 2.0])).sum(-1).tolist()
        return [Judgement(t, parse_relevance(t), e) for t, e in zip(texts, expected)]


class TeacherForcedJudge:
    """E[label] in ONE forward pass per pair: the explanation is given (teacher-forced), not generated, and
    the label-token probabilities are read after it -- 1 forward instead of ~32 decoding steps, so a fixed
    compute budget goes to training instead. Use it with a student distilled on the same kind of explanation
    (e.g. `QrelsTeacher(explanation="evidence")` and `explain=rerankdistill.evidence.evidence`).

    Args:
        backend: a `rerankdistill.backends.hf.TransformersBackend`.
        explain: (query, document) -> explanation text (must not depend on a label).
        prompt: the versioned prompt.
    """

    def __init__(self, backend, explain, prompt: RelevancePrompt = INTERANK_PROMPT):
        self.backend, self.explain, self.prompt = backend, explain, prompt
        self.name = f"{backend.name}-forced"

    def judge(self, pairs: list[tuple[str, str]]) -> list[Judgement]:
        prompts = [self.backend.render(self.prompt.messages(q, d)) for q, d in pairs]
        texts = [self.explain(q, d) for q, d in pairs]
        probs = self.backend.label_probabilities(prompts, texts)  # (N, 3)
        expected = (probs * probs.new_tensor([0.0, 1.0, 2.0])).sum(-1).tolist()
        labels = probs.argmax(-1).tolist()
        return [
            Judgement(self.prompt.completion(t, int(lab)), int(lab), e)
            for t, lab, e in zip(texts, labels, expected)
        ]


@dataclass
class RerankResult:
    run: Run
    judged: int = 0
    cached: int = 0
    unparseable: int = 0
    labels: dict[str, dict[str, int | None]] = field(default_factory=dict)
    # the primary key: E[label] or the label
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


def rerank(
    first_stage: Run,
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    judge: PointwiseJudge,
    k: int = 100,
    batch_size: int = 8,
    store: TeacherStore | None = None,
    progress: bool = True,
) -> RerankResult:
    """Rerank each query's first-stage top-k pointwise (see the module docstring for the ordering).

    Args:
        first_stage: {qid: {docid: score}} (e.g. `bm25_search` output).
        queries, corpus: texts; a query or candidate document id missing from them raises.
        judge: `TransformersJudge` or anything with `name` and `judge([(query, doc)]) -> [Judgement]`.
        k: candidates reranked per query; the rest keep their first-stage order below them.
        batch_size: pairs sent to the judge per call.
        store: optional cache of judgements (resume after interruption).
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got {k}, {batch_size}")
    missing_q = [q for q in first_stage if q not in queries]
    if missing_q:
        raise ValueError(f"first-stage run has queries without text: {missing_q[:5]}")
    heads = {qid: sorted_ranking(docs) for qid, docs in first_stage.items()}
    todo = _pairs_to_judge(heads, corpus, k, store, judge.name)
    result = RerankResult(run={})
    found = _cached_judgements(store, judge.name, heads)
    result.cached = len(found)
    bar = tqdm(total=len(todo), desc=f"rerank {judge.name}", unit="pair", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        outs = judge.judge([(queries[q], corpus[d]) for q, d in chunk])
        for (qid, docid), j in zip(chunk, outs, strict=True):
            found[(qid, docid)] = j
            if store is not None:
                store.append(TeacherRecord(qid, docid, judge.name, j.text, j.label, expected=j.expected))
        result.judged += len(chunk)
        bar.update(len(chunk))
    bar.close()
    for qid, ranking in heads.items():
        result.run[qid] = _reranked_query(qid, ranking, k, found, result)
    return result


def _pairs_to_judge(
    heads: Mapping[str, list[tuple[str, float]]],
    corpus: Mapping[str, str],
    k: int,
    store: TeacherStore | None,
    name: str,
) -> list[tuple[str, str]]:
    """The (qid, docid) pairs of each query's top k that the store does not hold yet; unknown docids raise."""
    todo: list[tuple[str, str]] = []
    for qid, ranking in heads.items():
        for docid, _ in ranking[:k]:
            if docid not in corpus:
                raise ValueError(f"unknown document id {docid!r} in the first-stage run of query {qid!r}")
            if store is None or (qid, docid, name) not in store:
                todo.append((qid, docid))
    return todo


def _cached_judgements(
    store: TeacherStore | None, name: str, heads: Mapping[str, object]
) -> dict[tuple[str, str], Judgement]:
    """The store's judgements by judge `name` for the run's queries."""
    if store is None:
        return {}
    return {
        (qid, docid): Judgement(rec.text, rec.label, rec.expected)
        for (qid, docid, judge_name), rec in store.records.items()
        if judge_name == name and qid in heads
    }


def _reranked_query(
    qid: str,
    ranking: list[tuple[str, float]],
    k: int,
    found: Mapping[tuple[str, str], Judgement],
    result: RerankResult,
) -> dict[str, float]:
    """One query's rank-based run scores: the top k by (judgement, first-stage score, docid), then the rest
    in first-stage order; records the labels, primary scores and unparseable count in `result`."""
    head, tail = ranking[:k], ranking[k:]
    keyed = []
    for docid, first in head:
        j = found[(qid, docid)]
        result.unparseable += j.label is None
        primary = j.expected if j.expected is not None else float(j.label or 0)
        keyed.append((primary, first, docid))
        result.labels.setdefault(qid, {})[docid] = j.label
        result.scores.setdefault(qid, {})[docid] = primary
    keyed.sort(key=lambda t: (-t[0], -t[1], _desc(t[2])))
    order = [d for _, _, d in keyed] + [d for d, _ in tail]
    n = len(order)
    return {docid: float(n - i) for i, docid in enumerate(order)}


def _desc(docid: str) -> tuple[int, ...]:
    return tuple(-b for b in docid.encode()) + (1,)


def prompt_lengths(
    tokenizer,
    first_stage: Run,
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    k: int,
    prompt: RelevancePrompt = INTERANK_PROMPT,
) -> list[int]:
    """The token length of the judge's prompt for each query's k highest-scored first-stage documents (query
    by query, documents by descending score, tied ones in the run's order), rendered with the tokenizer's
    chat template and the generation prompt: e.g. to count the prompts longer than a training context.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        first_stage: {qid: {docid: score}}.
        queries, corpus: texts.
        k: documents per query.
        prompt: the relevance prompt the judge uses.
    """
    lengths = []
    for qid, docs in first_stage.items():
        for docid in sorted(docs, key=lambda d: -docs[d])[:k]:
            text = tokenizer.apply_chat_template(
                prompt.messages(queries[qid], corpus[docid]), add_generation_prompt=True, tokenize=False
            )
            lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return lengths
