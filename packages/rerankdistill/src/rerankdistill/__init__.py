"""Reasoning rerankers: teacher explanations and labels, distillation into a small student, reward-based
refinement, pointwise reranking of BM25 candidates, nDCG@10.

The core (data, BM25, metrics, label parsing, teacher store, HTTP teacher) needs no torch; training and the
transformers/vLLM backends import it lazily.
"""

from rerankdistill.bm25 import BM25Index, bm25_search
from rerankdistill.datasets import (
    CRANFIELD_GAINS,
    BrightTask,
    load_beir,
    load_bright,
    load_cranfield,
    load_jsonl,
)
from rerankdistill.metrics import (
    MetricScore,
    average_precision,
    comparison_table,
    evaluate,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
)
from rerankdistill.trec import (
    TrecFormatError,
    read_qrels,
    read_run,
    read_topics,
    write_qrels,
    write_run,
    write_topics,
)

__all__ = [
    "BM25Index", "BrightTask", "CRANFIELD_GAINS", "MetricScore", "TrecFormatError", "average_precision",
    "bm25_search", "comparison_table", "evaluate", "load_beir", "load_bright", "load_cranfield", "load_jsonl",
    "ndcg_at_k", "precision_at_k", "read_qrels", "read_run", "read_topics", "recall_at_k", "write_qrels",
    "write_run", "write_topics",
]
