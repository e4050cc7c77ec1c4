"""Score fusion: a reranker's scores interpolated with the first stage's, the weight chosen on held-out
queries.

Pointwise rerankers are often combined with the first stage instead of replacing it (e.g. the interpolation
of BM25 and neural scores in Lin et al., "Pretrained Transformers for Text Ranking", s.3.2.2): for each
query's top-k,

    fused(d) = w * r(d) / r_max + (1 - w) * (f(d) - f_min) / (f_max - f_min)

with r the reranker score (E[label] in [0, r_max]) and f the first-stage score, min-max normalised within the
query's top-k (a query whose top-k scores are all equal gets 0 for every document). w = 0 is the first
stage's order and w = 1 the reranker's (ties broken by the first stage in both). The documents beyond the
top-k keep their first-stage order below. Runs are written with rank-based scores (k, k-1, ...), like
`rerankdistill.rerank`.

`select_fusion_weight` picks w on queries that are NOT the evaluation queries (a validation split); picking it
on the evaluation queries would report a tuned number as if it were held out. On a few hundred validation
queries the nDCG@10-by-w curve is noisy, and its raw maximum often sits on the shoulder just before the
curve falls towards the reranker alone (a weight that then falls off the cliff on other queries). So by
default w maximises the validation curve smoothed by a moving average: each weight's score is the mean over
the grid weights within +-`smoothing` of it (0.1 on the 0.05 grid: five points; fewer at the ends).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rerankdistill.metrics import ndcg_at_k
from rerankdistill.trec import Qrels, Run, _neg_key, sorted_ranking

DEFAULT_GRID = tuple(i / 20 for i in range(21))
DEFAULT_SMOOTHING = 0.1


def fuse(
    first_stage: Run,
    reranker: Mapping[str, Mapping[str, float]],
    weight: float,
    k: int,
    max_score: float = 2.0,
) -> Run:
    """The fused run (see the module docstring).

    Args:
        first_stage: {qid: {docid: score}}, every query to fuse.
        reranker: {qid: {docid: score}} for (at least) each query's first-stage top-k, scores in
            [0, max_score].
        weight: w in [0, 1].
        k: the top-k that was reranked.
        max_score: the reranker's largest score (2 for E[label] over labels 0..2).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if k < 1 or max_score <= 0:
        raise ValueError(f"k must be >= 1 and max_score > 0, got {k}, {max_score}")
    fused_run: Run = {}
    for qid, docs in first_stage.items():
        ranking = sorted_ranking(docs)
        head, tail = ranking[:k], ranking[k:]
        missing = [d for d, _ in head if d not in reranker.get(qid, {})]
        if missing:
            raise ValueError(f"reranker has no score for query {qid!r}, documents {missing[:3]}")
        lo, hi = min(s for _, s in head), max(s for _, s in head)
        keyed = []
        for docid, first in head:
            norm = (first - lo) / (hi - lo) if hi > lo else 0.0
            value = weight * reranker[qid][docid] / max_score + (1.0 - weight) * norm
            keyed.append((value, first, docid))
        keyed.sort(key=lambda t: (-t[0], -t[1], _neg_key(t[2])))
        order = [d for _, _, d in keyed] + [d for d, _ in tail]
        fused_run[qid] = {docid: float(len(order) - i) for i, docid in enumerate(order)}
    return fused_run


def select_fusion_weight(
    first_stage: Run,
    reranker: Mapping[str, Mapping[str, float]],
    qrels: Qrels,
    k: int,
    grid: Sequence[float] = DEFAULT_GRID,
    cutoff: int = 10,
    max_score: float = 2.0,
    smoothing: float = DEFAULT_SMOOTHING,
) -> tuple[float, dict[float, float]]:
    """The weight of `grid` with the best smoothed mean nDCG@cutoff on `qrels`' queries (ties: the smallest
    weight, i.e. the one closest to the first stage), and every weight's (unsmoothed) score.

    Args:
        first_stage, reranker, k, max_score: as in `fuse`; only the queries of `qrels` are used.
        qrels: the judgements of the selection (validation) queries.
        grid: candidate weights in [0, 1].
        cutoff: nDCG's cutoff.
        smoothing: the moving average's half-width (see `smoothed_scores`); 0 picks the raw maximum.
    """
    if not grid:
        raise ValueError("grid must not be empty")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    queries = {q: first_stage[q] for q in qrels if q in first_stage}
    if not queries:
        raise ValueError("no query of qrels is in first_stage: nothing to select the weight on")
    scores = {
        float(w): float(ndcg_at_k(fuse(queries, reranker, w, k, max_score), qrels, cutoff))
        for w in sorted(grid)
    }
    smoothed = smoothed_scores(scores, smoothing)
    best = max(smoothed.values())
    return min(w for w, s in smoothed.items() if s == best), scores


def smoothed_scores(scores: Mapping[float, float], half_width: float) -> dict[float, float]:
    """Each weight's score averaged with those of every weight within +-half_width of it (itself included;
    fewer neighbours at the ends of the grid). half_width 0 returns the scores unchanged."""
    tolerance = 1e-9  # grid points such as 0.15 + 0.1 are not exact in binary
    return {
        w: sum(s for v, s in scores.items() if abs(v - w) <= half_width + tolerance)
        / sum(1 for v in scores if abs(v - w) <= half_width + tolerance)
        for w in scores
    }
