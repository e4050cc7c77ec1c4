"""Metrics equal trec_eval (through pytrec_eval) to the last bit on random runs with ties and unjudged
docs."""

from __future__ import annotations

import random

import pytest

from rerankdistill.metrics import average_precision, comparison_table, evaluate, ndcg_at_k, recall_at_k

pytrec_eval = pytest.importorskip("pytrec_eval")

MEASURES = ("ndcg_cut_10", "ndcg_cut_5", "map", "recall_10", "recall_100", "P_10", "map_cut_10")


def random_case(seed: int, negative: bool) -> tuple[dict, dict]:
    rng = random.Random(seed)
    qrels, run = {}, {}
    for q in range(rng.randint(1, 12)):
        qid = f"q{q}"
        pool = [f"d{rng.randint(0, 60)}" for _ in range(rng.randint(1, 50))]
        levels = [-1, 0, 1, 2, 3] if negative else [0, 1, 2, 3]
        if rng.random() < 0.9:
            qrels[qid] = {d: rng.choice(levels) for d in pool[: rng.randint(1, len(pool))]}
        if rng.random() < 0.9:
            # coarse scores make many ties; some retrieved docs are unjudged
            run[qid] = {d: float(rng.randint(0, 6)) / 2 for d in set(pool + [f"u{rng.randint(0, 9)}"])}
    return run, qrels


@pytest.mark.parametrize("seed", range(40))
def test_measures_equal_pytrec_eval(seed):
    run, qrels = random_case(seed, negative=seed % 3 == 0)
    ours = evaluate(run, qrels, MEASURES)
    theirs = pytrec_eval.RelevanceEvaluator(qrels, set(MEASURES)).evaluate(run)
    for name in MEASURES:
        assert set(ours[name].per_query) == set(theirs), name
        for qid, value in theirs.items():
            assert ours[name].per_query[qid] == value[name], (name, qid)


def test_hand_computed_ndcg_and_tie_order():
    qrels = {"1": {"a": 2, "b": 1, "c": 0}}
    # a and b tie: trec_eval orders ties by docid descending, so b (gain 1) comes before a (gain 2).
    run = {"1": {"a": 1.0, "b": 1.0, "c": 2.0}}
    import math

    dcg = 0 / 1 + 1 / math.log2(3) + 2 / math.log2(4)
    idcg = 2 + 1 / math.log2(3)
    assert ndcg_at_k(run, qrels) == pytest.approx(dcg / idcg, abs=0, rel=1e-15)
    assert float(average_precision(run, qrels)) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert recall_at_k(run, qrels, k=2).per_query == {"1": 0.5}


def test_query_sets_and_complete_flag():
    qrels = {"1": {"a": 1}, "2": {"b": 1}}
    run = {"1": {"a": 1.0}, "3": {"z": 1.0}}
    assert ndcg_at_k(run, qrels).per_query == {"1": 1.0}
    full = ndcg_at_k(run, qrels, complete=True)
    assert full.per_query == {"1": 1.0, "2": 0.0} and float(full) == 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k({}, {}, k=0)
    with pytest.raises(ValueError, match="unknown measure"):
        evaluate({}, {}, ("ndcg@10",))
    with pytest.raises(TypeError, match="run and qrels"):
        ndcg_at_k([], {})


def test_comparison_table_lists_each_run():
    qrels = {"1": {"a": 1}}
    table = comparison_table(
        {"BM25": {"1": {"b": 2.0, "a": 1.0}}, "reranked": {"1": {"a": 2.0, "b": 1.0}}},
        qrels,
        ("ndcg_cut_10",),
    )
    assert "| BM25 | 1 | 0.6309 |" in table and "| reranked | 1 | 1.0000 |" in table


def test_edge_cases_equal_pytrec_eval():
    qrels = {"a": {"é1": 2, "d2": 0, "d3": 1}, "b": {"x": 1}, "c": {"n": 0}, "d": {"z": 3}}
    run = {
        "a": {"é1": -5.0, "d2": -1.0, "zz": -1.0, "d3": -1e9},  # negative scores, unjudged tie, unicode id
        "b": {},  # an empty ranking
        "c": {"n": 1.0, "m": 1.0},  # no relevant document judged at all
        "d": {"z": 1e300, "y": 1e300},
    }
    measures = ("ndcg_cut_10", "ndcg_cut_1", "map", "recall_1000", "P_5")
    ours = evaluate(run, qrels, measures)
    theirs = pytrec_eval.RelevanceEvaluator(qrels, set(measures)).evaluate(run)
    for name in measures:
        for qid, value in theirs.items():
            assert ours[name].per_query[qid] == value[name], (name, qid)
        assert set(ours[name].per_query) == set(theirs)


@pytest.mark.parametrize("seed", range(20))
def test_mrr_and_judged_equal_pytrec_eval(seed):
    """recip_rank is trec_eval's; MRR@k is trec_eval's recip_rank on the run cut at rank k (in trec_eval's
    order); Judged@k is trec_eval's P_k with every judged document (any level) made relevant."""
    from rerankdistill.trec import sorted_ranking

    run, qrels = random_case(100 + seed, negative=seed % 2 == 0)
    ours = evaluate(run, qrels, ("recip_rank", "recip_rank_3", "recip_rank_10", "judged_5", "judged_10"))
    full = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
    all_judged = {q: dict.fromkeys(docs, 1) for q, docs in qrels.items()}
    judged = pytrec_eval.RelevanceEvaluator(all_judged, {"P_5", "P_10"}).evaluate(run)
    assert set(ours["recip_rank"].per_query) == set(full) == set(ours["judged_5"].per_query)
    for qid in full:
        assert ours["recip_rank"].per_query[qid] == full[qid]["recip_rank"]
        assert ours["judged_5"].per_query[qid] == judged[qid]["P_5"]
        assert ours["judged_10"].per_query[qid] == judged[qid]["P_10"]
    for k in (3, 10):
        cut = {q: dict(sorted_ranking(docs)[:k]) for q, docs in run.items()}
        theirs = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        for qid in theirs:
            assert ours[f"recip_rank_{k}"].per_query[qid] == theirs[qid]["recip_rank"], (k, qid)


def test_mrr_and_judged_by_hand():
    from rerankdistill.metrics import judged_at_k, reciprocal_rank

    qrels = {"1": {"a": 0, "b": 2, "c": -1}}
    run = {"1": {"x": 5.0, "a": 4.0, "c": 3.0, "b": 2.0}}  # first relevant (b) at rank 4
    assert reciprocal_rank(run, qrels).per_query == {"1": 0.25}
    assert reciprocal_rank(run, qrels, k=3).per_query == {"1": 0.0}
    assert judged_at_k(run, qrels, k=2).per_query == {"1": 0.5}  # a judged 0 still counts as judged
    assert judged_at_k(run, qrels, k=10).per_query == {"1": 0.3}  # short ranking still divides by k


def test_metric_scores_go_straight_into_the_significance_tests():
    import numpy as np

    from rerankdistill import compare_runs

    qrels = {"1": {"a": 1}, "2": {"b": 1}, "3": {"c": 1}}
    good = ndcg_at_k({q: {d: 1.0 for d in docs} for q, docs in qrels.items()}, qrels)
    bad = ndcg_at_k({q: {"z": 2.0, **{d: 1.0 for d in docs}} for q, docs in qrels.items()}, qrels)
    summary = compare_runs(good, bad, n_resamples=100)
    assert summary["queries"] == 3 and summary["mean_diff"] == pytest.approx(1 - 1 / np.log2(3))
    assert summary["p_randomization"] == 0.25  # exact: 2 of 8 sign vectors
