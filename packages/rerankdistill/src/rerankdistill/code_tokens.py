"""Identifier-aware tokenization for searching code: `snake_case`, `CamelCase` and dotted names are split into
their words, and the whole identifier is kept as a token too, so a query word ("quote") matches `quote_plus`
while an exact identifier in the query (`urllib.parse.quote_plus`) still matches it more strongly.

    >>> identifier_tokens("Return urllib.parse.quote_plus(HTTPServer) for get_IPAddress", stopwords=None)
    ['return', 'urllib.parse.quote_plus', 'urllib', 'parse', 'quote_plus', 'quote', 'plus', 'httpserver',
     'http', 'server', 'for', 'get_ipaddress', 'get', 'ipaddress', 'ip', 'address']

Stopwords are dropped (as words and as identifier parts); an optional stemmer maps each word (the light
English "S" stemmer of Harman 1991 is built in: `stemmer="s"`). Tokens are lower case and at least 2
characters long, as bm25s's default tokenizer keeps them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

# a dotted name of identifiers, or a number
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|[0-9]+")
# CamelCase words: an acronym before a capitalised word (HTTP|Server), a capitalised or lower word, digits
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def s_stem(word: str) -> str:
    """Harman's "S" stemmer: -ies -> -y, -es -> -e, -s -> '' (not after e/a/u/s: 'does', 'has', 'bus',
    'class')."""
    if len(word) > 3 and word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word


STEMMERS: dict[str, Callable[[str], str]] = {"s": s_stem}


def _stopword_set(stopwords: str | Iterable[str] | None) -> frozenset[str]:
    if stopwords is None:
        return frozenset()
    if isinstance(stopwords, str):
        if stopwords not in ("en", "english"):
            raise ValueError(f"stopwords must be 'en', a list of words or None, got {stopwords!r}")
        from bm25s.stopwords import STOPWORDS_EN

        return frozenset(STOPWORDS_EN)
    return frozenset(w.lower() for w in stopwords)


def _stemmer(stemmer: str | Callable[[str], str] | None) -> Callable[[str], str] | None:
    if stemmer is None or callable(stemmer):
        return stemmer
    if stemmer not in STEMMERS:
        raise ValueError(
            f"stemmer must be one of {sorted(STEMMERS)}, a callable word -> word, or None, got {stemmer!r}"
        )
    return STEMMERS[stemmer]


def identifier_parts(name: str) -> list[str]:
    """The words inside one identifier (the whole name excluded): each component of a dotted name, each part
    of a snake_case name, each word of a CamelCase name -- a level is listed only when it splits."""
    out: list[str] = []
    components = name.split(".")
    for comp in components:
        if len(components) > 1:
            out.append(comp)
        pieces = [p for p in comp.split("_") if p]
        for piece in pieces:
            if len(pieces) > 1:
                out.append(piece)
            words = _CAMEL.findall(piece)
            if len(words) > 1:
                out.extend(words)
    return out


class IdentifierTokenizer:
    """A callable text -> tokens (see the module doc).

    Args:
        stopwords: "en" (bm25s's English list), a list of words, or None.
        stemmer: "s" (Harman's S stemmer), a callable word -> word, or None.
    """

    def __init__(self, stopwords: str | Iterable[str] | None = "en", stemmer: str | Callable | None = None):
        self.stopwords = _stopword_set(stopwords)
        self.stem = _stemmer(stemmer)
        self._cache: dict[str, str] = {}

    def _word(self, word: str) -> str | None:
        word = word.lower()
        if len(word) < 2 or word in self.stopwords:
            return None
        if self.stem is not None and "." not in word:
            cached = self._cache.get(word)
            if cached is None:
                cached = self._cache[word] = self.stem(word)
            word = cached
        return word

    def __call__(self, text: str) -> list[str]:
        tokens: list[str] = []
        for match in _TOKEN.finditer(text):
            name = match.group(0).strip("_")
            for word in [name, *identifier_parts(name)]:
                kept = self._word(word)
                if kept is not None:
                    tokens.append(kept)
        return tokens


def identifier_tokens(
    text: str, stopwords: str | Iterable[str] | None = "en", stemmer: str | Callable | None = None
) -> list[str]:
    """Tokens of `text` (see the module doc); for many texts build one `IdentifierTokenizer`."""
    return IdentifierTokenizer(stopwords, stemmer)(text)
