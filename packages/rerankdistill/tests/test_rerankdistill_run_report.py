"""The run report's pieces: fusion chosen on validation only, paired tests against each baseline on a case
with a known answer, the length-sorted judge's order, the training curve PNG and the markdown report."""

from __future__ import annotations

import random

import pytest

from rerankdistill.fusion import select_fusion_weight
from rerankdistill.length_sorted import LengthSortedJudge
from rerankdistill.metrics import ndcg_at_k
from rerankdistill.run_report import (
    artefacts_footer,
    choose_fusion,
    context_lines,
    fused_run,
    plot_training_curve,
    report_markdown,
    significance_against,
)


def _case(seed: int, n_queries: int = 23, n_docs: int = 11):
    rng = random.Random(seed)
    first = {f"q{i}": {f"d{j}": rng.uniform(0, 9) for j in range(n_docs)} for i in range(n_queries)}
    qrels = {q: {f"d{rng.randrange(n_docs)}": 2} for q in first}
    scores = {q: {d: rng.choice([0.0, 0.5, 2.0]) for d in docs} for q, docs in first.items()}
    run = {q: {d: s for d, s in docs.items()} for q, docs in scores.items()}
    return first, qrels, scores, run


def test_choose_fusion_uses_only_the_validation_queries():
    first, qrels, scores, run = _case(0)
    val = {q: first[q] for q in list(first)[:9]}
    val_qrels = {q: qrels[q] for q in val}
    chosen = choose_fusion(val, val_qrels, run, scores, k=7)
    weight, by_weight = select_fusion_weight(val, scores, val_qrels, 7)
    assert chosen["weight"] == weight and chosen["validation"]["by_weight"] == by_weight
    assert chosen["validation"]["queries"] == 9
    assert chosen["validation"]["bm25"] == pytest.approx(float(ndcg_at_k(val, val_qrels, 10)))
    assert chosen["chosen"].startswith("chosen on 9 validation queries (nDCG@10 averaged") and chosen["name"]
    raw = choose_fusion(val, val_qrels, run, scores, k=7, smoothing=0)
    assert raw["chosen"] == "chosen on 9 validation queries"
    assert raw["weight"] == select_fusion_weight(val, scores, val_qrels, 7, smoothing=0)[0]
    given = choose_fusion(val, val_qrels, run, scores, k=7, weight=0.3)
    assert given["weight"] == 0.3 and given["chosen"] == "given" and "by_weight" not in given["validation"]
    none = choose_fusion({}, {}, run, scores, k=7)
    assert none["weight"] is None and none["name"] == "" and none["chosen"].startswith("none")
    with pytest.raises(ValueError, match="no fusion weight"):
        fused_run(first, scores, none, 7)
    assert fused_run(first, scores, given, 7).keys() == first.keys()


def test_significance_against_each_baseline_known_answer():
    # 20 queries, the candidate finds the gold document at rank 1 where the baseline has it at rank 2:
    # nDCG@10 difference 1 - 1/log2(3) on every query, so the exact sign-flip p is 2 / 2^20 and the CI a point
    qrels = {f"q{i}": {"gold": 1} for i in range(20)}
    better = {q: {"gold": 2.0, "other": 1.0} for q in qrels}
    worse = {q: {"gold": 1.0, "other": 2.0} for q in qrels}
    out = significance_against(
        {"base": worse, "same": worse, "cand": better}, qrels, ("base", "same"), measures=("ndcg_cut_10",)
    )
    rows = {(r["run"], r["baseline"]): r for r in out["rows"]}
    assert set(rows) == {("cand", "base"), ("cand", "same")}
    gain = 1 - 1 / 1.5849625007211562
    for r in rows.values():
        assert r["mean_diff"] == pytest.approx(gain) and r["queries"] == 20
        assert r["ci_low"] == pytest.approx(gain) and r["ci_high"] == pytest.approx(gain)
        assert r["p_randomization"] < 1e-3
    assert out["table"].count("paired tests against") == 2
    with pytest.raises(ValueError, match="not among the runs"):
        significance_against({"cand": better}, qrels, ("bm25",))


class _RecordingJudge:
    name = "rec"

    def __init__(self):
        self.calls: list[list[tuple[str, str]]] = []

    def judge(self, pairs):
        self.calls.append(list(pairs))
        return [f"{q}|{d}" for q, d in pairs]


def test_length_sorted_judge_batches_by_length_and_keeps_input_order():
    rng = random.Random(3)
    pairs = [("q" * rng.randint(1, 9), "d" * rng.randint(0, 400)) for _ in range(37)]
    inner = _RecordingJudge()
    judge = LengthSortedJudge(inner, batch_size=5, progress=False)
    assert judge.name == "rec"
    assert judge.judge(pairs) == [f"{q}|{d}" for q, d in pairs]
    assert [len(c) for c in inner.calls] == [5] * 7 + [2]
    lengths = [len(q) + len(d) for call in inner.calls for q, d in call]
    assert lengths == sorted(lengths)
    with pytest.raises(ValueError, match="batch_size"):
        LengthSortedJudge(inner, batch_size=0)


def test_training_curve_png_and_report(tmp_path):
    history = [{"phase": "distill", "step": s, "distill/loss": 3.0 / s} for s in range(5, 65, 5)]
    history += [{"phase": "refine", "step": s, "refine/loss": 0.3 - 0.01 * s} for s in (2, 4, 6)]
    png = plot_training_curve(history, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    fusion = {
        "weight": 0.4,
        "chosen": "chosen on 9 validation queries",
        "name": "fused",
        "validation": {"queries": 9, "bm25": 0.5, "reranked": 0.25, "by_weight": {0.0: 0.5, 0.4: 0.55}},
    }
    text = report_markdown("r", ["Task: t."], "| a |", fusion, 20, figure="curve.png", footer=["end"])
    assert text.startswith("# r\n") and "w = 0.4 (chosen on 9 validation queries)" in text
    assert "fused by w: 0: 0.5000, 0.4: 0.5500." in text and "![training curve](curve.png)" in text
    no_fusion = {**fusion, "weight": None, "chosen": "none: no validation", "validation": {}}
    assert "No fused run: none: no validation." in report_markdown("r", [], "", no_fusion, 20)


RESULTS = {
    "task": {"name": "t", "documents": 9, "train_queries": 5, "validation_queries": 2, "eval_queries": 3},
    "attention": "SI p-RoPE",
    "adapters": "NF4 base, LoRA r=4",
    "parameters": "12 trainable",
    "teacher": {"name": "oracle", "used": 7, "too_long": 1, "too_long_fate": "cut"},
    "first_stage": {
        "reranked": "code",
        "k1": 0.9,
        "b": 0.4,
        "chosen": "given",
        "stopwords": "none",
        "stemmer": None,
    },
    "eval_lengths": {"pairs": 6, "longer_than_training_context": 2, "max_prompt_tokens": 900},
    "unparseable": 1,
    "judged": 6,
    "fusion": {"weight": 0.4},
    "adapter_dir": "/r/adapter",
    "elapsed_s": 12.4,
}


def test_context_lines_and_footer_say_what_the_run_was():
    lines = context_lines(RESULTS, "tiny", 512, 20, 5)
    assert lines == [
        "Task: t (9 documents; 5 training queries, 2 validation queries, 3 held-out evaluation queries).",
        "Model: tiny; attention: SI p-RoPE; NF4 base, LoRA r=4; 12 trainable.",
        "Teacher: oracle; 7 distillation examples, 1 longer than the training context (512 tokens): cut.",
        "First stage: code BM25 (identifier-aware: k1 0.9, b 0.4, given; stopwords none, stemmer None).",
        "Evaluation: BM25 top-20, top-5 reranked pointwise; 2 of 6 prompts are longer than the training "
        "context (longest 900 tokens). Unparseable judgements: 1 of 6.",
    ]
    offline = context_lines(RESULTS, "tiny", 512, 20, 5, offline_explanation="evidence")
    assert offline[2].startswith(
        "Teacher: oracle (OFFLINE stand-in built from the gold judgements: evidence explanations, no model "
        "reasoning); 7 distillation"
    )
    assert offline[:2] + offline[3:] == lines[:2] + lines[3:]
    (footer,) = artefacts_footer(RESULTS)
    assert footer.startswith("Adapter (peft format): `/r/adapter`. ") and footer.endswith("Wall time 12 s.")
    assert "`reranked.run`, `fused.run` (TREC format" in footer
    (unfused,) = artefacts_footer({**RESULTS, "fusion": {"weight": None}})
    assert "fused.run" not in unfused and "`reranked.run` (TREC format" in unfused
