"""`idiom-sweep [--config FILE] [key=value ...]`: an idiomreason sweep over models x conditions x datasets.

Without --config it runs the offline default (`idiom_sweep/default.yaml`: two tiny models built here,
SemEval-2022 2A dev from ../shared/data or a bundled fixture), with any key=value overrides on top.
Resumable: predictions are cached by everything that can change them; a re-run skips finished work.
"""

from __future__ import annotations

import sys

from idiom_sweep.config import IdiomSweepConfig
from shared_kernels.app import cli_main

DESCRIPTION = (
    "Idiomaticity detection with reasoning LLMs: one command runs (or resumes) a sweep over models x "
    "prompt conditions x datasets, optionally loading models in 4 bits through nf4lora, and writes the "
    "macro-F1 table (markdown + CSV) and the macro-F1-vs-size plot. With no --config: the offline "
    "default (tiny models built here, SemEval-2022 2A dev)."
)


def _offline_default() -> dict:
    """The offline default config (`idiom_sweep/default.yaml`), used when no --config is given."""
    from idiom_sweep.offline import default_config_path
    from idiomreason.textfile import load_yaml

    return load_yaml(default_config_path())


def _run(cfg: IdiomSweepConfig, progress: bool) -> None:
    from idiom_sweep.recipe import run

    run(cfg, progress=progress)


def main(argv: list[str] | None = None) -> int:
    from idiomreason.cli import USER_ERRORS

    return cli_main(
        "idiom-sweep",
        DESCRIPTION,
        IdiomSweepConfig,
        _run,
        argv,
        user_errors=USER_ERRORS,
        example="max_new_tokens=2048",
        default_config=_offline_default,
    )


if __name__ == "__main__":
    sys.exit(main())
