"""What a reranking run reports: the fusion weight chosen on validation, paired tests against baselines, the
training curve and the markdown report.

These are the pieces every recipe that reranks a first stage needs after judging (rerank-qlora composes
them); each takes plain runs ({qid: {docid: score}}) and qrels, so a run can be re-reported from its TREC
files.

  * `choose_fusion`: the fusion weight given, or chosen on the validation queries only
    (`rerankdistill.fusion.select_fusion_weight`), with the validation scores that chose it.
  * `significance_against`: every non-baseline run against each baseline, per measure: paired randomization
    test, t-test and bootstrap CI of the mean per-query difference (`shared_kernels.significance`).
  * `plot_training_curve`: the loss of consecutive training phases on one step axis (PNG).
  * `fusion_notes` / `report_markdown`: the report's text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rerankdistill.cli import significance_table
from rerankdistill.fusion import fuse, select_fusion_weight
from rerankdistill.metrics import evaluate, ndcg_at_k
from rerankdistill.trec import Qrels, Run
from shared_kernels.runconfig import save_figure_atomic
from shared_kernels.significance import compare_runs

FUSED_NAME = "BM25 + rerank-qlora, fused"


def choose_fusion(
    first_stage_val: Run,
    val_qrels: Qrels,
    reranked_run: Run,
    reranked_scores: Mapping[str, Mapping[str, float]],
    k: int,
    weight: float | None = None,
    name: str = FUSED_NAME,
) -> dict[str, Any]:
    """The fusion weight: `weight` when given, else chosen on the validation queries (never evaluation ones).

    Args:
        first_stage_val: the first stage's run on the validation queries ({} when there are none).
        val_qrels: their judgements.
        reranked_run: the reranker's run (at least on the validation queries).
        reranked_scores: the reranker's scores in [0, 2] for each query's top-k.
        k: the top-k that was reranked.
        weight: a given weight in [0, 1], or None to choose one.
        name: the fused run's name in the report ("" when there is no weight).

    Returns:
        {"weight": w or None, "chosen": how, "validation": {queries, bm25, reranked[, by_weight]}, "name"}.
    """
    out: dict[str, Any] = {"weight": weight, "chosen": "given", "validation": {}}
    if first_stage_val:
        val_reranked = {q: reranked_run[q] for q in first_stage_val}
        out["validation"] = {
            "queries": len(first_stage_val),
            "bm25": float(ndcg_at_k(first_stage_val, val_qrels, 10)),
            "reranked": float(ndcg_at_k(val_reranked, val_qrels, 10)),
        }
    if weight is None and first_stage_val:
        chosen, by_weight = select_fusion_weight(first_stage_val, reranked_scores, val_qrels, k)
        out.update(
            weight=chosen,
            chosen=f"chosen on {len(first_stage_val)} validation queries",
            validation={**out["validation"], "by_weight": by_weight},
        )
    elif weight is None:
        out["chosen"] = "none: no validation queries and no fusion weight given"
    out["name"] = name if out["weight"] is not None else ""
    return out


def fused_run(
    first_stage: Run, reranked_scores: Mapping[str, Mapping[str, float]], fusion: dict, k: int
) -> Run:
    """`fuse` with the weight of a `choose_fusion` result (which must have one)."""
    if fusion["weight"] is None:
        raise ValueError(f"no fusion weight to fuse with: {fusion['chosen']}")
    return fuse(first_stage, reranked_scores, fusion["weight"], k)


def significance_against(
    runs: Mapping[str, Run],
    qrels: Qrels,
    baselines: Sequence[str],
    seed: int = 0,
    measures: Sequence[str] = ("ndcg_cut_10", "recip_rank_10"),
) -> dict[str, Any]:
    """Each run that is not a baseline against each baseline, per measure, paired over `qrels`' queries
    (a query a run misses scores 0 there, as trec_eval -c scores it).

    Returns:
        {"rows": [{run, baseline, measure, queries, mean_diff, ci_low, ci_high, p_t, p_randomization}],
         "table": markdown, one table per baseline}.
    """
    missing = [b for b in baselines if b not in runs]
    if missing:
        raise ValueError(f"baselines {missing} are not among the runs: {', '.join(runs)}")
    per = {name: evaluate(run, qrels, tuple(measures), complete=True) for name, run in runs.items()}
    rows: list[dict[str, Any]] = []
    tables = []
    for baseline in baselines:
        these = [
            {
                "run": name,
                "baseline": baseline,
                "measure": m,
                **compare_runs(per[name][m].per_query, per[baseline][m].per_query, seed=seed),
            }
            for name in runs
            if name not in baselines
            for m in measures
        ]
        rows += these
        tables.append(significance_table(these, baseline))
    return {"rows": rows, "table": "\n".join(tables)}


def plot_training_curve(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    phases: Sequence[str] = ("distill", "refine"),
    ylabel: str = "loss (nats per target token, weighted)",
) -> Path:
    """The training loss of consecutive phases on one optimizer-step axis, written to `path` (PNG).

    Args:
        history: rows {"phase": name, "step": int, f"{phase}/loss": float} (shared_kernels.training).
        path: the PNG written.
        phases: the phases in order; each continues the step axis where the previous one ended.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    offset = 0
    for phase in phases:
        rows = [r for r in history if r["phase"] == phase]
        if rows:
            steps = [offset + r["step"] for r in rows]
            ax.plot(steps, [r[f"{phase}/loss"] for r in rows], marker=".", label=phase)
            offset = steps[-1]
    ax.set(xlabel="optimizer step", ylabel=ylabel, title="training curve")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="best")
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=110)


def fusion_notes(fusion: Mapping[str, Any], k: int) -> list[str]:
    """The report's paragraphs on the fused run and on the validation scores that chose its weight."""
    if fusion["weight"] is not None:
        lines = [
            f"Fused: w * E[label]/2 + (1 - w) * min-max BM25 over each query's top-{k} "
            f"(rerankdistill.fusion), w = {fusion['weight']:g} ({fusion['chosen']}). w = 0 is BM25's order, "
            "w = 1 the student's.",
            "",
        ]
    else:
        lines = [f"No fused run: {fusion['chosen']}.", ""]
    v = fusion["validation"]
    if v:
        by_weight = ""
        if "by_weight" in v:
            by_weight = "; fused by w: " + ", ".join(f"{w:g}: {s:.4f}" for w, s in v["by_weight"].items())
        lines += [
            f"Validation ({v['queries']} queries, modules disjoint from training and evaluation): nDCG@10 "
            f"BM25 {v['bm25']:.4f}, reranked {v['reranked']:.4f}{by_weight}.",
            "",
        ]
    return lines


def report_markdown(
    title: str,
    context: Sequence[str],
    table: str,
    fusion: Mapping[str, Any],
    k: int,
    figure: str | None = None,
    footer: Sequence[str] = (),
) -> str:
    """The run's markdown report: title, context lines (task, model, teacher, ...), the score table, the
    fusion notes, the figure and the footer lines (artefacts, time)."""
    lines = [f"# {title}", "", *context, "", table, "", *fusion_notes(fusion, k)]
    if figure:
        lines += [f"![training curve]({figure})", ""]
    return "\n".join([*lines, *footer, ""])
