"""Reasoning rerankers: teacher explanations and labels, distillation into a small student, reward-based
refinement, pointwise reranking of BM25 candidates, nDCG@10.

The core (data, BM25, metrics, label parsing, teacher store, HTTP teacher) needs no torch; training and the
transformers/vLLM backends import it lazily.
"""

from rerankdistill.bm25 import BM25Index, bm25_search, select_bm25_params
from rerankdistill.bm25_lucene import LuceneBM25Index
from rerankdistill.code_tokens import IdentifierTokenizer, identifier_tokens
from rerankdistill.datasets import (
    CRANFIELD_GAINS,
    BrightTask,
    load_beir,
    load_bright,
    load_cranfield,
    load_jsonl,
)
from rerankdistill.fusion import fuse, select_fusion_weight
from rerankdistill.labels import INTERANK_PROMPT, RelevancePrompt, parse_relevance
from rerankdistill.metrics import (
    MetricScore,
    average_precision,
    comparison_table,
    evaluate,
    judged_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    reciprocal_rank,
)
from rerankdistill.pairs import PairSplit, TrainingPair, build_training_pairs, load_pages
from rerankdistill.rerank import Judgement, RerankResult, TransformersJudge, rerank
from rerankdistill.teacher import (
    Completion,
    GenerationStats,
    Pair,
    QrelsTeacher,
    TeacherRecord,
    TeacherStore,
    generate_teacher_outputs,
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
from shared_kernels.significance import bootstrap_ci, compare_runs, paired_randomization_test, paired_t_test

# Training entry points import torch/transformers: resolved on first access, so `import rerankdistill`
# stays light.
_LAZY = {
    "sft": "rerankdistill.train.sft",
    "DistillExample": "rerankdistill.train.sft",
    "distill_examples": "rerankdistill.train.sft",
    "TrainResult": "rerankdistill.train.sft",
    "reward_weighted_finetune": "rerankdistill.train.rwft",
    "RefinePair": "rerankdistill.train.rwft",
    "group_weights": "rerankdistill.train.rwft",
    "label_agreement_reward": "rerankdistill.train.rwft",
    "grpo": "rerankdistill.train.grpo",
    "label_reward": "rerankdistill.train.grpo",
    "format_reward": "rerankdistill.train.grpo",
    "LoopConfig": "rerankdistill.train.common",
    "LoraSpec": "rerankdistill.train.common",
    "TransformersBackend": "rerankdistill.backends.hf",
    "load_causal_lm": "rerankdistill.backends.hf",
    "OpenAIChatBackend": "rerankdistill.backends.openai_http",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rerankdistill' has no attribute {name!r}")


__all__ = [
    "BM25Index",
    "BrightTask",
    "IdentifierTokenizer",
    "identifier_tokens",
    "select_bm25_params",
    "CRANFIELD_GAINS",
    "Completion",
    "GenerationStats",
    "INTERANK_PROMPT",
    "Judgement",
    "LuceneBM25Index",
    "MetricScore",
    "Pair",
    "PairSplit",
    "QrelsTeacher",
    "RelevancePrompt",
    "RerankResult",
    "TeacherRecord",
    "TeacherStore",
    "TrainingPair",
    "TransformersJudge",
    "TrecFormatError",
    "average_precision",
    "bm25_search",
    "bootstrap_ci",
    "compare_runs",
    "judged_at_k",
    "paired_randomization_test",
    "paired_t_test",
    "reciprocal_rank",
    "build_training_pairs",
    "comparison_table",
    "evaluate",
    "fuse",
    "generate_teacher_outputs",
    "load_beir",
    "load_bright",
    "load_cranfield",
    "load_jsonl",
    "load_pages",
    "ndcg_at_k",
    "parse_relevance",
    "precision_at_k",
    "read_qrels",
    "read_run",
    "read_topics",
    "recall_at_k",
    "rerank",
    "select_fusion_weight",
    "write_qrels",
    "write_run",
    "write_topics",
    *_LAZY,
]
