"""Paired significance tests on cases with known answers: identical runs, exact enumeration by hand,
scipy's ttest_rel, a normal-theory interval, and the input checks."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from shared_kernels.significance import (
    bootstrap_ci,
    compare_runs,
    paired_randomization_test,
    paired_t_test,
)


def test_identical_runs_are_not_different():
    a = {f"q{i}": v for i, v in enumerate(np.random.default_rng(0).random(40))}
    assert paired_randomization_test(a, dict(a)) == 1.0
    assert paired_t_test(a, dict(a)) == (0.0, 1.0)
    assert bootstrap_ci(a, dict(a)) == (0.0, 0.0, 0.0)


def test_randomization_exact_enumeration_by_hand():
    # d = (1, 2, 3): |sum| = 6 is reached by (+,+,+) and (-,-,-) only -> p = 2/8.
    assert paired_randomization_test([1, 2, 3], [0, 0, 0]) == 0.25
    # d = (1, 1, -1, 3): |sum| = 4; the three unit terms sum to 3 (1 way) or 1 (3 ways) with +3, and the
    # mirror images: 8 of 16 sign vectors reach |sum| >= 4.
    d = np.array([1.0, 1.0, -1.0, 3.0])
    count = sum(abs(np.dot(s, d)) >= 4 for s in itertools.product((1, -1), repeat=4))
    assert paired_randomization_test(d, np.zeros(4)) == count / 16 == 0.5
    # a - b and b - a give the same two-sided p
    assert paired_randomization_test([0, 0, 0], [1, 2, 3]) == 0.25


def test_randomization_monte_carlo_is_seeded_and_close_to_t_test():
    rng = np.random.default_rng(1)
    a, b = rng.random(60), rng.random(60) - 0.08  # an effect of about 1.5 standard errors
    p1 = paired_randomization_test(a, b, n_resamples=4000, seed=3)
    assert p1 == paired_randomization_test(a, b, n_resamples=4000, seed=3)
    _, p_t = paired_t_test(a, b)
    assert 0.0 < p1 < 1.0 and abs(p1 - p_t) < 0.03  # Smucker et al.: the two agree on n = 60
    # the estimate is never 0, even for an overwhelming difference
    assert paired_randomization_test(a + 10, a, n_resamples=100) == pytest.approx(1 / 101)


@pytest.mark.parametrize("seed", range(5))
def test_t_test_equals_scipy_ttest_rel(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    a, b = rng.random(n), rng.random(n) * 0.9
    t, p = paired_t_test(a, b)
    ref = stats.ttest_rel(a, b)
    assert t == pytest.approx(ref.statistic, rel=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    assert paired_t_test([1.0, 2.0], [0.0, 1.0]) == (np.inf, 0.0)  # equal non-zero differences


def test_bootstrap_interval():
    assert bootstrap_ci([3, 4, 5], [2, 3, 4]) == (1.0, 1.0, 1.0)  # a constant difference
    rng = np.random.default_rng(2)
    d = rng.normal(0.05, 0.2, size=400)
    mean, lo, hi = bootstrap_ci(d, np.zeros_like(d), n_resamples=4000, seed=0)
    half = stats.norm.ppf(0.975) * d.std(ddof=1) / np.sqrt(d.size)
    assert mean == pytest.approx(d.mean()) and lo < mean < hi
    assert lo == pytest.approx(mean - half, abs=0.15 * half) and hi == pytest.approx(
        mean + half, abs=0.15 * half
    )
    _, lo90, hi90 = bootstrap_ci(d, np.zeros_like(d), confidence=0.9, n_resamples=4000, seed=0)
    assert lo < lo90 < hi90 < hi


def test_dicts_pair_by_qid_and_metric_scores_work():
    a = {"q1": 1.0, "q2": 0.0, "q3": 0.5}
    b = {"q3": 0.5, "q1": 0.0, "q2": 0.0}  # another order: paired by qid
    assert paired_randomization_test(a, b) == 1.0 and bootstrap_ci(a, b)[0] == pytest.approx(1 / 3)
    good = SimpleNamespace(per_query={"1": 1.0, "2": 1.0, "3": 1.0})  # anything with `.per_query`
    bad = SimpleNamespace(per_query={"1": 0.5, "2": 0.5, "3": 0.5})
    summary = compare_runs(good, bad, n_resamples=100)
    assert summary["queries"] == 3 and summary["mean_diff"] == pytest.approx(0.5)
    assert summary["p_randomization"] == 0.25  # exact: 2 of 8 sign vectors


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"same queries: 1 only in a \['q2'\], 0 only in b"):
        paired_t_test({"q1": 1.0, "q2": 2.0}, {"q1": 1.0})
    with pytest.raises(ValueError, match="aligned 1-d sequences"):
        paired_randomization_test([1, 2], [1, 2, 3])
    with pytest.raises(TypeError, match="both be dicts"):
        bootstrap_ci({"q": 1.0}, [1.0])
    with pytest.raises(ValueError, match="no queries"):
        paired_randomization_test([], [])
    with pytest.raises(ValueError, match="finite"):
        paired_randomization_test([1.0, np.nan], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_t_test([1.0], [0.0])
    with pytest.raises(ValueError, match="n_resamples"):
        paired_randomization_test([1.0], [0.0], n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], [0.0], confidence=95)
