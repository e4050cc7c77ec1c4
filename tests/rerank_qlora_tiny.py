"""The tiny rerank-qlora configuration the app's tests share (`rerank-qlora` `key=value` overrides): a
1-layer, 32-wide model, LoRA rank 4, batches of 2, top-3 of 5 candidates reranked; a run takes seconds.

Each test file adds what it varies (training steps, query caps, refinement) after these. Imported by name:
the root pyproject puts tests/ on pytest's `pythonpath`.
"""

TINY = (
    "model.tiny_hidden_size=32",
    "model.tiny_layers=1",
    "model.tiny_heads=2",
    "model.tiny_pretrain_seq_len=64",
    "teacher.pairs_per_query=2",
    "lora.r=4",
    "train.batch_size=2",
    "train.micro_batch_size=1",
    "train.max_length=1024",
    "rerank.candidates=5",
    "rerank.k=3",
    "trackers=[none]",
    # the InteRank path (whole-answer distillation, then reward-weighted refinement), which the app's default
    # (label-pointwise, no refinement) skips; tests of the default's path set these back
    "train.objective=answer",
    "refine.method=reward-weighted",
)
