"""Results rows from stored predictions, tables (CSV + markdown) and the macro-F1 vs model size plot."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idiomreason.evaluate import relabel
from idiomreason.examples import LABELS, Example
from idiomreason.metrics import confusion_matrix, summarise
from idiomreason.prompts import Condition
from shared_kernels.runconfig import save_figure_atomic, write_text_atomic

logger = logging.getLogger("idiomreason")

ROW_FIELDS = (
    "dataset", "model", "size_b", "reasoning", "condition", "condition_key", "setting", "language",
    "n_examples", "n_unlabelled", "n_not_predicted", "n", "n_unparseable", "unparseable_rate",
    "macro_f1", "macro_f1_lo", "macro_f1_hi", "macro_f1_parsed", "accuracy", "f1_idiomatic", "f1_literal",
    "gold_idiomatic",
    "reasoning_words_mean", "reasoning_words_median", "output_tokens_mean", "truncated", "n_relabelled",
    "decoding", "scoring",
    # confusion matrix: cm_<gold>_<predicted>, "none" = unparseable
    "cm_idiomatic_idiomatic", "cm_idiomatic_literal", "cm_idiomatic_none",
    "cm_literal_idiomatic", "cm_literal_literal", "cm_literal_none",
)  # fmt: skip


@dataclass
class Job:
    """One (model, dataset, condition) cell of a sweep and the examples it covers."""

    model: Any  # ModelSpec (kept untyped here to avoid an import cycle with sweep.py)
    dataset: str
    condition: Condition
    examples: Sequence[Example]
    generation: str = ""  # the generation-settings hash its records must carry (evaluate.PREDICTION_KEY)


def job_rows(job: Job, records: dict, n_resamples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """One row for all the job's examples (language "all") and one per language when there are several.

    `n` counts the labelled examples with a prediction; `n_not_predicted` those still missing (an
    unfinished run, or examples skipped for lack of a definition); `n_unlabelled` examples without gold.
    """
    languages = sorted({ex.language for ex in job.examples})
    groups = [("all", list(job.examples))]
    if len(languages) > 1:
        groups += [(lang, [ex for ex in job.examples if ex.language == lang]) for lang in languages]
    rows = []
    for language, examples in groups:
        found = [
            records.get((job.model.name, job.condition.key, job.dataset, ex.id, job.generation))
            for ex in examples
        ]
        scored = [r for r, ex in zip(found, examples) if r is not None and ex.label is not None]
        labels = [relabel(r) for r in scored]  # the current parser on the stored raw outputs
        row: dict[str, Any] = {
            "dataset": job.dataset, "model": job.model.name, "size_b": job.model.size_b,
            "reasoning": job.model.reasoning, "condition": job.condition.label,
            "condition_key": job.condition.key, "setting": job.condition.setting, "language": language,
            "n_examples": len(examples),
            "n_unlabelled": sum(1 for ex in examples if ex.label is None),
            "n_not_predicted": sum(1 for r, ex in zip(found, examples) if r is None and ex.label is not None),
            "n_relabelled": sum(1 for r, label in zip(scored, labels) if label != r["prediction"]),
            "decoding": getattr(job.model, "decoding_config", None) and job.model.decoding_config.source,
            "scoring": getattr(job.model, "scoring", "generate"),
        }  # fmt: skip
        if scored:
            row.update(summarise(
                [r["gold"] for r in scored], labels,
                reasoning_words=[r["reasoning_words"] for r in scored], n_resamples=n_resamples, seed=seed,
            ))  # fmt: skip
            tokens = [r["n_tokens"] for r in scored if r.get("n_tokens") is not None]
            row["output_tokens_mean"] = sum(tokens) / len(tokens) if tokens else math.nan
            row["truncated"] = sum(1 for r in scored if r.get("finish_reason") == "length")
            counts = confusion_matrix([r["gold"] for r in scored], labels)  # (2, 3)
            for i, gold in enumerate(LABELS):
                for j, predicted in enumerate((*LABELS, "none")):
                    row[f"cm_{gold}_{predicted}"] = int(counts[i, j])
        else:
            row["n"] = 0
        rows.append({k: row.get(k, math.nan) for k in ROW_FIELDS})
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def _size(value: Any) -> str:
    """Billions of parameters with 3 significant digits (tiny test models are 0.0001B, not 0.0)."""
    return f"{value:.3g}" if isinstance(value, int | float) and not math.isnan(value) else ""


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one table for the overall rows and, when there are several languages, one per language."""
    header = (
        "| dataset | model | size (B) | condition | language | n | unparseable | macro-F1 [95% CI] | "
        "macro-F1 parsed | accuracy | reasoning words | truncated |"
    )
    rule = "|---|---|---:|---|---|---:|---:|---|---:|---:|---:|---:|"

    def line(r: dict[str, Any]) -> str:
        ci = (
            f"{_fmt(r['macro_f1'])} [{_fmt(r['macro_f1_lo'])}, {_fmt(r['macro_f1_hi'])}]" if r["n"] else "n/a"
        )
        return (
            f"| {r['dataset']} | {r['model']} | {_size(r['size_b'])} | {r['condition']} | {r['language']} | "
            f"{r['n']} | {_fmt(r['n_unparseable'])} | {ci} | {_fmt(r['macro_f1_parsed'])} | "
            f"{_fmt(r['accuracy'])} | {_fmt(r['reasoning_words_mean'], 1)} | {_fmt(r['truncated'])} |"
        )

    overall = [r for r in rows if r["language"] == "all"]
    by_language = [r for r in rows if r["language"] != "all"]
    parts = ["## Overall", "", header, rule, *map(line, overall)]
    if by_language:
        parts += ["", "## By language", "", header, rule, *map(line, by_language)]
    parts += _decoding_lines(overall)
    relabelled = sum(int(r["n_relabelled"]) for r in overall if r["n"])
    parts += [
        "",
        f"Labels re-parsed from the stored raw outputs with the current parser: {relabelled} differ from "
        "the labels parsed at generation time.",
    ]
    parts += [
        "",
        "macro-F1 counts an unparseable answer as wrong (a miss for its gold class); "
        "'macro-F1 parsed' scores the parsed answers only. CI: 95% percentile bootstrap.",
        "",
    ]
    return "\n".join(parts)


def _decoding_lines(overall: Sequence[dict[str, Any]]) -> list[str]:
    """How each model decoded (model card, config or greedy; or log-likelihood scoring), once per model."""
    how: dict[str, str] = {}
    for r in overall:
        if r.get("scoring") == "loglik":
            how.setdefault(r["model"], "log-likelihood scoring of the answers (no generation)")
        elif isinstance(r.get("decoding"), str):
            how.setdefault(r["model"], r["decoding"])
    if not how:
        return []
    return ["", "Decoding:", "", *(f"- {model}: {text}" for model, text in how.items())]


def write_tables(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """results.csv (every field) and results.md, written atomically."""
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    write_text_atomic(csv_path, buffer.getvalue())
    write_text_atomic(md_path, markdown_table(rows))
    return csv_path, md_path


def size_ticks(ax: Any, sizes: Sequence[float]) -> None:
    """Log-scale x axis ticked at the models' sizes (plain numbers, no minor labels); a label too close to
    its left neighbour to be read apart (7B and 8B) goes on a second row."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ticks = sorted(set(sizes))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels(staggered_size_labels(ticks))


def staggered_size_labels(ticks: Sequence[float], min_gap: float = 0.08) -> list[str]:
    """Tick labels of sorted log-scale `ticks`: a label closer than `min_gap` (a fraction of the ticks' span
    in decades) to the previous top-row label, when that one is the previous label, starts with a newline
    (drawn one row lower) so the two do not overlap."""
    logs = [math.log10(t) for t in ticks]
    span = logs[-1] - logs[0] if logs else 0.0
    labels: list[str] = []
    last_top = -math.inf
    for t, x in zip(ticks, logs):
        previous_on_top = bool(labels) and not labels[-1].startswith("\n")
        if span > 0 and previous_on_top and (x - last_top) / span < min_gap:
            labels.append(f"\n{t:.3g}")
        else:
            labels.append(f"{t:.3g}")
            last_top = x
    return labels


def dodge_factor(k: int, m: int, step: float) -> float:
    """The factor that moves the k-th of m overlapping points (0 <= k < m) `step` decades from its
    neighbours on a log-scale axis, the group centred on the true value."""
    return 10 ** (step * (k - (m - 1) / 2))


def plot_f1_vs_size(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Macro-F1 against model size (log scale), one panel per dataset (shared y axis), one line per
    condition and model kind (reasoning: solid circles; others: dashed squares), one legend to the right of
    the panels. Series are drawn slightly apart along x so that equal values do not hide one another.
    Needs matplotlib (the plot extra); returns None (with a warning) without it or when no model has a
    known size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("no plot: matplotlib is not installed (pip install 'idiomreason[plot]')")
        return None
    points = _plottable_rows(rows)
    if not points:
        return None
    datasets = sorted({r["dataset"] for r in points})
    conditions = sorted({r["condition"] for r in points})
    colours = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(conditions)}
    series_keys = [(c, reasoning) for c in conditions for reasoning in (True, False)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), sharey=True, squeeze=False)
    handles: dict[str, Any] = {}  # legend label -> line, across panels
    for ax, dataset in zip(axes[0], datasets):
        mine = [r for r in points if r["dataset"] == dataset]
        for k, (condition, reasoning) in enumerate(series_keys):
            shift = dodge_factor(k, len(series_keys), step=0.01)
            series = sorted(
                (float(r["size_b"]) * shift, r["macro_f1"])
                for r in mine
                if r["condition"] == condition and bool(r["reasoning"]) == reasoning
            )
            if series:
                label = f"{condition} ({'reasoning' if reasoning else 'base'} models)"
                style = "-o" if reasoning else "--s"
                (line,) = ax.plot(*zip(*series), style, color=colours[condition], label=label)
                handles.setdefault(label, line)
        size_ticks(ax, [float(r["size_b"]) for r in mine])
        ax.set_xlabel("parameters (billions, log scale)")
        ax.set_title(dataset)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("macro-F1 (0-1)")
    axes[0][-1].legend(
        list(handles.values()), list(handles), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1)
    )
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=120, bbox_inches="tight")


def _plottable_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The overall rows with predictions and a known model size; the models left out are logged."""
    points = [
        r
        for r in rows
        if r["language"] == "all"
        and r["n"]
        and r["size_b"] not in (None, "")
        and not (isinstance(r["size_b"], float) and math.isnan(r["size_b"]))
    ]
    unsized = sorted({r["model"] for r in rows if r["language"] == "all"} - {r["model"] for r in points})
    if unsized:
        logger.warning("left out of the plot (no size, or no predictions): %s", ", ".join(unsized))
    return points
