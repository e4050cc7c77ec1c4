"""Macro-F1 (the official SemEval-2022 Task 2 metric), accuracy, confusion matrix, bootstrap intervals.

`macro_f1(gold, pred)` equals scikit-learn's `f1_score(gold, pred, average="macro")` (zero_division=0): the
unweighted mean over the sorted union of the labels in `gold` and `pred` of per-class F1 = 2TP/(2TP+FP+FN).

Unparseable predictions are `None`. They are never mapped to a class: `None` is not a label, so an
unparseable answer is a false negative for its gold class and a false positive for no class. This equals
sklearn with `None` replaced by a sentinel and `labels=` the classes without it. `summarise` reports both
that score (over all examples) and the score over the parsed examples only, with the unparseable count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from idiomreason.examples import LABELS


def _check(gold: Sequence, pred: Sequence) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"gold and pred must have the same length, got {len(gold)} and {len(pred)}")
    if any(g is None for g in gold):
        raise ValueError("gold must not contain None (unlabelled examples cannot be scored)")


def _labels(gold: Sequence, pred: Sequence, labels: Sequence | None) -> list:
    if labels is not None:
        return list(labels)
    return sorted({g for g in gold} | {p for p in pred if p is not None})


def f1_per_class(gold: Sequence, pred: Sequence, labels: Sequence | None = None) -> dict:
    """Per-class F1 (0 where a class has no true and no predicted instance)."""
    _check(gold, pred)
    out = {}
    for label in _labels(gold, pred, labels):
        tp = sum(1 for g, p in zip(gold, pred) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, pred) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, pred) if g == label and p != label)
        out[label] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out


def macro_f1(gold: Sequence, pred: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean of per-class F1 over `labels` (default: the sorted union of gold and predicted
    labels, as sklearn). `pred` may hold None (unparseable): it counts against the gold class only."""
    per_class = f1_per_class(gold, pred, labels)
    if not per_class:
        raise ValueError("macro_f1 needs at least one example")
    return float(sum(per_class.values()) / len(per_class))


def accuracy(gold: Sequence, pred: Sequence) -> float:
    """Fraction of exact matches (an unparseable prediction is wrong)."""
    _check(gold, pred)
    if not gold:
        raise ValueError("accuracy needs at least one example")
    return sum(1 for g, p in zip(gold, pred) if g == p) / len(gold)


def confusion_matrix(gold: Sequence, pred: Sequence, labels: Sequence = LABELS) -> np.ndarray:
    """Counts, shape (len(labels), len(labels) + 1): rows gold, columns predicted, last column unparseable."""
    _check(gold, pred)
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(labels), len(labels) + 1), dtype=np.int64)
    for g, p in zip(gold, pred):
        if g not in index:
            raise ValueError(f"gold label {g!r} is not in labels {list(labels)}")
        if p is not None and p not in index:
            raise ValueError(f"predicted label {p!r} is not in labels {list(labels)} or None")
        out[index[g], len(labels) if p is None else index[p]] += 1
    return out


def bootstrap_macro_f1(
    gold: Sequence, pred: Sequence, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of macro-F1 over the two classes (examples resampled with replacement).

    Vectorised: resampled confusion counts are (n_resamples, 2, 3) sums of one-hot rows.
    """
    _check(gold, pred)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not gold:
        raise ValueError("bootstrap needs at least one example")
    index = {label: i for i, label in enumerate(LABELS)}
    g = np.array([index[x] for x in gold])  # (N,)
    p = np.array([2 if x is None else index[x] for x in pred])  # (N,), 2 = unparseable
    rng = np.random.default_rng(seed)
    sample = rng.integers(0, len(g), size=(n_resamples, len(g)))  # (R, N)
    gs, ps = g[sample], p[sample]
    scores = np.zeros(n_resamples)
    present = np.zeros(n_resamples)
    for c in range(len(LABELS)):
        tp = ((gs == c) & (ps == c)).sum(1)
        fp = ((gs != c) & (ps == c)).sum(1)
        fn = ((gs == c) & (ps != c)).sum(1)
        denom = 2 * tp + fp + fn
        scores += np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
        present += (gs == c).any(1) | (ps == c).any(1)  # sklearn's label union, per resample
    scores = scores / np.maximum(present, 1)
    lo, hi = np.quantile(scores, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return float(lo), float(hi)


def summarise(
    gold: Sequence,
    pred: Sequence,
    reasoning_words: Sequence[int] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Every number of a results row for one group of examples.

    Returns a dict: n, n_unparseable, unparseable_rate, macro_f1 (all examples, unparseable = wrong),
    macro_f1_lo / macro_f1_hi (bootstrap 95%), macro_f1_parsed (parsed examples only, NaN if none),
    accuracy, f1_idiomatic, f1_literal, gold_idiomatic (count), reasoning_words_mean / _median.
    """
    _check(gold, pred)
    n = len(gold)
    if n == 0:
        raise ValueError("summarise needs at least one example")
    n_unparseable = sum(1 for p in pred if p is None)
    per_class = f1_per_class(gold, pred, LABELS)
    parsed = [(g, p) for g, p in zip(gold, pred) if p is not None]
    lo, hi = bootstrap_macro_f1(gold, pred, n_resamples=n_resamples, seed=seed)
    words = np.asarray(reasoning_words if reasoning_words is not None else [], dtype=float)
    return {
        "n": n,
        "n_unparseable": n_unparseable,
        "unparseable_rate": n_unparseable / n,
        "macro_f1": macro_f1(gold, pred),
        "macro_f1_lo": lo,
        "macro_f1_hi": hi,
        "macro_f1_parsed": macro_f1(*zip(*parsed)) if parsed else float("nan"),
        "accuracy": accuracy(gold, pred),
        "f1_idiomatic": per_class["idiomatic"],
        "f1_literal": per_class["literal"],
        "gold_idiomatic": Counter(gold)["idiomatic"],
        "reasoning_words_mean": float(words.mean()) if words.size else float("nan"),
        "reasoning_words_median": float(np.median(words)) if words.size else float("nan"),
    }
