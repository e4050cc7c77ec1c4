"""rerankdistill benchmarks: BM25 (bm25s) against rank_bm25 and against Lucene (pyserini) on Cranfield;
pointwise reranking throughput of the transformers backend with and without batching."""

from __future__ import annotations

import numpy as np

from bench.harness import BenchContext, benchmark


def _cranfield():
    from rerankdistill.datasets import load_cranfield
    from shared_kernels.testing import shared_data_dir

    root = shared_data_dir()
    if root is None:
        raise RuntimeError("shared data (../shared/data/cranfield) not found")
    return load_cranfield(root / "cranfield")


@benchmark("bm25-cranfield", package="rerankdistill", device="cpu")
def bm25_cranfield(ctx: BenchContext) -> None:
    """BM25 on Cranfield (1,400 docs, 225 queries, top-100): bm25s (ours, via BM25Index) vs rank_bm25
    BM25Okapi, same tokens (bm25s tokenizer, English stopwords). Index includes tokenisation; retrieval = all
    225 queries."""
    import bm25s
    from rank_bm25 import BM25Okapi

    from rerankdistill.bm25 import BM25Index

    corpus, queries, _ = _cranfield()
    texts = list(corpus.values())
    qtexts = list(queries.values())

    def rank_index():
        tokens = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
        return BM25Okapi(tokens)

    ctx.compare(
        "index 1,400 docs",
        lambda: BM25Index(corpus),
        rank_index,
        ours_name="bm25s",
        anchor_name="rank_bm25",
        work=len(texts),
        unit="docs",
    )
    ours_index, anchor_index = BM25Index(corpus), rank_index()

    def rank_search():
        qtok = bm25s.tokenize(qtexts, stopwords="en", return_ids=False, show_progress=False)
        return [np.argsort(-anchor_index.get_scores(q))[:100] for q in qtok]

    ctx.compare(
        "retrieve 225 queries top-100",
        lambda: ours_index.search(queries, k=100),
        rank_search,
        ours_name="bm25s",
        anchor_name="rank_bm25",
        work=len(qtexts),
        unit="queries",
        reps=3 if ctx.quick else 5,
    )


@benchmark("bm25-pyserini-cranfield", package="rerankdistill", device="cpu")
def bm25_pyserini_cranfield(ctx: BenchContext) -> None:
    """BM25 on Cranfield (1,400 docs, 225 queries, top-100, k1=0.9 b=0.4, English stopwords, no stemming):
    bm25s (ours, BM25Index) vs Lucene through pyserini (LuceneBM25Index, 1 thread, index in a temporary
    directory; JVM start excluded by the warm-up). Needs pyserini and Java 21+."""
    from rerankdistill.bm25 import BM25Index
    from rerankdistill.bm25_lucene import LuceneBM25Index

    corpus, queries, _ = _cranfield()

    def lucene_index():
        LuceneBM25Index(corpus).close()

    ctx.compare(
        "index 1,400 docs",
        lambda: BM25Index(corpus),
        lucene_index,
        ours_name="bm25s",
        anchor_name="pyserini",
        work=len(corpus),
        unit="docs",
        reps=3 if ctx.quick else 5,
    )
    ours_index = BM25Index(corpus)
    with LuceneBM25Index(corpus) as anchor_index:
        ctx.compare(
            "retrieve 225 queries top-100",
            lambda: ours_index.search(queries, k=100),
            lambda: anchor_index.search(queries, k=100),
            ours_name="bm25s",
            anchor_name="pyserini",
            work=len(queries),
            unit="queries",
            reps=3 if ctx.quick else 5,
        )


def _rerank_case(
    ctx: BenchContext, device: str, hidden: int, layers: int, n_pairs: int, new_tokens: int
) -> None:
    import torch

    from rerankdistill.backends.hf import TransformersBackend
    from rerankdistill.rerank import TransformersJudge
    from shared_kernels.testing.tiny_lm import tiny_causal_lm, train_tokenizer

    if device == "cpu":
        torch.set_num_threads(1)  # the 2 shared cores are oversubscribed; one thread is steadier and faster
    corpus, queries, _ = _cranfield()
    tok = train_tokenizer()
    model = tiny_causal_lm(tokenizer=tok, hidden_size=hidden, num_layers=layers).to(device).eval()
    qids, docs = list(queries)[:n_pairs], list(corpus.values())[:n_pairs]
    pairs = [(queries[q], d[:1000]) for q, d in zip(qids, docs)]
    for batch in (8, 16) if not ctx.quick else (8,):
        batched = TransformersJudge(
            TransformersBackend(model, tok, max_new_tokens=new_tokens, batch_size=batch)
        )
        single = TransformersJudge(TransformersBackend(model, tok, max_new_tokens=new_tokens, batch_size=1))
        with torch.no_grad():
            ctx.compare(
                f"{n_pairs} pairs, {new_tokens} new tokens, batch {batch} vs 1",
                lambda j=batched: j.judge(pairs),
                lambda j=single: j.judge(pairs),
                ours_name=f"batch={batch}",
                anchor_name="batch=1",
                work=n_pairs,
                unit="pairs",
                reps=2 if ctx.quick else 3,
                warmup=1,
            )


@benchmark("rerank-batching-cpu", package="rerankdistill", device="cpu")
def rerank_batching_cpu(ctx: BenchContext) -> None:
    """Pointwise reranking (explanation generation + label probabilities) with the transformers backend on a
    tiny Llama (hidden 64, 2 layers, fp32, 1 torch thread), Cranfield pairs: batched vs one pair at a time,
    pairs/s."""
    _rerank_case(ctx, "cpu", hidden=64, layers=2, n_pairs=16, new_tokens=16)


@benchmark("rerank-batching-cuda", package="rerankdistill", device="cuda")
def rerank_batching_cuda(ctx: BenchContext) -> None:
    """As rerank-batching-cpu on a GPU with a wider model (hidden 512, 4 layers), 64 pairs, 64 new tokens."""
    _rerank_case(ctx, "cuda", hidden=512, layers=4, n_pairs=64, new_tokens=64)
