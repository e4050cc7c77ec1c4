"""The InteRank-style relevance prompt (versioned data) and the label parser.

Output format the teacher and the student write (arXiv 2504.03947):

    <explanation ...> Relevance Label: <0|1|2> ##

0 = irrelevant, 1 = partially relevant, 2 = relevant. Generation stops at ` ##`; documents are cut to 8,000
characters. Parsing follows InteRank: the integer after `relevance label:` (case-insensitive), else keyword
fallbacks; what still fails is `None`, which callers count (and score as 0 at inference, as InteRank does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_DOC_CHARS = 8000
LABEL_PREFIX = "Relevance Label:"
STOP = " ##"


@dataclass(frozen=True)
class RelevancePrompt:
    """A versioned prompt: `messages(query, document)` renders the chat messages sent to a model."""

    name: str
    version: str
    system: str
    user: str
    max_doc_chars: int = MAX_DOC_CHARS
    label_prefix: str = LABEL_PREFIX
    stop: str = STOP
    label_separator: str = " "  # between the explanation and the label line ("\n": the label on its own line)

    def messages(self, query: str, document: str) -> list[dict[str, str]]:
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query must be a non-empty string, got {query!r}")
        if not isinstance(document, str):
            raise TypeError(f"document must be a string, got {type(document).__name__}")
        doc = document[: self.max_doc_chars]
        out = [{"role": "system", "content": self.system}] if self.system else []
        return out + [{"role": "user", "content": self.user.format(query=query.strip(), document=doc)}]

    def completion(self, explanation: str, label: int) -> str:
        """The target text for a label: explanation, then the label line and the stop marker."""
        explanation = " ".join(explanation.split())
        return f"{explanation}{self.label_separator}{self.label_prefix} {label}{self.stop}".lstrip()


INTERANK_PROMPT = RelevancePrompt(
    name="interank-pointwise",
    version="1",
    system="You are a search relevance judge. You reason about whether a document helps answer a query.",
    user=(
        "Query: {query}\n\nDocument: {document}\n\n"
        "Explain briefly how the document relates to the query, then rate its relevance: 0 (irrelevant), "
        "1 (partially relevant) or 2 (relevant). End your answer with `Relevance Label: <0|1|2> ##`."
    ),
)

# InteRank's released training target: the explanation, then a final line `Relevance Label: n`, no stop
# marker (generation ends at the end-of-turn token).
INTERANK_RELEASE_PROMPT = RelevancePrompt(
    name="interank-release",
    version="1",
    system=INTERANK_PROMPT.system,
    user=(
        "Query: {query}\n\nDocument: {document}\n\n"
        "Explain briefly how the document relates to the query, then rate its relevance: 0 (irrelevant), "
        "1 (partially relevant) or 2 (relevant). "
        "End your answer with a final line `Relevance Label: <0|1|2>`."
    ),
    stop="",
    label_separator="\n",
)
PROMPTS = {"interank": INTERANK_PROMPT, "release": INTERANK_RELEASE_PROMPT}

_LABEL = re.compile(r"relevance[\s_-]*label\s*[:=]?\s*[\*\"'`\[\(]*\s*(-?\d+)", re.I)
_LABEL_WORD = re.compile(r"relevance[\s_-]*label\s*[:=]\s*[\*\"'`]*\s*([a-z][a-z ]*)", re.I)
_SHORT = re.compile(r"^\s*[\*\"'`\[\(]*(\d+)[\*\"'`\]\)]*\s*(##)?\s*$")
# keyword fallbacks, most specific first; the last mention in the text wins
_KEYWORDS: tuple[tuple[re.Pattern[str], int], ...] = (
    (
        re.compile(
            r"\b(?:not|non|isn't|is not)[\s-]+(?:at all\s+)?relevant\b|\birrelevant\b|\bno relevance\b", re.I
        ),
        0,
    ),
    (
        re.compile(
            r"\b(?:partially|somewhat|partly|moderately|marginally|slightly)[\s-]+relevant\b"
            r"|\bpartial(?:ly)? relevance\b",
            re.I,
        ),
        1,
    ),
    (
        re.compile(r"\b(?:highly|very|fully|directly|clearly|completely)[\s-]+relevant\b|\brelevant\b", re.I),
        2,
    ),
)


def _keyword_label(text: str) -> int | None:
    best: tuple[int, int] | None = None  # (end position, label)
    covered: list[tuple[int, int]] = []
    for pattern, label in _KEYWORDS:
        for m in pattern.finditer(text):
            if any(s <= m.start() < e for s, e in covered):
                continue  # "relevant" inside "not relevant" already counted as 0
            covered.append(m.span())
            if best is None or m.end() > best[0]:
                best = (m.end(), label)
    return None if best is None else best[1]


def parse_relevance(text: str, max_label: int = 2) -> int | None:
    """The relevance label in a model's output, or None when none can be found.

    Order: the last `Relevance Label: <int>` (an int outside 0..max_label gives None); a keyword written as
    the label (`Relevance Label: partially relevant`); a bare integer answer (`2`, `**1** ##`); keyword
    fallbacks anywhere (`not relevant`/`irrelevant` -> 0, `partially ...relevant` -> 1, `relevant` -> 2, the
    last mention wins).

    Args:
        text: the generated explanation + label.
        max_label: the largest valid label.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    numbers = _LABEL.findall(text)
    if numbers:
        value = int(numbers[-1])
        return value if 0 <= value <= max_label else None
    word = _LABEL_WORD.findall(text)
    if word:
        found = _keyword_label(word[-1])
        if found is not None:
            return found
    short = _SHORT.match(text)
    if short:
        value = int(short.group(1))
        return value if 0 <= value <= max_label else None
    return _keyword_label(text)


def truncate_at_stop(text: str, stop: str = STOP) -> str:
    """Cut generated text at the first stop marker (kept out), as servers do with `stop`; "" cuts nothing."""
    if not stop:
        return text
    cut = text.find(stop)
    return text if cut < 0 else text[:cut]
