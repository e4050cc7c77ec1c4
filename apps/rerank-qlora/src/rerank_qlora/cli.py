"""`rerank-qlora [--config FILE] [key=value ...]`: with no arguments, the embedded offline demo.

Runs unchanged under `accelerate launch` (e.g. `accelerate launch --multi_gpu --num_processes 2 -m rerank_qlora.cli`).
"""

from __future__ import annotations

import argparse
import sys

from rerank_qlora.config import RerankQLoRAConfig
from shared_kernels.errors import exit_on_user_error
from shared_kernels.runconfig import add_config_arguments, config_from_args

DESCRIPTION = """\
Long-context QLoRA fine-tuning of a reasoning reranker: base model -> NF4 + double quantization (nf4lora) ->
scale-invariant p-RoPE attention (siattn) -> LoRA distillation on teacher explanations and refinement
(rerankdistill) -> pointwise reranking of BM25 candidates -> nDCG@10 report against BM25 -> adapter (peft format).

With no arguments: the embedded default, fully offline on CPU (a retrieval task built from the Python standard
library, a built-in tiny model trained here, and an OFFLINE teacher built from the gold judgements)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rerank-qlora", description=DESCRIPTION)
    add_config_arguments(parser, RerankQLoRAConfig)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    # a user error (config value, file, teacher server, non-finite loss): one line on stderr, exit code 2
    return exit_on_user_error("rerank-qlora", lambda: _run(args))


def _run(args) -> int:
    cfg = config_from_args(RerankQLoRAConfig, args)
    from rerank_qlora.recipe import run

    results = run(cfg, progress=not args.no_progress)
    if results:
        print(f"[rerank-qlora] report:  {cfg.run_dir / 'report.md'}")
        print(f"[rerank-qlora] adapter: {results['adapter_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
