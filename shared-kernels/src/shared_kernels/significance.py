"""Paired significance tests between two systems scored on the same units: queries of a retrieval run
(Smucker, Allan & Carterette, CIKM 2007: the randomization test and the paired t-test agree on IR data; the
sign test does not), seeds of a training study, probe windows. The one home of these tests: rerankdistill's
evaluation, siattn's retrieval study, nf4lora's study and mxfp8train's parity study all use it.

numpy only, except `paired_t_test`, which needs scipy (the `shared-kernels[stats]` extra).

Each test takes the per-unit scores of system A and system B, either as dicts {qid: score} (the same qid
set is required: a query scored by one system only is an error, not silently dropped) or as two aligned
sequences, or as two `MetricScore`s (their `.per_query`). Differences are a - b.

  * `paired_randomization_test`: two-sided sign-flip test on the per-query differences. Under H0 the sign
    of each difference is exchangeable; the statistic is |mean difference|. Exact (all 2^n sign vectors)
    when 2^n <= n_resamples, else Monte Carlo with the (count + 1) / (n_resamples + 1) estimate, which is
    never 0 (Phipson & Smyth 2010).
  * `paired_t_test`: Student's t on the differences (= scipy.stats.ttest_rel), two-sided.
  * `bootstrap_ci`: percentile bootstrap confidence interval of the mean difference, queries resampled with
    replacement.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

Scores = Mapping[str, float] | Sequence[float]


def paired_differences(a: Scores, b: Scores) -> np.ndarray:
    """Per-query differences a - b (float64), paired by qid for dicts, by position for sequences.

    Raises:
        ValueError: different qid sets / lengths, fewer than 1 query, or a non-finite score.
        TypeError: one dict and one sequence.
    """
    a = getattr(a, "per_query", a)
    b = getattr(b, "per_query", b)
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise TypeError(
            f"a and b must both be dicts (qid -> score) or both sequences, got "
            f"{type(a).__name__} and {type(b).__name__}"
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if only_a or only_b:
            raise ValueError(
                f"a and b must score the same queries: {len(only_a)} only in a "
                f"{only_a[:5]}, {len(only_b)} only in b {only_b[:5]}"
            )
        qids = sorted(a)
        x = np.array([a[q] for q in qids], dtype=np.float64)
        y = np.array([b[q] for q in qids], dtype=np.float64)
    else:
        x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape:
            raise ValueError(f"a and b must be aligned 1-d sequences, got shapes {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("a and b hold no queries")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("a and b must hold finite scores")
    return x - y


def _check_resamples(n_resamples: int) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")


def paired_randomization_test(a: Scores, b: Scores, *, n_resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of the sign-flip randomization test on mean(a - b).

    Args:
        a, b: per-query scores of the two systems (see the module docstring).
        n_resamples: random sign vectors; when 2^n <= n_resamples all 2^n are enumerated (exact p).
        seed: seed of the random sign vectors (unused when exact).
    """
    _check_resamples(n_resamples)
    d = paired_differences(a, b)
    n = d.size
    observed = abs(d.sum())
    # Sums of the same numbers in another order differ by rounding only: count those as ties.
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))
    if n <= 20 and 2**n <= n_resamples:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # (2^n, n)
        return float(np.mean(np.abs(signs @ d) >= observed - tol))
    rng = np.random.default_rng(seed)
    count = 0
    for start in range(0, n_resamples, 1024):  # chunks bound memory at 1024 x n
        signs = rng.choice((-1.0, 1.0), size=(min(1024, n_resamples - start), n))
        count += int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (count + 1) / (n_resamples + 1)


def paired_t_test(a: Scores, b: Scores) -> tuple[float, float]:
    """(t, two-sided p) of the paired t-test on a - b, as scipy.stats.ttest_rel.

    All differences zero gives (0.0, 1.0) (scipy: nan); equal non-zero differences give (+-inf, 0.0).
    """
    d = paired_differences(a, b)
    if d.size < 2:
        raise ValueError(f"the paired t-test needs at least 2 queries, got {d.size}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(d.size))
    from scipy import stats  # the `stats` extra: only this test needs the t distribution

    return t, float(2 * stats.t.sf(abs(t), d.size - 1))


def bootstrap_ci(
    a: Scores, b: Scores, *, confidence: float = 0.95, n_resamples: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean difference, low, high): percentile bootstrap interval of mean(a - b) over resampled queries."""
    _check_resamples(n_resamples)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    d = paired_differences(a, b)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 1024):
        m = min(1024, n_resamples - start)
        means[start : start + m] = d[rng.integers(0, d.size, size=(m, d.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(d.mean()), float(lo), float(hi)


def compare_runs(a: Scores, b: Scores, *, n_resamples: int = 10000, seed: int = 0) -> dict[str, float]:
    """All three at once: mean difference, 95% bootstrap interval, t-test and randomization p-values."""
    mean, lo, hi = bootstrap_ci(a, b, n_resamples=n_resamples, seed=seed)
    n = paired_differences(a, b).size
    t, p_t = paired_t_test(a, b) if n >= 2 else (math.nan, math.nan)
    p_rand = paired_randomization_test(a, b, n_resamples=n_resamples, seed=seed)
    return {
        "queries": n,
        "mean_diff": mean,
        "ci_low": lo,
        "ci_high": hi,
        "t": t,
        "p_t": p_t,
        "p_randomization": p_rand,
    }
