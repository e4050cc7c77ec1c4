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
  * `context_lines` / `fusion_notes` / `artefacts_footer` / `report_markdown`: the report's text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rerankdistill.cli import significance_table
from rerankdistill.fusion import DEFAULT_SMOOTHING, fuse, select_fusion_weight
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
    smoothing: float = DEFAULT_SMOOTHING,
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
        smoothing: half-width of the moving average over the validation curve (`select_fusion_weight`).

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
        chosen, by_weight = select_fusion_weight(
            first_stage_val, reranked_scores, val_qrels, k, smoothing=smoothing
        )
        how = f" (nDCG@10 averaged over the weights within +-{smoothing:g})" if smoothing else ""
        out.update(
            weight=chosen,
            chosen=f"chosen on {len(first_stage_val)} validation queries{how}",
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

    Each logged loss is one step's small batch, so the raw points are drawn faint and a running mean over
    about 1/20 of a phase's points (at least 3) is drawn over them, where a trend is read.
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
            losses = [float(r[f"{phase}/loss"]) for r in rows]
            (raw,) = ax.plot(steps, losses, marker=".", alpha=0.3, lw=0.8, label=f"{phase} (each log)")
            width = max(3, len(losses) // 20)
            if len(losses) >= 2 * width:
                mean = [sum(losses[i - width : i]) / width for i in range(width, len(losses) + 1)]
                ax.plot(
                    steps[width - 1 :], mean, color=raw.get_color(), lw=2, label=f"{phase} (running mean)"
                )
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


def context_lines(
    results: Mapping[str, Any],
    model: str,
    max_length: int,
    candidates: int,
    k: int,
    offline_explanation: str | None = None,
) -> list[str]:
    """The report's context lines: task, model, teacher, first stage and evaluation.

    Args:
        results: the run's results (results.json): its notes `task`, `attention`, `adapters`, `parameters`,
            `teacher`, `first_stage`, `eval_lengths`, and `unparseable`, `judged`.
        model: the base model's name or path.
        max_length: the training context in tokens.
        candidates: the first stage's depth; k: the top-k reranked.
        offline_explanation: the explanation kind of an offline teacher built from the gold judgements, None
            for a real teacher.
    """
    task, teacher, fs, lengths = (
        results["task"],
        results["teacher"],
        results["first_stage"],
        results["eval_lengths"],
    )
    offline = ""
    if offline_explanation is not None:
        offline = (
            f" (OFFLINE stand-in built from the gold judgements: {offline_explanation} "
            "explanations, no model reasoning)"
        )
    return [
        f"Task: {task['name']} ({task['documents']} documents; {task['train_queries']} "
        f"training queries, {task['validation_queries']} validation queries, "
        f"{task['eval_queries']} held-out evaluation queries).",
        f"Model: {model}; attention: {results['attention']}; {results['adapters']}; {results['parameters']}.",
        f"Teacher: {teacher['name']}{offline}; {teacher['used']} distillation examples, "
        f"{teacher['too_long']} longer than the training context ({max_length} tokens): "
        f"{teacher['too_long_fate']}.",
        f"First stage: {fs['reranked']} BM25 (identifier-aware: k1 {fs['k1']:g}, b {fs['b']:g}, "
        f"{fs['chosen']}; stopwords {fs['stopwords']}, stemmer {fs['stemmer']}).",
        f"Evaluation: BM25 top-{candidates}, top-{k} reranked pointwise; "
        f"{lengths['longer_than_training_context']} of {lengths['pairs']} prompts are longer than the "
        f"training context (longest {lengths['max_prompt_tokens']} tokens). "
        f"Unparseable judgements: {results['unparseable']} of {results['judged']}.",
    ]


def artefacts_footer(results: Mapping[str, Any]) -> list[str]:
    """The report's last line: the adapter, the judgements and TREC runs of the run directory (with how to
    re-score them) and the wall time, from the run's results (`adapter_dir`, `fusion`, `elapsed_s`)."""
    fused = ", `fused.run`" if results["fusion"]["weight"] is not None else ""
    return [
        f"Adapter (peft format): `{results['adapter_dir']}`. Judgements `eval.qrels`; runs `bm25.run` "
        f"(plain), `bm25-code.run` (identifier-aware), `reranked.run`{fused} (TREC format: "
        "`trec_eval -m ndcg_cut.10 eval.qrels reranked.run` re-scores them). "
        f"Wall time {results['elapsed_s']:.0f} s.",
    ]
