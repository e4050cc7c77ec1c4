"""Retrieval metrics exactly as trec_eval 9 computes them (checked against pytrec_eval in the tests).

trec_eval conventions reproduced here:
  * the run is re-sorted by score descending, ties broken by docid descending (byte order); ranks in the
    file are ignored;
  * unjudged documents have gain 0; a document is relevant for MAP/Recall when its gain >= 1;
  * ndcg_cut_k uses linear gain and the discount log2(rank + 1) (rank 1 undiscounted); the ideal ranking is
    the judged gains sorted descending, cut at k; negative gains count as 0 in both;
  * only queries present in both the run and the qrels are scored (trec_eval without -c); with
    `complete=True` judged queries missing from the run score 0 (trec_eval -c).

Every metric returns a `MetricScore`: a float equal to the mean over queries, with `.per_query`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from rerankdistill.trec import Qrels, Run, sorted_ranking


class MetricScore(float):
    """The mean over queries (a float) carrying the per-query values in `.per_query`."""

    per_query: dict[str, float]

    def __new__(cls, per_query: dict[str, float]) -> MetricScore:
        mean = math.fsum(per_query.values()) / len(per_query) if per_query else 0.0
        obj = super().__new__(cls, mean)
        obj.per_query = per_query
        return obj


def _check(run: Run, qrels: Qrels, k: int | None) -> None:
    if not isinstance(run, Mapping) or not isinstance(qrels, Mapping):
        raise TypeError(
            f"run and qrels must be dicts of dicts, got {type(run).__name__} and {type(qrels).__name__}"
        )
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _per_query(
    run: Run, qrels: Qrels, complete: bool, fn: Callable[[list[int], dict[str, int]], float]
) -> MetricScore:
    scores: dict[str, float] = {}
    for qid in sorted(qrels):
        if qid not in run and not complete:
            continue
        judged = qrels[qid]
        gains = [judged.get(docid, 0) for docid, _ in sorted_ranking(run.get(qid, {}))]
        scores[qid] = fn(gains, judged)
    return MetricScore(scores)


def _dcg(gains: list[int]) -> float:
    total = 0.0
    for i, g in enumerate(gains):
        if g > 0:
            total += g / math.log2(i + 2)
    return total


def ndcg_at_k(run: Run, qrels: Qrels, k: int = 10, complete: bool = False) -> MetricScore:
    """trec_eval's ndcg_cut_k (linear gain).

    Args:
        run: {qid: {docid: score}}.
        qrels: {qid: {docid: gain}}.
        k: cutoff.
        complete: score judged queries absent from the run as 0 (trec_eval -c).
    """
    _check(run, qrels, k)

    def one(gains: list[int], judged: dict[str, int]) -> float:
        ideal = _dcg(sorted((g for g in judged.values() if g > 0), reverse=True)[:k])
        return _dcg(gains[:k]) / ideal if ideal > 0 else 0.0

    return _per_query(run, qrels, complete, one)


def average_precision(run: Run, qrels: Qrels, k: int | None = None, complete: bool = False) -> MetricScore:
    """trec_eval's map (or map_cut_k when k is given): relevant = gain >= 1, divided by all relevant."""
    _check(run, qrels, k)

    def one(gains: list[int], judged: dict[str, int]) -> float:
        num_rel = sum(1 for g in judged.values() if g >= 1)
        if num_rel == 0:
            return 0.0
        hits, total = 0, 0.0
        for i, g in enumerate(gains[:k]):
            if g >= 1:
                hits += 1
                total += hits / (i + 1)
        return total / num_rel

    return _per_query(run, qrels, complete, one)


def recall_at_k(run: Run, qrels: Qrels, k: int = 100, complete: bool = False) -> MetricScore:
    """trec_eval's recall_k: relevant retrieved in the top k over all relevant."""
    _check(run, qrels, k)

    def one(gains: list[int], judged: dict[str, int]) -> float:
        num_rel = sum(1 for g in judged.values() if g >= 1)
        return sum(1 for g in gains[:k] if g >= 1) / num_rel if num_rel else 0.0

    return _per_query(run, qrels, complete, one)


def precision_at_k(run: Run, qrels: Qrels, k: int = 10, complete: bool = False) -> MetricScore:
    """trec_eval's P_k: relevant in the top k over k (short rankings still divide by k)."""
    _check(run, qrels, k)
    return _per_query(run, qrels, complete, lambda gains, judged: sum(1 for g in gains[:k] if g >= 1) / k)


def reciprocal_rank(run: Run, qrels: Qrels, k: int | None = None, complete: bool = False) -> MetricScore:
    """trec_eval's recip_rank (MRR over queries): 1 / rank of the first document with gain >= 1, 0 if none.

    With `k` (MRR@k, trec_eval's recip_rank on the run cut at rank k) a first relevant document below rank k
    scores 0.
    """
    _check(run, qrels, k)

    def one(gains: list[int], judged: dict[str, int]) -> float:
        return next((1.0 / (i + 1) for i, g in enumerate(gains[:k]) if g >= 1), 0.0)

    return _per_query(run, qrels, complete, one)


def judged_at_k(run: Run, qrels: Qrels, k: int = 10, complete: bool = False) -> MetricScore:
    """Judged@k (ir_measures; Sakai 2007's condensed-list check): the share of the top k that has a
    judgement at any level (0 and negative included), divided by k like P_k.

    Reports how far a run's scores rest on unjudged documents (counted as non-relevant by every measure).
    """
    _check(run, qrels, k)
    scores: dict[str, float] = {}
    for qid in sorted(qrels):
        if qid not in run and not complete:
            continue
        top = sorted_ranking(run.get(qid, {}))[:k]
        scores[qid] = sum(1 for docid, _ in top if docid in qrels[qid]) / k
    return MetricScore(scores)


_METRICS: dict[str, Callable[..., MetricScore]] = {
    "ndcg_cut": ndcg_at_k,
    "map_cut": average_precision,
    "recall": recall_at_k,
    "P": precision_at_k,
    "recip_rank": reciprocal_rank,
    "judged": judged_at_k,
}


def evaluate(
    run: Run,
    qrels: Qrels,
    measures: tuple[str, ...] = ("ndcg_cut_10", "map", "recall_100"),
    complete: bool = False,
) -> dict[str, MetricScore]:
    """Several trec_eval measures by name: `ndcg_cut_K`, `map`, `map_cut_K`, `recall_K`, `P_K`, `recip_rank`,
    `recip_rank_K` (MRR@K) and `judged_K` (Judged@K).

    Raises a ValueError when no query would be scored (empty qrels, or no query of the run judged): a mean
    over zero queries is not a score.
    """
    out: dict[str, MetricScore] = {}
    for name in measures:
        if name in ("map", "recip_rank"):
            out[name] = (average_precision if name == "map" else reciprocal_rank)(
                run, qrels, complete=complete
            )
            continue
        base, _, cut = name.rpartition("_")
        if base not in _METRICS or not cut.isdigit():
            raise ValueError(
                f"unknown measure {name!r}; allowed: map, recip_rank, ndcg_cut_K, map_cut_K, recall_K, "
                "P_K, recip_rank_K (MRR@K), judged_K"
            )
        out[name] = _METRICS[base](run, qrels, int(cut), complete=complete)
    if not qrels:
        raise ValueError("the qrels hold no judged query: nothing to evaluate against")
    if not complete and not any(q in qrels for q in run):
        raise ValueError(
            f"none of the run's {len(run)} queries is judged in the qrels ({len(qrels)} judged "
            "queries): wrong qrels for this run, or mismatched query ids"
        )
    return out


def comparison_table(
    runs: Mapping[str, Run], qrels: Qrels, measures: tuple[str, ...] = ("ndcg_cut_10", "map", "recall_100")
) -> str:
    """A markdown table, one row per named run, one column per measure (means over the scored queries)."""
    header = "| run | queries | " + " | ".join(measures) + " |"
    lines = [header, "|---|---|" + "---|" * len(measures)]
    for name, run in runs.items():
        scores = evaluate(run, qrels, measures)
        n = len(next(iter(scores.values())).per_query) if scores else 0
        lines.append(f"| {name} | {n} | " + " | ".join(f"{float(scores[m]):.4f}" for m in measures) + " |")
    return "\n".join(lines) + "\n"
