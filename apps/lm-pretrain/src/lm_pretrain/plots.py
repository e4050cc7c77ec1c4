"""The figures lm-pretrain writes: a run's `curves.png` and a study's `length_generalisation.png`.

Positions and context lengths span several powers of two (a 128-byte training context evaluated at up to
16x), so their axes are log base 2 with plain integer labels on at most 8 major ticks and no minor labels:
matplotlib's default log axis labels minor ticks when the range is about a decade, and those labels print
on top of each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared_kernels.runconfig import save_figure_atomic

__all__ = ["plot_curves", "plot_study"]


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only; imported here so the app starts without it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log2_axis(ax: Any, label: str) -> None:
    """A log-2 x axis labelled with plain integers (16, 32, ..., 2048) and no minor tick labels."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2, numticks=8))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)


def plot_curves(
    history: Sequence[dict[str, Any]], loss_by_position: dict[str, Any], train_len: int, path: Path
) -> None:
    """A run's training loss by optimizer step (left) and validation loss by position (right) as a PNG.

    Args:
        history: the training loop's logged rows (`step`, `train/loss`).
        loss_by_position: results.json's {"length": L, "bucket_end": [...], "loss": [...]} (nats/byte).
        train_len: the training context in bytes (a dashed line on the right panel).
        path: the PNG to write.
    """
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot([r["step"] for r in history], [r["train/loss"] for r in history])
    ax1.set(xlabel="optimizer step", ylabel="train loss (nats/byte)", title="training")
    ax2.plot(loss_by_position["bucket_end"], loss_by_position["loss"], marker="o", label="validation")
    ax2.axvline(train_len, color="grey", ls="--", label=f"training context ({train_len} bytes)")
    _log2_axis(ax2, "position in the sequence (bytes, bucket end)")
    ax2.set(ylabel="val loss (nats/byte)", title=f"loss by position, context {loss_by_position['length']}")
    ax2.legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def plot_study(summary: dict[str, Any], path: Path, train_len: int) -> None:
    """Each variant's validation loss by evaluation context (mean over seeds, bars: half the max-min
    spread) as a PNG; `summary` is `lm_pretrain.study.summarise`'s, `train_len` the training context."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    for name, e in summary.items():
        xs = [int(k) for k in e["mean"]]
        ax.errorbar(
            xs,
            list(e["mean"].values()),
            yerr=[s / 2 for s in e["spread"].values()],
            marker="o",
            capsize=3,
            label=name,
        )
    ax.axvline(train_len, color="grey", ls="--", label=f"training context ({train_len} bytes)")
    _log2_axis(ax, "evaluation context (bytes)")
    ax.set(ylabel="validation loss (nats/byte)", title="mean over seeds (bars: half the max-min spread)")
    # beside the axes: a study has up to ~8 variants, whose lines a legend inside would cover
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
