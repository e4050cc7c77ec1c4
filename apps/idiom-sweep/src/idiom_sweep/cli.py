"""`idiom-sweep --config FILE [key=value ...]`: an idiomreason sweep over models x conditions x datasets.

Resumable: predictions are cached per (model, condition, dataset, example); a re-run skips finished work.
"""

from __future__ import annotations

import sys

from idiom_sweep.config import IdiomSweepConfig
from shared_kernels.app import cli_main

DESCRIPTION = ("Idiomaticity detection with reasoning LLMs: one command runs (or resumes) a sweep over models x "
               "prompt conditions x datasets, optionally loading models in 4 bits through nf4lora, and writes the "
               "macro-F1 table (markdown + CSV) and the macro-F1-vs-size plot.")


def _run(cfg: IdiomSweepConfig, progress: bool) -> None:
    from idiom_sweep.recipe import run

    run(cfg, progress=progress)


def main(argv: list[str] | None = None) -> int:
    return cli_main("idiom-sweep", DESCRIPTION, IdiomSweepConfig, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
