"""Evidence-carrying explanations computed from the pair alone (no label, no model): which query words and
identifiers the document contains, and what the code names and calls. An offline teacher can write them
before its label (`QrelsTeacher(explanation="evidence")`), and a student can be given the same text at
inference (`rerank.TeacherForcedJudge`), so the exact-match signal that BM25 exploits is visible to it.

    >>> evidence("Quote the string, replacing spaces by plus signs.",
    ...          "def quote_plus(string, safe=''):\\n    return quote(string, safe).replace(' ', '+')")
    'Matches: quote, string, plus (3 of 6 query words). Defines quote_plus. Calls replace, quote.'
"""

from __future__ import annotations

import ast
import re

from rerankdistill.code_tokens import IdentifierTokenizer

_TOKENIZER = IdentifierTokenizer(stopwords="en", stemmer="s")
_DEF = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+([A-Za-z_]\w*)", re.M)


def _calls(document: str, limit: int) -> list[str]:
    try:
        tree = ast.parse(document)
    except (SyntaxError, ValueError):
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name and name not in names:
                names.append(name)
    return names[:limit]


def evidence(query: str, document: str, max_words: int = 8, max_calls: int = 6) -> str:
    """One or three short sentences: the query's words found in the document (identifier-aware, stemmed,
    in query order, at most `max_words`) out of its distinct words; the names the document defines; the
    functions it calls (code only, at most `max_calls`)."""
    words = list(dict.fromkeys(w for w in _TOKENIZER(query) if "." not in w and "_" not in w))
    present = set(_TOKENIZER(document))
    found = [w for w in words if w in present]
    shown = ", ".join(found[:max_words]) if found else "none"
    parts = [f"Matches: {shown} ({len(found)} of {len(words)} query words)."]
    defined = list(dict.fromkeys(_DEF.findall(document)))
    if defined:
        parts.append("Defines " + ", ".join(defined[:3]) + ".")
    calls = _calls(document, max_calls)
    if calls:
        parts.append("Calls " + ", ".join(calls) + ".")
    return " ".join(parts)
