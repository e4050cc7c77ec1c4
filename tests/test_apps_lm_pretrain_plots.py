"""lm-pretrain's figures on small data: each plot function writes a non-trivial PNG, and the log-2 position
axis labels only its major ticks (plain integers) without overlapping labels, over ranges where
matplotlib's default log axis printed minor tick labels on top of each other."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import lm_pretrain.plots as plots
from lm_pretrain.plots import plot_curves, plot_study


def _assert_png_with_content(path: Path) -> None:
    import matplotlib.image

    assert path.is_file() and path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.05  # not a blank canvas


def test_plot_curves_writes_png(tmp_path):
    history = [{"step": s, "train/loss": 5.0 * math.exp(-s / 30) + 1.7} for s in range(1, 98, 4)]
    ends = [1600 * (i + 1) // 13 for i in range(13)]  # 13 buckets of a 1600-byte context (odd sizes)
    lp = {"length": 1600, "bucket_end": ends, "loss": [1.9 + 0.3 * e / 1600 for e in ends]}
    plot_curves(history, lp, 100, tmp_path / "curves.png")
    _assert_png_with_content(tmp_path / "curves.png")


def test_plot_study_writes_png(tmp_path):
    lengths = ["96", "384", "1536"]
    summary = {
        name: {
            "mean": {n: 1.9 + shift + 0.1 * i for i, n in enumerate(lengths)},
            "spread": {n: 0.01 * (i + 1) for i, n in enumerate(lengths)},
        }
        for name, shift in [("rope", 0.0), ("nope + si", -0.07), ("alibi", 0.04)]
    }
    plot_study(summary, tmp_path / "study.png", 96)
    _assert_png_with_content(tmp_path / "study.png")


@pytest.mark.parametrize("lo, hi", [(128, 2048), (100, 1600), (16, 65536), (96, 300)])
def test_log2_axis_labels_do_not_overlap(lo, hi):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.8))
    try:
        ax.plot([lo, hi], [1.0, 2.0])
        plots._log2_axis(ax, "position (bytes)")
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
        assert not [t for t in ax.get_xticklabels(which="minor") if t.get_text()]
        shown = [t for t in labels if lo <= t.get_position()[0] <= hi]
        assert len(shown) >= 2 and all(t.get_text().isdigit() for t in shown)
        boxes = sorted((t.get_window_extent(renderer) for t in shown), key=lambda b: b.x0)
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))
    finally:
        plt.close(fig)
