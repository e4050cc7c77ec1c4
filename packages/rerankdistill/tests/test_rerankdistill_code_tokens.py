"""Identifier-aware BM25: identifier splitting, stopwords/stemming, BM25 over the tokens, k1/b chosen on
validation queries."""

from __future__ import annotations

import pytest

from rerankdistill.bm25 import BM25Index, bm25_search, select_bm25_params
from rerankdistill.code_tokens import IdentifierTokenizer, identifier_parts, identifier_tokens, s_stem


@pytest.mark.parametrize(
    "name, parts",
    [
        ("quote_plus", ["quote", "plus"]),
        ("HTTPServer", ["HTTP", "Server"]),
        ("parseHTTPResponse2", ["parse", "HTTP", "Response", "2"]),
        ("get_IPAddress", ["get", "IPAddress", "IP", "Address"]),
        ("urllib.parse.quote_plus", ["urllib", "parse", "quote_plus", "quote", "plus"]),
        ("os.path", ["os", "path"]),
        ("simple", []),
        ("ABC", []),
        ("snake__double_", ["snake", "double"]),
    ],
)
def test_identifier_parts(name, parts):
    assert identifier_parts(name) == parts


def test_whole_identifier_kept_before_its_parts_lowercased():
    assert identifier_tokens("x = os.path.join(a, HTTPServer)", stopwords=None) == [
        "os.path.join",
        "os",
        "path",
        "join",
        "httpserver",
        "http",
        "server",
    ]
    # leading/trailing underscores of private names go; one-character words go
    assert identifier_tokens("_make_iterencode __init__ a b", stopwords=None) == [
        "make_iterencode",
        "make",
        "iterencode",
        "init",
    ]
    assert identifier_tokens("version 311 3", stopwords=None) == ["version", "311"]


def test_stopwords_and_stemming():
    assert identifier_tokens("Return the list of the files", stopwords="en") == ["return", "list", "files"]
    assert identifier_tokens("get_the_value", stopwords="en") == ["get_the_value", "get", "value"]
    assert identifier_tokens("Return the files", stopwords=["return"]) == ["the", "files"]
    assert identifier_tokens("queries classes files is", stopwords=None, stemmer="s") == [
        "query",
        "classe",
        "file",
        "is",
    ]
    assert identifier_tokens("Files", stopwords=None, stemmer=str.upper) == ["FILES"]
    # a dotted name is an identifier: never stemmed
    assert identifier_tokens("os.paths", stopwords=None, stemmer="s") == ["os.paths", "os", "path"]
    assert [s_stem(w) for w in ("bus", "class", "does", "ties", "s")] == ["bus", "class", "doe", "ty", "s"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stopwords": "french"}, "stopwords must be"),
        ({"stemmer": "porter"}, "stemmer must be one of"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IdentifierTokenizer(**kwargs)


CORPUS = {
    "quote": "def quote_plus(string, safe=''):\n    return quote(string, safe + ' ').replace(' ', '+')",
    "server": "class HTTPServer(socketserver.TCPServer):\n    allow_reuse_address = 1",
    "join": "def join(a, *p):\n    return os.fspath(a) + sep.join(p)",
    "misc": "def helper(x):\n    return x + 1  # plus one",
}


def test_identifier_bm25_finds_split_words_plain_bm25_misses():
    queries = {"1": "quote a string, spaces as plus signs", "2": "an http server"}
    plain = bm25_search(CORPUS, queries, k=4)
    code = bm25_search(CORPUS, queries, k=4, stopwords=None, tokenizer=IdentifierTokenizer())
    # plain BM25 keeps `quote_plus` and `HTTPServer` whole: only the helper's comment word "plus" matches
    assert "server" not in plain["2"]
    assert max(code["1"], key=code["1"].get) == "quote"
    assert list(code["2"]) == ["server"]


def test_tokenizer_excludes_bm25s_options():
    with pytest.raises(ValueError, match="stopwords=None"):
        BM25Index(CORPUS, tokenizer=IdentifierTokenizer())
    with pytest.raises(ValueError, match="need the tokenizer"):
        BM25Index(CORPUS, stopwords=None, tokens={d: ["x"] for d in CORPUS})
    with pytest.raises(ValueError, match="backend='bm25s'"):
        bm25_search(CORPUS, {"1": "x"}, stopwords=None, tokenizer=IdentifierTokenizer(), backend="pyserini")


def test_select_bm25_params_maximises_validation_ndcg():
    # doc "long" repeats the query word in a long document, "short" once in a short one: b decides the order
    corpus = {
        "short": "alpha beta",
        "long": "alpha " * 3 + " ".join(f"filler{i}" for i in range(40)),
        "other": "gamma delta",
    }
    queries, qrels = {"v": "alpha"}, {"v": {"short": 1}}
    k1, b, table = select_bm25_params(
        corpus, queries, qrels, IdentifierTokenizer(), k1s=(0.9, 1.2), bs=(0.0, 1.0), depth=2
    )
    assert set(table) == {(0.9, 0.0), (0.9, 1.0), (1.2, 0.0), (1.2, 1.0)}
    assert table[(k1, b)] == max(table.values()) == 1.0 and b == 1.0
    assert table[(0.9, 0.0)] < 1.0  # without length normalisation the long document wins
    with pytest.raises(ValueError, match="at least one"):
        select_bm25_params(corpus, {}, qrels, IdentifierTokenizer())
