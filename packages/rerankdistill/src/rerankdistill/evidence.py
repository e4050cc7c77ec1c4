"""Evidence-carrying explanations computed from the pair alone (no label, no model): which query words and
identifiers the document contains, which query words its own name spells (`indentsize` holds "indent" and
"size", which no identifier split finds), and what the code names and calls. An offline teacher can write
them before its label (`QrelsTeacher(explanation="evidence")`), and a student can be given the same text at
inference (`rerank.TeacherForcedJudge`), so the exact-match signal that BM25 exploits, and the name signal it
cannot see, are visible to it.

    evidence("Quote the string, replacing spaces by plus signs.",
             "def quote_plus(string, safe=''):\\n    return quote(string, safe).replace(' ', '+')")
    -> "Matches: quote, string, plus (3 of 6 query words). Defines quote_plus. Calls replace, quote.
        Name quote_plus spells: quote, plus (2 of 6 query words)."   (one line)

On the stdlib docstring task (rerank-qlora's default, identifier-aware BM25's top 20), a logistic
regression over BM25 and these counts moved validation nDCG@10 from 0.358 to 0.394 and evaluation from
0.387 to 0.425; without the name sentence, to 0.362 / 0.396. The name is what the student should read.
"""

from __future__ import annotations

import ast
import functools
import re

from rerankdistill.code_tokens import IdentifierTokenizer

_TOKENIZER = IdentifierTokenizer(stopwords="en", stemmer="s")
_DEF = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+([A-Za-z_]\w*)", re.M)
_WORD = re.compile(r"[a-z]{3,}")
# Bumped whenever `evidence` writes different text for the same pair: stored explanations name it.
EVIDENCE_VERSION = 2


def _calls(document: str, limit: int) -> list[str]:
    return list(_all_calls(document)[:limit])


@functools.lru_cache(maxsize=8192)
def _all_calls(document: str) -> tuple[str, ...]:
    """The called names, in walk order, each once (cached: a document is judged with many queries)."""
    try:
        tree = ast.parse(document)
    except (SyntaxError, ValueError):
        return ()
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name and name not in names:
                names.append(name)
    return tuple(names)


@functools.lru_cache(maxsize=8192)
def _document_words(document: str) -> frozenset[str]:
    return frozenset(_TOKENIZER(document))


def unit_name(document: str) -> str | None:
    """The name a code document is about: the method when the document is a class header around exactly
    one `def` (how a method is shown with its class), else the first name it defines; None without one."""
    names = _DEF.findall(document)
    if not names:
        return None
    if len(names) == 2 and document.lstrip().startswith("class"):
        return names[1]
    return names[0]


def name_words(query: str, name: str) -> tuple[list[str], int]:
    """The query's distinct words (letters only, 3 or more, not English stopwords, lowercased, in query
    order) that occur inside `name` (lowercased), and how many distinct words the query has:
    ("Return the indent size of a line", "indentsize") -> (["indent", "size"], 4)."""
    stop = _TOKENIZER.stopwords
    words = list(dict.fromkeys(w for w in _WORD.findall(query.lower()) if w not in stop))
    lowered = name.lower()
    return [w for w in words if w in lowered], len(words)


def evidence(query: str, document: str, max_words: int = 8, max_calls: int = 6) -> str:
    """One to four short sentences: the query's words found in the document (identifier-aware, stemmed,
    in query order, at most `max_words`) out of its distinct words; the names the document defines; the
    functions it calls (code only, at most `max_calls`); the query words its own name spells (code only,
    `unit_name` / `name_words`), last, next to the label the student reads."""
    words = list(dict.fromkeys(w for w in _TOKENIZER(query) if "." not in w and "_" not in w))
    present = _document_words(document)
    found = [w for w in words if w in present]
    shown = ", ".join(found[:max_words]) if found else "none"
    parts = [f"Matches: {shown} ({len(found)} of {len(words)} query words)."]
    defined = list(dict.fromkeys(_DEF.findall(document)))
    if defined:
        parts.append("Defines " + ", ".join(defined[:3]) + ".")
    calls = _calls(document, max_calls)
    if calls:
        parts.append("Calls " + ", ".join(calls) + ".")
    name = unit_name(document)
    if name:
        spelled, total = name_words(query, name)
        shown = ", ".join(spelled[:max_words]) if spelled else "none"
        parts.append(f"Name {name} spells: {shown} ({len(spelled)} of {total} query words).")
    return " ".join(parts)
