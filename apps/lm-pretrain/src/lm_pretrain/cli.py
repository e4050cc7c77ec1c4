"""`lm-pretrain [--config FILE] [key=value ...]` (one run) and `lm-pretrain study --config FILE` (a study).

Both run unchanged under `accelerate launch`
(e.g. `accelerate launch --multi_gpu --num_processes 2 -m lm_pretrain.cli ...`; on CPU `--cpu` would
launch one process).
"""

from __future__ import annotations

import sys

from lm_pretrain.config import PretrainConfig, StudyConfig
from shared_kernels.app import cli_main

RUN_DESCRIPTION = (
    "Pretrain a small byte-level LM (siattn's GPT) with a choice of attention and precision, then "
    "evaluate it at longer contexts. `lm-pretrain study --help` for studies."
)
STUDY_DESCRIPTION = (
    "Run a study: every variant (overrides of `base`) for every seed, then a table and a plot."
)


def _run(cfg: PretrainConfig, progress: bool) -> None:
    from lm_pretrain.recipe import run

    results = run(cfg, progress=progress)
    if results:
        print(f"[lm-pretrain] val loss: {results['val_loss']}")
        print(f"[lm-pretrain] report: {cfg.run_dir / 'report.md'}")


def _study(cfg: StudyConfig, progress: bool) -> None:
    from lm_pretrain.study import run_study

    run_study(cfg, progress=progress)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "study":
        return cli_main("lm-pretrain study", STUDY_DESCRIPTION, StudyConfig, _study, argv[1:])
    return cli_main("lm-pretrain", RUN_DESCRIPTION, PretrainConfig, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
