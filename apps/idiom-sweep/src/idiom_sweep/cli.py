"""`idiom-sweep [--config FILE] [key=value ...]`: an idiomreason sweep over models x conditions x datasets.

Without --config it runs the offline default (`idiom_sweep/default.yaml`: two tiny models built here, SemEval-2022
2A dev from ../shared/data or a bundled fixture), with any key=value overrides on top.
Resumable: predictions are cached by everything that can change them; a re-run skips finished work.
"""

from __future__ import annotations

import argparse
import sys

from idiom_sweep.config import IdiomSweepConfig
from shared_kernels.runconfig import ConfigError, add_config_arguments, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="idiom-sweep",
        description="Idiomaticity detection with reasoning LLMs: one command runs (or resumes) a sweep over "
        "models x prompt conditions x datasets, optionally loading models in 4 bits through nf4lora, and "
        "writes the macro-F1 table (markdown + CSV) and the macro-F1-vs-size plot. With no --config: the offline "
        "default (tiny models built here, SemEval-2022 2A dev).",
    )
    add_config_arguments(parser, IdiomSweepConfig, example="max_new_tokens=2048")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        base = None
        if args.config is None:  # the offline default, as data
            from idiom_sweep.offline import default_config_path
            from idiomreason.textfile import load_yaml

            base = load_yaml(default_config_path())
        cfg = config_from_args(IdiomSweepConfig, args, base=base)
    except ConfigError as err:
        parser.error(str(err))
    from idiom_sweep.recipe import run
    from idiomreason.cli import USER_ERRORS, one_line

    try:
        run(cfg, progress=not args.no_progress)
    except USER_ERRORS as e:
        print(f"idiom-sweep: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
