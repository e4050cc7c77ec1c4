"""`rerank-qlora-seeds [--config FILE] [key=value ...] [--seeds 0 1 2]`: the app's run once per training seed,
then the seeds side by side.

Seed s runs in `<run_dir>/seed-<s>/` with train.seed = s and every other setting as given. A seed whose run
finished with the same settings is not rerun (its results.json is read); any other seed runs the app, which
resumes from what its folder holds and rebuilds what its fingerprints call stale. Then `<run_dir>/seeds.json`
and `<run_dir>/seeds.md` (atomic) hold the per-seed scores and tests, mean +- std, the seed-averaged test and
the verdict on issue 14's goal (`rerank_qlora.seed_report`). One process (no `accelerate launch`).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rerank_qlora.config import RerankQLoRAConfig
from rerank_qlora.stages import StageUnavailable
from shared_kernels.app import cli_main, flat_config
from shared_kernels.errors import UserError

PROG = "rerank-qlora-seeds"
DEFAULT_SEEDS = (0, 1, 2)
DESCRIPTION = f"""\
Runs rerank-qlora (same options, same key=value overrides) once per training seed, each in
<run_dir>/seed-<s>/ with train.seed=s, and writes <run_dir>/seeds.json and <run_dir>/seeds.md: every
run's scores per seed with mean +- std, the reranked and fused runs' nDCG@10 gain over identifier-aware BM25
with its 95% interval and paired randomization p per seed (the runs' own tests), a test of the seed-averaged
per-query scores, and whether issue 14's goal holds (the same run beats identifier-aware BM25 with p < 0.05 in
every one of at least 3 seeds). Finished seeds are reused; a rerun resumes the others.

Seeds: --seeds 0 1 2 (default {" ".join(map(str, DEFAULT_SEEDS))}) or --seeds 0,1,2; put key=value overrides
before --seeds."""
# settings that change no result: where the run lives, its trackers, and what the app's fingerprints ignore
_NOT_COMPARED = ("run_dir", "resume", "trackers")


def parse_seeds(tokens: Sequence[str] | None) -> list[int]:
    """The seeds of `--seeds` (space- or comma-separated integers >= 0, each once; None: the default)."""
    if tokens is None:
        return list(DEFAULT_SEEDS)
    seeds: list[int] = []
    for part in (p.strip() for token in tokens for p in token.split(",")):
        if "=" in part:
            raise UserError(f"--seeds: {part!r} is not a seed; put key=value overrides before --seeds")
        if part and not part.isdigit():
            raise UserError(f"--seeds: {part!r} is not a seed (an integer >= 0)")
        if part:
            seeds.append(int(part))
    if not seeds:
        raise UserError("--seeds: no seeds given; give integers >= 0, e.g. --seeds 0 1 2")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise UserError(f"--seeds: seed {twice[0]} is given twice; give each seed once")
    return seeds


def seed_config(cfg: RerankQLoRAConfig, seed: int) -> RerankQLoRAConfig:
    """`cfg` for seed `seed`: run_dir `<run_dir>/seed-<seed>`, train.seed `seed`, nothing else changed."""
    return dataclasses.replace(
        cfg, run_dir=Path(cfg.run_dir) / f"seed-{seed}", train=dataclasses.replace(cfg.train, seed=seed)
    )


def why_rerun(cfg: RerankQLoRAConfig) -> str | None:
    """None when `cfg.run_dir` holds a finished run of `cfg`'s settings (its results.json can be reused),
    else why it must run."""
    import yaml

    from rerank_qlora.artefacts import IGNORED
    from shared_kernels.runconfig import config_to_dict

    run_dir = Path(cfg.run_dir)
    results, recorded = run_dir / "results.json", run_dir / "config.yaml"
    if not cfg.resume:
        return "resume=false"
    if not (results.is_file() and recorded.is_file()):
        return "no finished run there"
    if results.stat().st_mtime_ns < recorded.stat().st_mtime_ns:  # config.yaml is written as a run starts
        return "its last run did not finish"
    skip = (*_NOT_COMPARED, *IGNORED)
    old = {k: v for k, v in flat_config(yaml.safe_load(recorded.read_text()) or {}).items() if k not in skip}
    new = {k: v for k, v in flat_config(config_to_dict(cfg)).items() if k not in skip}
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        return f"settings changed: {shown}" + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "")
    return None


def _check_folders(root: Path, seeds: Sequence[int]) -> None:
    for path in (root, *(root / f"seed-{s}" for s in seeds)):
        if path.exists() and not path.is_dir():
            raise UserError(f"run_dir: {str(path)!r} is a file, not a folder; choose another run_dir")


def run_seeds(
    cfg: RerankQLoRAConfig, seeds: Sequence[int], progress: bool = True, command: str = PROG
) -> dict[str, Any]:
    """Run (or reuse) each seed's run, then write seeds.json and seeds.md into `cfg.run_dir`.

    Args:
        cfg: the settings of every seed's run (train.seed and run_dir are replaced per seed).
        seeds: distinct training seeds.
        progress: progress bars of the app.
        command: the command that reproduces this, recorded in the outputs.

    Returns:
        seeds.json's content (`rerank_qlora.seed_report.summarize`).
    """
    from rerank_qlora import seed_report
    from rerank_qlora.recipe import CODE, run
    from shared_kernels.runconfig import write_json_atomic, write_text_atomic

    root = Path(cfg.run_dir)
    _check_folders(root, seeds)
    results, run_dirs = {}, {}
    for i, seed in enumerate(seeds, 1):
        one = seed_config(cfg, seed)
        run_dirs[seed] = Path(one.run_dir)
        reason = why_rerun(one)
        if reason is None:
            _say(f"seed {seed} ({i} of {len(seeds)}): reusing the finished run in {one.run_dir}")
        else:
            _say(f"seed {seed} ({i} of {len(seeds)}): running in {one.run_dir} ({reason})")
            run(one, progress=progress)
        results[seed] = json.loads((run_dirs[seed] / "results.json").read_text())
        for name, row in seed_report.gains_against(results[seed]).items():
            _say(f"seed {seed}: {name} - {CODE}, nDCG@10: {seed_report.gain_cell(row)}")
    summary = seed_report.summarize(results, run_dirs, command)
    write_json_atomic(root / "seeds.json", summary)
    write_text_atomic(root / "seeds.md", seed_report.markdown(summary))
    _say(f"seeds: {root / 'seeds.md'}")
    _say(summary["verdict"]["line"])
    return summary


def _say(text: str) -> None:
    print(f"[{PROG}] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)

    def go(cfg: RerankQLoRAConfig, progress: bool, seeds: list[str] | None) -> None:
        run_seeds(cfg, parse_seeds(seeds), progress, command=shlex.join([PROG, *args]))

    return cli_main(
        PROG,
        DESCRIPTION,
        RerankQLoRAConfig,
        go,
        args,
        user_errors=(StageUnavailable,),
        extra_options={
            "--seeds": {
                "nargs": "*",
                "default": None,
                "metavar": "SEED",
                "help": f"training seeds (default {' '.join(map(str, DEFAULT_SEEDS))})",
            }
        },
    )


if __name__ == "__main__":
    sys.exit(main())
