"""Flagship pipeline: long-context QLoRA fine-tuning of a reasoning reranker (NF4 + SI attention +
distillation + reranking + nDCG report)."""
