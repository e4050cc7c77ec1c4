"""Metrics against scikit-learn (the official SemEval-2022 Task 2 evaluator's macro-F1)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from idiomreason.metrics import accuracy, bootstrap_macro_f1, confusion_matrix, macro_f1, summarise

I, L = "idiomatic", "literal"


def _random_case(rng: random.Random, n: int, p_none: float):
    gold = [rng.choice([I, L]) for _ in range(n)]
    pred = [None if rng.random() < p_none else rng.choice([I, L]) for _ in range(n)]
    return gold, pred


@pytest.mark.parametrize("seed", range(12))
def test_macro_f1_equals_sklearn(seed):
    rng = random.Random(seed)
    gold, pred = _random_case(rng, rng.choice([1, 2, 7, 97, 1025]), p_none=0.0)
    assert macro_f1(gold, pred) == pytest.approx(f1_score(gold, pred, average="macro"), abs=1e-12)
    assert accuracy(gold, pred) == pytest.approx(accuracy_score(gold, pred), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_unparseable_counts_against_the_gold_class_only(seed):
    rng = random.Random(100 + seed)
    gold, pred = _random_case(rng, 97, p_none=0.3)
    sentinel = ["<unparseable>" if p is None else p for p in pred]
    labels = sorted(set(gold) | {p for p in pred if p is not None})
    expected = f1_score(gold, sentinel, labels=labels, average="macro", zero_division=0)
    assert macro_f1(gold, pred) == pytest.approx(expected, abs=1e-12)
    assert accuracy(gold, pred) == pytest.approx(accuracy_score(gold, sentinel), abs=1e-12)


@pytest.mark.parametrize(
    "gold, pred",
    [
        ([I, I, I], [I, I, I]),  # one class only: sklearn averages over that class
        ([I, I, I], [L, L, L]),  # disjoint: both classes score 0
        ([I, L], [I, I]),
        ([L], [I]),
    ],
)
def test_degenerate_label_sets_match_sklearn(gold, pred):
    assert macro_f1(gold, pred) == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))


def test_semeval_style_labels_are_not_special():
    gold = ["0", "1", "1", "0", "1"]
    pred = ["0", "0", "1", "1", "1"]
    assert macro_f1(gold, pred) == pytest.approx(f1_score(gold, pred, average="macro"))


def test_confusion_matrix_has_an_unparseable_column():
    gold = [I, I, L, L, L, I]
    pred = [I, None, L, I, None, L]
    cm = confusion_matrix(gold, pred)
    assert cm.tolist() == [[1, 1, 1], [1, 1, 1]]
    parsed = [(g, p) for g, p in zip(gold, pred) if p is not None]
    sk = sk_confusion_matrix(*zip(*parsed), labels=[I, L])
    np.testing.assert_array_equal(cm[:, :2], sk)


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_n():
    rng = random.Random(7)
    gold, pred = _random_case(rng, 1025, p_none=0.05)
    pred = [g if rng.random() < 0.7 else p for g, p in zip(gold, pred)]
    point = macro_f1(gold, pred)
    lo, hi = bootstrap_macro_f1(gold, pred, n_resamples=500, seed=1)
    assert lo < point < hi
    small_lo, small_hi = bootstrap_macro_f1(gold[:97], pred[:97], n_resamples=500, seed=1)
    assert hi - lo < small_hi - small_lo
    assert bootstrap_macro_f1(gold, pred, n_resamples=200, seed=3) == bootstrap_macro_f1(
        gold, pred, n_resamples=200, seed=3
    )


def test_bootstrap_resample_scores_match_macro_f1():
    # With one resample the interval collapses to that resample's macro-F1: recompute it directly.
    gold = [I, L, L, I, L, I, I]
    pred = [I, None, L, L, L, I, None]
    seed = 5
    lo, hi = bootstrap_macro_f1(gold, pred, n_resamples=1, seed=seed)
    idx = np.random.default_rng(seed).integers(0, len(gold), size=(1, len(gold)))[0]
    expected = macro_f1([gold[i] for i in idx], [pred[i] for i in idx])
    assert lo == pytest.approx(expected) and hi == pytest.approx(expected)


def test_summarise():
    gold = [I, I, L, L]
    pred = [I, None, L, I]
    s = summarise(gold, pred, reasoning_words=[10, 20, 30, 41], n_resamples=50)
    assert s["n"] == 4 and s["n_unparseable"] == 1 and s["unparseable_rate"] == 0.25
    assert s["macro_f1"] == pytest.approx(macro_f1(gold, pred))
    assert s["macro_f1_parsed"] == pytest.approx(f1_score([I, L, L], [I, L, I], average="macro"))
    assert s["accuracy"] == 0.5
    assert s["reasoning_words_mean"] == 25.25 and s["reasoning_words_median"] == 25.0
    assert math.isnan(summarise([I], [None], n_resamples=5)["macro_f1_parsed"])


def test_bad_input():
    with pytest.raises(ValueError, match="same length"):
        macro_f1([I], [I, L])
    with pytest.raises(ValueError, match="gold must not contain None"):
        macro_f1([None], [I])
    with pytest.raises(ValueError, match="at least one"):
        macro_f1([], [])
    with pytest.raises(ValueError, match="not in labels"):
        confusion_matrix([I], ["maybe"])
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_macro_f1([I], [I], n_resamples=0)
