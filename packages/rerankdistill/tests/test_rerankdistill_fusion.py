"""Score fusion: the interpolation formula, its ends (w=0 is the first stage, w=1 the reranker), the tail, the
weight selection on held-out queries, and bad input."""

import random

import pytest

from rerankdistill.fusion import fuse, select_fusion_weight, smoothed_scores
from rerankdistill.metrics import ndcg_at_k
from rerankdistill.trec import sorted_ranking


def _random_case(seed: int, n_queries: int = 7, n_docs: int = 13, k: int = 9):
    rng = random.Random(seed)
    first = {
        f"q{i}": {f"d{j}": round(rng.uniform(0, 20), 3) for j in range(n_docs)} for i in range(n_queries)
    }
    rer = {q: {d: rng.choice([0.0, 0.5, 1.0, 1.7, 2.0]) for d in docs} for q, docs in first.items()}
    qrels = {q: {d: rng.choice([0, 0, 1, 2]) for d in docs} for q, docs in first.items()}
    return first, rer, qrels, k


def _order(run, qid):
    return [d for d, _ in sorted_ranking(run[qid])]


def test_ends_are_first_stage_and_reranker_order_and_tail_is_kept():
    first, rer, _, k = _random_case(0)
    for qid, docs in first.items():
        bm25 = _order({qid: docs}, qid)
        assert _order(fuse(first, rer, 0.0, k), qid) == bm25
        by_reranker = sorted(bm25[:k], key=lambda d: (-rer[qid][d], bm25.index(d)))
        assert _order(fuse(first, rer, 1.0, k), qid) == by_reranker + bm25[k:]
        assert _order(fuse(first, rer, 0.4, k), qid)[k:] == bm25[k:]


def test_interpolation_formula_by_hand():
    first = {"q": {"a": 10.0, "b": 6.0, "c": 2.0}}
    rer = {"q": {"a": 0.0, "b": 2.0, "c": 1.0}}
    # normalised first stage a=1, b=0.5, c=0; reranker / 2: a=0, b=1, c=0.5
    # w=0.3: a 0.7, b 0.65, c 0.15 -> a b c; w=0.6: a 0.4, b 0.8, c 0.3 -> b a c; w=0.9: a 0.1, b 0.95, c 0.45
    assert _order(fuse(first, rer, 0.3, 3), "q") == ["a", "b", "c"]
    assert _order(fuse(first, rer, 0.6, 3), "q") == ["b", "a", "c"]
    assert _order(fuse(first, rer, 0.9, 3), "q") == ["b", "c", "a"]
    # max_score scales the reranker: w=0.5, /2: a 0.5, b 0.75 -> b first; /4: a 0.5, b 0.5, tie -> first stage
    assert _order(fuse(first, rer, 0.5, 3), "q") == ["b", "a", "c"]
    assert _order(fuse(first, rer, 0.5, 3, max_score=4.0), "q") == ["a", "b", "c"]


def test_selection_uses_only_its_queries_and_prefers_the_smallest_tied_weight():
    first, rer, qrels, k = _random_case(1)
    val = {q: qrels[q] for q in list(qrels)[:4]}
    w, scores = select_fusion_weight(first, rer, val, k, smoothing=0)
    assert scores[w] == max(scores.values()) and all(scores[v] < scores[w] for v in scores if v < w)
    assert sorted(scores) == [i / 20 for i in range(21)]
    assert scores[0.0] == pytest.approx(float(ndcg_at_k({q: first[q] for q in val}, val, 10)))
    # a perfect reranker on the selection queries: w=1 reaches the oracle top-k reordering
    oracle = {q: {d: float(qrels[q].get(d, 0)) for d in docs} for q, docs in first.items()}
    w, scores = select_fusion_weight(first, oracle, val, k)
    assert scores[1.0] >= scores[0.0] and w > 0


def test_smoothing_prefers_a_plateau_to_a_spike_beside_a_cliff():
    # raw maximum 0.7 (a spike right before the curve falls); the plateau 0.3-0.5 is better on average
    scores = {
        0.0: 0.30,
        0.1: 0.31,
        0.2: 0.34,
        0.3: 0.37,
        0.4: 0.37,
        0.5: 0.37,
        0.6: 0.35,
        0.7: 0.38,
        0.8: 0.2,
    }
    smoothed = smoothed_scores(scores, 0.1)
    assert smoothed[0.4] == pytest.approx(0.37) and smoothed[0.7] == pytest.approx((0.35 + 0.38 + 0.2) / 3)
    assert smoothed[0.0] == pytest.approx((0.30 + 0.31) / 2)  # one neighbour at the end
    assert max(scores, key=lambda w: scores[w]) == 0.7 and max(smoothed, key=lambda w: smoothed[w]) == 0.4
    assert smoothed_scores(scores, 0) == scores


def test_selection_takes_the_smoothed_maximum():
    first, rer, qrels, k = _random_case(3)
    val = {q: qrels[q] for q in list(qrels)[:6]}
    w, scores = select_fusion_weight(first, rer, val, k, smoothing=0.1)
    smoothed = smoothed_scores(scores, 0.1)
    assert smoothed[w] == max(smoothed.values())
    assert all(smoothed[v] < smoothed[w] for v in smoothed if v < w)


def test_bad_input_names_the_argument():
    first, rer, qrels, k = _random_case(2)
    with pytest.raises(ValueError, match="weight"):
        fuse(first, rer, 1.5, k)
    with pytest.raises(ValueError, match="reranker has no score"):
        fuse(first, {"q0": {}}, 0.5, k)
    with pytest.raises(ValueError, match="grid"):
        select_fusion_weight(first, rer, qrels, k, grid=())
    with pytest.raises(ValueError, match="smoothing"):
        select_fusion_weight(first, rer, qrels, k, smoothing=-0.1)
    with pytest.raises(ValueError, match="no query"):
        select_fusion_weight(first, rer, {"other": {"d0": 1}}, k)
