"""A rubric reward model for refinement, as in InteRank's release: a judge model reads the query, the
document, the reference label and one sampled answer, scores the answer 0-10 on a rubric, and the score / 10
is the reward (beside the plain label-agreement reward of `train.rwft`).

The judge is any teacher backend: `complete_batch(list of messages) -> [Completion]` (transformers, vLLM,
`OfflineRubricJudge`) or `acomplete(messages)` (the OpenAI-compatible HTTP backend, run concurrently).
`OfflineRubricJudge` is an OFFLINE stand-in for tests: it applies the rubric mechanically (label agreement,
a well-formed label line, an explanation that quotes the document) and is not a language model.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass

from rerankdistill.labels import MAX_DOC_CHARS, parse_relevance
from rerankdistill.teacher import AsyncCompleter, BatchCompleter, Completion, Messages

RUBRIC_VERSION = "1"
RUBRIC_SYSTEM = "You grade answers of a search relevance judge against a rubric. You are strict and brief."
RUBRIC_USER = (
    "Query: {query}\n\nDocument: {document}\n\n"
    "Reference relevance label: {reference} (0 irrelevant, 1 partially relevant, 2 relevant)\n\n"
    "Answer to grade:\n<answer>\n{answer}\n</answer>\n\n"
    "Rubric (0-10 points in all): 5 points if the answer's label equals the reference label "
    "(2 if it is off by one); 3 points if the explanation is grounded in what the document says; "
    "2 points if it ends with exactly one line `Relevance Label: <0|1|2>`. "
    "Reply with `Score: <0-10>` and nothing else."
)
_SCORE = re.compile(r"score\s*[:=]\s*(\d+(?:\.\d+)?)", re.I)


def rubric_messages(query: str, document: str, answer: str, reference: int) -> list[dict[str, str]]:
    """The judge's chat messages for one sampled answer."""
    return [
        {"role": "system", "content": RUBRIC_SYSTEM},
        {
            "role": "user",
            "content": RUBRIC_USER.format(
                query=query.strip(),
                document=document[:MAX_DOC_CHARS],
                reference=int(reference),
                answer=answer.strip(),
            ),
        },
    ]


def parse_score(text: str, max_score: float = 10.0) -> float | None:
    """The last `Score: s` of a judge's reply as s / max_score in [0, 1]; None when absent or out of range."""
    found = _SCORE.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value / max_score if 0 <= value <= max_score else None


@dataclass
class RubricRewardModel:
    """Scores sampled answers with a judge backend; an unparseable judge reply scores 0 (and is counted).

    Args:
        backend: a teacher backend (see the module docstring).
        concurrency: requests in flight for an `acomplete` backend.
    """

    backend: BatchCompleter | AsyncCompleter
    concurrency: int = 8
    unparseable: int = 0

    def score(self, items: Sequence[tuple[str, str, str, int]]) -> list[float]:
        """Rewards in [0, 1] for (query, document, answer, reference label) items, in order."""
        batch = [rubric_messages(*item) for item in items]
        if isinstance(self.backend, BatchCompleter):
            replies = self.backend.complete_batch(batch)
        elif isinstance(self.backend, AsyncCompleter):
            replies = asyncio.run(self._gather(self.backend, batch))
        else:
            raise TypeError(f"backend {type(self.backend).__name__} has neither complete_batch nor acomplete")
        out = []
        for reply in replies:
            value = parse_score(reply.text)
            self.unparseable += value is None
            out.append(0.0 if value is None else value)
        return out

    async def _gather(self, backend: AsyncCompleter, batch: list[Messages]) -> list[Completion]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(messages: Messages) -> Completion:
            async with gate:
                return await backend.acomplete(messages)

        try:
            return list(await asyncio.gather(*(one(m) for m in batch)))
        finally:
            if hasattr(backend, "aclose"):
                await backend.aclose()


class OfflineRubricJudge:
    """OFFLINE stand-in judge (tests, demos): reads the rubric prompt and applies it mechanically."""

    name = "offline-rubric-judge"
    _FIELDS = re.compile(
        r"Document: (?P<document>.*?)\n\nReference relevance label: (?P<reference>\d).*?"
        r"<answer>\n(?P<answer>.*?)\n</answer>",
        re.S,
    )

    def complete_batch(self, batch: Sequence[list[dict[str, str]]]) -> list[Completion]:
        return [Completion(f"Score: {self.grade(messages[-1]['content'])}") for messages in batch]

    def grade(self, prompt: str) -> int:
        m = self._FIELDS.search(prompt)
        if m is None:
            return 0
        answer, reference = m["answer"], int(m["reference"])
        label = parse_relevance(answer)
        points = 0 if label is None else {0: 5, 1: 2}.get(abs(label - reference), 0)
        words = {w for w in re.findall(r"[a-z]{5,}", m["document"].lower())}
        explanation = answer.rsplit("Relevance Label", 1)[0].lower()
        points += 3 if words & set(re.findall(r"[a-z]{5,}", explanation)) else 0
        points += 2 if re.search(r"Relevance Label:\s*[012]\s*(##)?\s*$", answer) else 0
        return points
