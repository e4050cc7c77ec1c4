"""`lm-pretrain [--config FILE] [key=value ...]` (one run) and `lm-pretrain study --config FILE` (a study).

Both run unchanged under `accelerate launch` (e.g. `accelerate launch --cpu --num_processes 2 -m lm_pretrain.cli ...`).
"""

from __future__ import annotations

import argparse
import sys

from lm_pretrain.config import PretrainConfig, StudyConfig
from shared_kernels.errors import exit_on_user_error
from shared_kernels.runconfig import add_config_arguments, config_from_args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    study = bool(argv) and argv[0] == "study"
    if study:
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="lm-pretrain study" if study else "lm-pretrain",
        description=(
            "Run a study: every variant (overrides of `base`) for every seed, then a table and a plot."
            if study else
            "Pretrain a small byte-level LM (siattn's GPT) with a choice of attention and precision, then "
            "evaluate it at longer contexts. `lm-pretrain study --help` for studies."
        ),
    )
    add_config_arguments(parser, StudyConfig if study else PretrainConfig)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args(argv)
    # a user error (config value, file, non-finite loss, stale checkpoint): one line on stderr, exit code 2
    return exit_on_user_error(parser.prog, lambda: _run(args, study))


def _run(args, study: bool) -> int:
    cfg = config_from_args(StudyConfig if study else PretrainConfig, args)
    if study:
        from lm_pretrain.study import run_study

        run_study(cfg, progress=not args.no_progress)
        return 0
    from lm_pretrain.recipe import run

    results = run(cfg, progress=not args.no_progress)
    if results:
        print(f"[lm-pretrain] val loss: {results['val_loss']}")
        print(f"[lm-pretrain] report: {cfg.run_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
