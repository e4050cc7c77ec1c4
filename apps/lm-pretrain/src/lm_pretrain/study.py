"""A study: named variants (overrides of one base config) x seeds, each a full run, then one table and plot.

Finished runs (results.json beside an identical config.yaml) are skipped, so an interrupted study resumes;
an interrupted run inside it resumes from its own checkpoint.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

import yaml

from lm_pretrain.config import PretrainConfig, StudyConfig
from lm_pretrain.plots import plot_study
from lm_pretrain.recipe import run
from shared_kernels.runconfig import config_to_dict, load_config, write_json_atomic, write_text_atomic


def variant_configs(study: StudyConfig) -> list[tuple[str, int, PretrainConfig]]:
    """(variant, seed, config) for every run of the study, in order."""
    base = config_to_dict(study.base)
    out = []
    for name, overrides in study.variants.items():
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        for seed in study.seeds:
            cfg = load_config(
                PretrainConfig,
                base=base,
                overrides=[
                    *overrides,
                    f"train.seed={seed}",
                    f"run_dir={Path(study.run_dir) / slug / f'seed{seed}'}",
                ],
            )
            out.append((name, seed, cfg))
    return out


def _finished(cfg: PretrainConfig) -> dict[str, Any] | None:
    run_dir = Path(cfg.run_dir)
    results, saved = run_dir / "results.json", run_dir / "config.yaml"
    if results.is_file() and saved.is_file() and yaml.safe_load(saved.read_text()) == config_to_dict(cfg):
        return json.loads(results.read_text())
    return None


def run_study(study: StudyConfig, progress: bool = True) -> dict[str, Any]:
    """Run every (variant, seed) and write the study's results.json, report.md and
    length_generalisation.png."""
    from accelerate import PartialState

    state = PartialState()
    rows: list[dict[str, Any]] = []
    for name, seed, cfg in variant_configs(study):
        results = _finished(cfg)
        if results is None:
            if state.is_main_process:
                print(f"[lm-pretrain study] {name} seed {seed} -> {cfg.run_dir}", flush=True)
            run(cfg, progress=progress)
            state.wait_for_everyone()
            results = json.loads((Path(cfg.run_dir) / "results.json").read_text())
        elif state.is_main_process:
            print(f"[lm-pretrain study] {name} seed {seed}: done earlier, skipped", flush=True)
        rows.append({"variant": name, "seed": seed, **results})
    summary = summarise(rows)
    if state.is_main_process:
        out = Path(study.run_dir)
        write_json_atomic(out / "results.json", {"runs": rows, "summary": summary})
        write_text_atomic(out / "report.md", report_markdown(study, summary))
        plot_study(summary, out / "length_generalisation.png", study.base.train.seq_len)
        print(f"[lm-pretrain study] report: {out / 'report.md'}", flush=True)
    return summary


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant and eval length: mean and spread (max - min) of the validation loss over seeds."""
    summary: dict[str, Any] = {}
    for row in rows:
        entry = summary.setdefault(row["variant"], {"seeds": [], "val_loss": {}, "clip": []})
        entry["seeds"].append(row["seed"])
        clips = [v for k, v in row.get("mx_stats", {}).items() if k.endswith("clip_fraction")]
        entry["clip"].append(max(clips) if clips else None)
        for length, loss in row["val_loss"].items():
            entry["val_loss"].setdefault(length, []).append(loss)
    for entry in summary.values():
        entry["mean"] = {k: statistics.fmean(v) for k, v in entry["val_loss"].items()}
        entry["spread"] = {k: max(v) - min(v) for k, v in entry["val_loss"].items()}
    return summary


def report_markdown(study: StudyConfig, summary: dict[str, Any]) -> str:
    names = list(summary)
    lengths = list(summary[names[0]]["mean"])
    baseline = summary[names[0]]["mean"]
    head = (
        "| variant | " + " | ".join(f"val loss @{n}" for n in lengths) + f" | ratio to first @{lengths[0]} | "
        "max MX clip fraction |"
    )
    lines = [
        "# lm-pretrain study",
        "",
        f"Validation loss in nats/byte (mean over seeds {study.seeds}; ± max-min spread), trained at context "
        f"{study.base.train.seq_len} for {study.base.train.steps} steps on {study.base.data.corpus!r}.",
        "",
        head,
        "|" + "---|" * (len(lengths) + 3),
    ]
    for name in names:
        e = summary[name]
        cells = [f"{e['mean'][n]:.4f} ± {e['spread'][n]:.4f}" for n in lengths]
        clips = [c for c in e["clip"] if c is not None]
        clip = f"{max(clips):.2e}" if clips else "-"
        ratio = e["mean"][lengths[0]] / baseline[lengths[0]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:.4f} | {clip} |")
    lines += ["", "![length generalisation](length_generalisation.png)", ""]
    return "\n".join(lines)
