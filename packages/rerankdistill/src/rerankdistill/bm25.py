"""First-stage retrieval: BM25 over an in-memory corpus with bm25s (Lucene's BM25 variant), or with Lucene
itself through pyserini (`bm25_search(..., backend="pyserini")`, see `bm25_lucene`).

Only documents with a positive score are returned, as Lucene/pyserini do: a document sharing no term with the
query is not "retrieved". Ties keep bm25s's order here; the metrics re-sort by trec_eval's rule anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from rerankdistill.trec import Run


def _validate(corpus: Mapping[str, str], queries: Mapping[str, str], k: int) -> None:
    if not isinstance(corpus, Mapping) or not corpus:
        raise ValueError("corpus must be a non-empty dict {docid: text}")
    if not isinstance(queries, Mapping):
        raise TypeError(f"queries must be a dict {{qid: text}}, got {type(queries).__name__}")
    empty = [q for q, text in queries.items() if not isinstance(text, str) or not text.strip()]
    if empty:
        raise ValueError(f"queries must be non-empty strings; empty: {empty[:5]}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


class BM25Index:
    """A bm25s index over `corpus` that answers batches of queries.

    Args:
        corpus: {docid: text}.
        k1, b: BM25 parameters (Lucene defaults in Anserini are k1=0.9, b=0.4; bm25s's are 1.5, 0.75).
        stopwords: bm25s stopword list name ("en") or None.
        stemmer: a callable stemming a list of words (e.g. PyStemmer's `Stemmer.Stemmer("english").stemWords`)
            or None.
        tokenizer: a callable text -> list of tokens used instead of bm25s's tokenizer (then `stopwords` and
            `stemmer` must be None: the tokenizer applies its own), e.g.
            `rerankdistill.code_tokens.IdentifierTokenizer()` for code (identifiers split, whole kept).
        tokens: the corpus already tokenized by `tokenizer` ({docid: tokens}), to re-index with other k1/b
            without tokenizing again.
    """

    def __init__(
        self,
        corpus: Mapping[str, str],
        k1: float = 0.9,
        b: float = 0.4,
        stopwords: str | None = "en",
        stemmer: Callable | None = None,
        show_progress: bool = False,
        tokenizer: Callable[[str], list[str]] | None = None,
        tokens: Mapping[str, list[str]] | None = None,
    ):
        import bm25s

        if not isinstance(corpus, Mapping) or not corpus:
            raise ValueError("corpus must be a non-empty dict {docid: text}")
        if tokenizer is not None and (stopwords is not None or stemmer is not None):
            raise ValueError(
                "with a tokenizer, pass stopwords=None and stemmer=None (the tokenizer applies its own)"
            )
        if tokens is not None and tokenizer is None:
            raise ValueError(
                "tokens (a pre-tokenized corpus) need the tokenizer that made them, for the queries"
            )
        self._bm25s = bm25s
        self.docids = list(corpus)
        self.stopwords, self.stemmer, self.show_progress = stopwords, stemmer, show_progress
        self.tokenizer = tokenizer
        self.retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        if tokenizer is None:
            tokenized = bm25s.tokenize(
                [corpus[d] for d in self.docids],
                stopwords=stopwords,
                stemmer=stemmer,
                show_progress=show_progress,
            )
            self.retriever.index(tokenized, show_progress=show_progress)
            self.vocab = tokenized.vocab
        else:
            if tokens is None:
                tokens = {d: tokenizer(corpus[d]) for d in self.docids}
            self.retriever.index([tokens[d] for d in self.docids], show_progress=show_progress)
            self.vocab = self.retriever.vocab_dict

    def search(self, queries: Mapping[str, str], k: int = 100) -> Run:
        """Top-k documents per query: {qid: {docid: score}}, positive scores only."""
        _validate({"_": "_"}, queries, k)
        if not queries:
            return {}
        qids = list(queries)
        if self.tokenizer is not None:
            words = [self.tokenizer(queries[q]) for q in qids]
        else:
            words = self._bm25s.tokenize(
                [queries[q] for q in qids],
                stopwords=self.stopwords,
                stemmer=self.stemmer,
                return_ids=False,
                show_progress=False,
            )
        # bm25s refuses unknown words; a word absent from the corpus contributes nothing to BM25 anyway.
        words = [[w for w in ws if w and w in self.vocab] for ws in words]
        run: Run = {q: {} for q in qids}
        live = [i for i, ws in enumerate(words) if ws]
        if not live:
            return run
        depth = min(k, len(self.docids))
        idx, scores = self.retriever.retrieve(
            [words[i] for i in live], k=depth, show_progress=self.show_progress, n_threads=1
        )
        for row, i in enumerate(live):
            hits = run[qids[i]]
            for j, s in zip(idx[row].tolist(), np.asarray(scores[row], dtype=np.float64).tolist()):
                if s > 0:
                    hits[self.docids[j]] = s
        return run


BACKENDS = ("bm25s", "pyserini")


def bm25_search(
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    k: int = 100,
    k1: float = 0.9,
    b: float = 0.4,
    stopwords: str | None = "en",
    stemmer: Callable | str | None = None,
    backend: str = "bm25s",
    index_dir: str | None = None,
    tokenizer: Callable[[str], list[str]] | None = None,
) -> Run:
    """Index `corpus` with BM25 and return each query's top-k: {qid: {docid: score}}.

    Args:
        corpus: {docid: text}; queries: {qid: non-empty text}; k: depth per query.
        k1, b, stopwords: see `BM25Index`.
        stemmer: bm25s: a callable or None (see `BM25Index`); pyserini: None, "porter" or "krovetz".
        backend: "bm25s" (in memory, no Java) or "pyserini" (Lucene BM25: needs pyserini and Java 21+, see
            `bm25_lucene.LuceneBM25Index`).
        index_dir: pyserini only: keep the Lucene index in this (absent or empty) directory instead of a
            temporary one.
        tokenizer: bm25s only: see `BM25Index` (with it, pass stopwords=None).
    """
    _validate(corpus, queries, k)
    if backend == "pyserini" and tokenizer is not None:
        raise ValueError("tokenizer is for backend='bm25s' (pyserini tokenizes with Lucene's analyzer)")
    if backend == "pyserini":
        from rerankdistill.bm25_lucene import LUCENE_STEMMERS, LuceneBM25Index

        if callable(stemmer):
            raise ValueError(
                f"stemmer must be None or one of {LUCENE_STEMMERS} for backend='pyserini', got {stemmer!r}"
            )
        with LuceneBM25Index(
            corpus, k1=k1, b=b, stopwords=stopwords, stemmer=stemmer, index_dir=index_dir
        ) as index:
            return index.search(queries, k=k)
    if backend != "bm25s":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(stemmer, str):
        raise ValueError(
            f"stemmer={stemmer!r}: named Lucene stemmers need backend='pyserini'; bm25s takes a "
            "callable (e.g. PyStemmer's `Stemmer.Stemmer('english').stemWords`) or None"
        )
    if index_dir is not None:
        raise ValueError("index_dir is for backend='pyserini' (bm25s indexes in memory)")
    return BM25Index(corpus, k1=k1, b=b, stopwords=stopwords, stemmer=stemmer, tokenizer=tokenizer).search(
        queries, k=k
    )


K1_GRID = (0.6, 0.9, 1.2, 1.5, 2.0)
B_GRID = (0.2, 0.4, 0.6, 0.75, 0.9)


def select_bm25_params(
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    tokenizer: Callable[[str], list[str]],
    k1s: tuple[float, ...] = K1_GRID,
    bs: tuple[float, ...] = B_GRID,
    depth: int = 10,
) -> tuple[float, float, dict[tuple[float, float], float]]:
    """k1 and b maximising nDCG@`depth` of `queries` (validation queries: never the evaluation ones), over a
    grid.

    The corpus is tokenized once. Ties go to the first (k1, b) in grid order.

    Returns:
        (k1, b, {(k1, b): nDCG@depth}).
    """
    from rerankdistill.metrics import ndcg_at_k

    if not queries:
        raise ValueError("select_bm25_params needs at least one (validation) query")
    tokens = {d: tokenizer(t) for d, t in corpus.items()}
    judged = {q: dict(qrels[q]) for q in queries if q in qrels}
    if not judged:
        raise ValueError("none of the queries has judgements in qrels")
    table: dict[tuple[float, float], float] = {}
    for k1 in k1s:
        for b in bs:
            index = BM25Index(corpus, k1=k1, b=b, stopwords=None, tokenizer=tokenizer, tokens=tokens)
            run = index.search({q: queries[q] for q in judged}, k=depth)
            table[(k1, b)] = float(ndcg_at_k(run, judged, depth))
    best = max(table, key=lambda kb: (table[kb], -list(table).index(kb)))
    return best[0], best[1], table
