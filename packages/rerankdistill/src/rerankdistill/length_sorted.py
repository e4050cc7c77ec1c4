"""Judging pairs in batches of similar length.

A batch of prompts is padded to its longest one, so mixing a 100-token prompt with a 2,500-token one makes
the short one cost as much as the long one. `LengthSortedJudge` wraps any pointwise judge (an object with
`.name` and `.judge(pairs) -> judgements`, e.g. `rerankdistill.rerank.TeacherForcedJudge`): it sorts the
pairs by character length, judges them `batch_size` at a time, and returns the judgements in input order.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


class LengthSortedJudge:
    """A pointwise judge that batches pairs of similar length (same `.name` and `.judge` as the wrapped one).

    Args:
        judge: the wrapped judge.
        batch_size: pairs per call of the wrapped judge (>= 1).
        progress: show a progress bar.
    """

    def __init__(self, judge: Any, batch_size: int, progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.inner, self.batch_size, self.progress = judge, batch_size, progress
        self.name = judge.name

    def judge(self, pairs: list[tuple[str, str]]) -> list[Any]:
        """The wrapped judge's judgements of `pairs` ((query, document) each), in the order given."""
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        out: list[Any] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc=f"rerank {self.name}", unit="pair", disable=not self.progress)
        with bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                judged = self.inner.judge([pairs[i] for i in chunk])
                for i, j in zip(chunk, judged, strict=True):
                    out[i] = j
                bar.update(len(chunk))
        return out
