"""`rerank-qlora [--config FILE] [key=value ...]`: with no arguments, the embedded offline demo.

Runs unchanged under `accelerate launch`
(e.g. `accelerate launch --multi_gpu --num_processes 2 -m rerank_qlora.cli`).
"""

from __future__ import annotations

import sys

from rerank_qlora.config import RerankQLoRAConfig
from rerank_qlora.stages import StageUnavailable
from shared_kernels.app import cli_main

DESCRIPTION = """\
Long-context QLoRA fine-tuning of a reasoning reranker: base model -> NF4 + double quantization (nf4lora) ->
scale-invariant p-RoPE attention (siattn) -> LoRA distillation on teacher explanations and refinement
(rerankdistill) -> pointwise reranking of BM25 candidates -> nDCG@10 report against BM25 -> adapter (peft
format).

With no arguments: the embedded default, fully offline on CPU (a retrieval task built from the Python standard
library, a built-in tiny model trained here, and an OFFLINE teacher built from the gold judgements)."""


def _run(cfg: RerankQLoRAConfig, progress: bool) -> None:
    from rerank_qlora.recipe import run

    results = run(cfg, progress=progress)
    if results:
        print(f"[rerank-qlora] report:  {cfg.run_dir / 'report.md'}")
        print(f"[rerank-qlora] adapter: {results['adapter_dir']}")


def main(argv: list[str] | None = None) -> int:
    return cli_main(
        "rerank-qlora", DESCRIPTION, RerankQLoRAConfig, _run, argv, user_errors=(StageUnavailable,)
    )


if __name__ == "__main__":
    sys.exit(main())
