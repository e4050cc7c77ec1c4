"""Several seeds of one rerank-qlora run, side by side: what `rerank-qlora-seeds` writes as `seeds.json` and
`seeds.md`.

Per seed it takes the app's own numbers from that seed's `results.json` (scores of every run, and the paired
tests of the reranked and fused runs against identifier-aware BM25 that the run itself made); across seeds it
adds mean +- sample std and ONE more test: the seed-averaged test. Each evaluation query's nDCG@10 is averaged
over the seeds (per run, from the seeds' TREC files, scored as the app scores them: `rerankdistill.evaluate`,
missing queries 0), and the averaged run is compared with identifier-aware BM25 by the paired randomization
test over queries (`shared_kernels.significance.compare_runs`). Queries stay the unit: pooling (query, seed)
pairs as if independent would count each query's BM25 score once per seed and overstate the evidence. When
the seeds were evaluated on different queries (never through `rerank-qlora-seeds`, which changes train.seed
only), the test pools (seed, query) pairs instead and says so.

The verdict is issue 14's goal: the SAME run (fused or reranked) beats identifier-aware BM25 on nDCG@10 (mean
difference > 0, the run's own randomization p < 0.05) in every seed, with at least 3 seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rerank_qlora.recipe import CODE, FUSED_FILE, RUN_FILES
from shared_kernels.errors import UserError
from shared_kernels.significance import compare_runs

GOAL_P = 0.05
GOAL_SEEDS = 3
MEASURE = "ndcg_cut_10"
NAMES = {"ndcg_cut_10": "nDCG@10", "recip_rank_10": "MRR@10", "map": "MAP", "judged_10": "judged@10"}


def measure_name(measure: str) -> str:
    """trec_eval's measure name as the report writes it (`recall_20` -> R@20)."""
    return NAMES.get(measure) or (f"R@{measure[7:]}" if measure.startswith("recall_") else measure)


def gains_against(results: Mapping[str, Any], baseline: str = CODE, measure: str = MEASURE) -> dict[str, Any]:
    """{run: the app's own test row against `baseline` on `measure`} of one seed's results.json."""
    return {
        r["run"]: r for r in results["significance"] if r["baseline"] == baseline and r["measure"] == measure
    }


def mean_std(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
    }


def verdict(
    gains: Mapping[int, Mapping[str, Mapping[str, Any]]], min_seeds: int = GOAL_SEEDS
) -> dict[str, Any]:
    """Whether one run beats identifier-aware BM25 in every seed (mean difference > 0 and randomization
    p < GOAL_P), with at least `min_seeds` seeds.

    Args:
        gains: seed -> `gains_against` of that seed's results.

    Returns:
        {"met": bool, "passing": {run: [seeds where it beats]}, "line": the verdict in words}.
    """
    seeds = sorted(gains)
    runs = sorted({run for g in gains.values() for run in g})
    passing = {
        run: [
            s
            for s in seeds
            if run in gains[s]
            and gains[s][run]["mean_diff"] > 0
            and gains[s][run]["p_randomization"] < GOAL_P
        ]
        for run in runs
    }
    winners = [run for run in runs if len(passing[run]) == len(seeds)]
    met = bool(winners) and len(seeds) >= min_seeds
    beats = f"beats identifier-aware BM25 on nDCG@10 with randomization p < {GOAL_P:g}"
    if met:
        line = f"GOAL MET: {winners[0]} {beats} in every one of {len(seeds)} seeds."
    elif winners:
        line = (
            f"GOAL NOT ESTABLISHED: {winners[0]} {beats} in all {len(seeds)} seed(s), but the goal asks for "
            f"at least {min_seeds} seeds."
        )
    else:
        shown = "; ".join(f"{run} in {len(passing[run])} of {len(seeds)}" for run in runs) or "no run tested"
        line = f"GOAL NOT MET: no run {beats} in every seed ({shown})."
    return {"met": met, "passing": passing, "line": line}


def _per_query(run_dir: Path, filename: str, measure: str) -> dict[str, float]:
    """One run file's per-query `measure` over the run's evaluation judgements (missing queries 0)."""
    from rerankdistill import evaluate, read_qrels, read_run

    qrels = read_qrels(run_dir / "eval.qrels")
    return dict(evaluate(read_run(run_dir / filename), qrels, (measure,), complete=True)[measure].per_query)


def _check_against_results(seed: int, run: str, diffs: Sequence[float], row: Mapping[str, Any]) -> None:
    """The TREC files must give the seed's own mean difference (else they are not that run's files)."""
    mean = math.fsum(diffs) / len(diffs)
    if len(diffs) != row["queries"] or not math.isclose(mean, row["mean_diff"], abs_tol=1e-6):
        raise UserError(
            f"seed {seed}: the TREC files give {run} - {CODE} = {mean:+.6f} over {len(diffs)} queries, its "
            f"results.json {row['mean_diff']:+.6f} over {row['queries']}: the folder holds another run's "
            "files"
        )


def seed_averaged_tests(
    run_dirs: Mapping[int, Path], gains: Mapping[int, Mapping[str, Mapping[str, Any]]], measure: str = MEASURE
) -> dict[str, Any]:
    """Each run's `measure` averaged over seeds per query, against identifier-aware BM25's (see the module
    docstring); runs missing from a seed (no fused run) are left out.

    Returns:
        {"test": what was tested, "rows": {run: compare_runs' dict}}.
    """
    files = {name: f for name, (f, _) in RUN_FILES.items()}
    runs = [r for r in sorted({r for g in gains.values() for r in g}) if all(r in g for g in gains.values())]
    scores: dict[str, dict[int, dict[str, float]]] = {r: {} for r in [CODE, *runs]}
    for seed, run_dir in run_dirs.items():
        for run in scores:
            scores[run][seed] = _per_query(run_dir, files.get(run, FUSED_FILE[0]), measure)
        for run in runs:
            diffs = [scores[run][seed][q] - scores[CODE][seed][q] for q in scores[CODE][seed]]
            _check_against_results(seed, run, diffs, gains[seed][run])
    same_queries = len({frozenset(per) for per in scores[CODE].values()}) == 1
    combined = {run: _combine(by_seed, same_queries) for run, by_seed in scores.items()}
    n = len(combined[CODE])
    test = (
        f"paired randomization test over {n} queries of each query's {measure_name(measure)} averaged over "
        f"{len(run_dirs)} seeds"
        if same_queries
        else f"paired randomization test over {n} (seed, query) pairs pooled (the seeds' queries differ)"
    )
    rows = {run: compare_runs(combined[run], combined[CODE]) for run in runs}
    return {"test": test, "rows": rows}


def _combine(by_seed: Mapping[int, Mapping[str, float]], same_queries: bool) -> dict[str, float]:
    """Per query the mean over seeds, or (seed/query) pairs when the seeds' queries differ."""
    if same_queries:
        first = next(iter(by_seed.values()))
        return {q: statistics.fmean(per[q] for per in by_seed.values()) for q in first}
    return {f"{seed}/{q}": v for seed, per in by_seed.items() for q, v in per.items()}


def summarize(results: Mapping[int, Mapping[str, Any]], run_dirs: Mapping[int, Path], command: str) -> dict:
    """seeds.json's content: per seed scores, fusion weight and tests; mean +- std; the seed-averaged test;
    the verdict.

    Args:
        results: seed -> that seed's results.json.
        run_dirs: seed -> its run directory (for the TREC files).
        command: the command that reproduces the runs.
    """
    seeds = sorted(results)
    gains = {s: gains_against(results[s]) for s in seeds}
    runs = list(results[seeds[0]]["scores"])
    measures = list(results[seeds[0]]["scores"][runs[0]])
    spread = {
        run: {
            m: mean_std([results[s]["scores"][run][m] for s in seeds])
            for m in measures
            if all(run in results[s]["scores"] for s in seeds)
        }
        for run in runs
    }
    gain_spread = {
        run: mean_std([gains[s][run]["mean_diff"] for s in seeds])
        for run in sorted({r for g in gains.values() for r in g})
        if all(run in g for g in gains.values())
    }
    return {
        "command": command,
        "seeds": seeds,
        "baseline": CODE,
        "measure": MEASURE,
        "per_seed": {
            str(s): {
                "run_dir": str(run_dirs[s]),
                "scores": results[s]["scores"],
                "fusion_weight": results[s]["fusion"]["weight"],
                "gains": gains[s],
            }
            for s in seeds
        },
        "mean_std": spread,
        "gain_mean_std": gain_spread,
        "seed_averaged": seed_averaged_tests(run_dirs, gains),
        "verdict": verdict(gains),
    }


def _ms(v: Mapping[str, float | None], signed: bool = False) -> str:
    fmt = "{:+.4f}" if signed else "{:.4f}"
    return fmt.format(v["mean"]) + (f" ± {v['std']:.4f}" if v["std"] is not None else "")


def gain_cell(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "-"
    return (
        f"{row['mean_diff']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] "
        f"p={row['p_randomization']:.4f}"
    )


def markdown(summary: Mapping[str, Any]) -> str:
    """seeds.md: the verdict, the per-seed scores with mean ± std, the gains with their tests."""
    seeds = summary["seeds"]
    per = summary["per_seed"]
    head = " | ".join(f"seed {s}" for s in seeds)
    rule = "|---" * (len(seeds) + 3) + "|"
    lines = [
        f"# rerank-qlora over {len(seeds)} seeds",
        "",
        f"**{summary['verdict']['line']}**",
        "",
        f"Command: `{summary['command']}` (each seed in `seed-<s>/`, train.seed = s, every other setting "
        "the same).",
        "",
        f"| run | measure | {head} | mean ± std |",
        rule,
    ]
    for run, by_measure in summary["mean_std"].items():
        for m, v in by_measure.items():
            cells = " | ".join(f"{per[str(s)]['scores'][run][m]:.4f}" for s in seeds)
            lines.append(f"| {run} | {measure_name(m)} | {cells} | {_ms(v)} |")
    weights = ", ".join(f"seed {s}: {per[str(s)]['fusion_weight']}" for s in seeds)
    lines += ["", f"Fusion weight (chosen on validation per seed): {weights}.", ""]
    lines += [
        f"{measure_name(summary['measure'])} gain over {summary['baseline']}: mean difference [95% bootstrap "
        "CI] and the run's own paired randomization p, per seed.",
        "",
        f"| run | {head} | mean ± std |",
        "|---" * (len(seeds) + 2) + "|",
    ]
    for run, v in summary["gain_mean_std"].items():
        cells = " | ".join(gain_cell(per[str(s)]["gains"].get(run)) for s in seeds)
        lines.append(f"| {run} | {cells} | {_ms(v, signed=True)} |")
    averaged = summary["seed_averaged"]
    lines += [
        "",
        f"Across seeds: {averaged['test']}.",
        "",
        "| run | queries | diff | 95% CI | randomization p | t-test p |",
        "|---|---|---|---|---|---|",
    ]
    for run, r in averaged["rows"].items():
        lines.append(
            f"| {run} | {r['queries']} | {r['mean_diff']:+.4f} | [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | "
            f"{r['p_randomization']:.4f} | {r['p_t']:.4f} |"
        )
    return "\n".join(lines) + "\n"
