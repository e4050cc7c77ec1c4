"""The training phases of a run (rerankdistill.train.phases) on a tiny model: the first logged loss is the
hand-computed one of the step's batch, a resumed phase logs what an uninterrupted one logs, the label phase's
groups and notes, reward-weighted refinement keeps the teacher's answer and reuses its stored samples, GRPO
logs its reward, and bad batch settings are refused."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

from rerankdistill.labels import INTERANK_PROMPT
from rerankdistill.teacher import Pair, TeacherRecord
from rerankdistill.train.common import collate, weighted_loss
from rerankdistill.train.phases import (
    LR_SCHEDULES,
    PhaseLoop,
    RefineSettings,
    answer_examples,
    distributed_layout,
    lr_factor,
    refine_grpo,
    refine_reward_weighted,
    train_answers,
    train_labels,
)

PAIRS = [
    Pair(f"q{q}", f"d{d}", f"find topic {q}", f"def topic_{d}(): return {d}")
    for q in range(3)
    for d in range(3)
]
RECORDS = [
    TeacherRecord(
        p.qid,
        p.docid,
        "t",
        f"It is topic {p.docid[1]}. Relevance Label: {2 * (p.qid[1] == p.docid[1])}",
        2 * (p.qid[1] == p.docid[1]),
    )
    for p in PAIRS
]


@pytest.fixture
def acc():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _loop(tmp_path, said=None, **changes):
    settings = dict(
        run_dir=tmp_path,
        batch_size=4,
        micro_batch_size=2,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=1,
        max_grad_norm=1.0,
        seed=3,
        distill_steps=3,
        progress=False,
        say=(said.append if said is not None else print),
    )
    settings.update(changes)
    return PhaseLoop(**settings)


def _model(tok, seed=7):
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    return tiny_causal_lm(tokenizer=tok, seed=seed)


def test_answer_phase_first_loss_is_the_batchs_and_resume_matches(tmp_path, tiny_tokenizer, acc):
    tok = tiny_tokenizer
    said: list[str] = []
    encoded, note = answer_examples(tok, PAIRS, RECORDS, INTERANK_PROMPT, True, 512, False, say=said.append)
    assert note == {
        "pairs": 9,
        "used": 9,
        "no_label": 0,
        "no_pair": 0,
        "too_long": 0,
        "too_long_fate": "dropped",
    }
    assert said == ["9 distillation examples (0 longer than 512 tokens: dropped)"]

    # the reference: step 0's global batch is the first 4 of the seeded shuffle, in 2 micro batches
    order = list(range(9))
    random.Random(3 * 1000).shuffle(order)
    reference = _model(tok)
    with torch.no_grad():
        micro_losses = []
        for micro in (order[0:2], order[2:4]):
            batch = collate([encoded[j] for j in micro], tok.pad_token_id)
            logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            micro_losses.append(weighted_loss(logits, batch["labels"], batch["weights"]))
    expected_first = float(sum(micro_losses) / 2)

    whole = train_answers(
        acc, _model(tok), tok.pad_token_id, encoded, 4, 1e-2, "distill", _loop(tmp_path / "a")
    )
    losses = [row["distill/loss"] for row in whole.history]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(expected_first, rel=1e-5)
    assert losses[-1] < losses[0]
    assert whole.notes == {}

    # 2 steps, then the same phase asked for 4 resumes at step 2 and logs what the uninterrupted run logged
    said.clear()
    train_answers(acc, _model(tok), tok.pad_token_id, encoded, 2, 1e-2, "distill", _loop(tmp_path / "b"))
    resumed = train_answers(
        acc, _model(tok), tok.pad_token_id, encoded, 4, 1e-2, "distill", _loop(tmp_path / "b", said)
    )
    assert said and said[0].startswith("resumed distill from ") and said[0].endswith("at step 2")
    assert [r["distill/loss"] for r in resumed.history] == pytest.approx(losses, rel=1e-5)
    assert (tmp_path / "b" / "checkpoints" / "distill").is_dir()
    for name, p in whole.model.named_parameters():
        torch.testing.assert_close(p, dict(resumed.model.named_parameters())[name], msg=name)


def test_answer_phase_refuses_bad_batches(tmp_path, tiny_tokenizer, acc):
    tok = tiny_tokenizer
    encoded, _ = answer_examples(tok, PAIRS, RECORDS, INTERANK_PROMPT, True, 512, False)
    with pytest.raises(ValueError, match=r"train.batch_size \(5\) must be a multiple"):
        train_answers(acc, _model(tok), 0, encoded, 1, 1e-3, "distill", _loop(tmp_path, batch_size=5))
    with pytest.raises(ValueError, match="refine: no training examples"):
        train_answers(acc, _model(tok), 0, [], 1, 1e-3, "refine", _loop(tmp_path))


def test_label_phase_groups_queries_and_notes(tmp_path, tiny_tokenizer, acc):
    from rerankdistill.train.forced_label import label_token_ids

    tok = tiny_tokenizer
    try:
        label_token_ids(tok)
    except ValueError:
        pytest.skip("this tokenizer splits a label")
    said: list[str] = []
    records = [*RECORDS[:-1], TeacherRecord("q2", "d2", "t", "???", None)]  # one pair without a label
    result = train_labels(
        acc,
        _model(tok),
        tok,
        INTERANK_PROMPT,
        PAIRS,
        records,
        lambda q, d: "Matches: none.",
        "listwise",
        3,
        1e-2,
        400,
        3,
        0.2,
        _loop(tmp_path, said, batch_size=6),
    )
    assert result.notes == {
        "pairs": 9,
        "used": 8,
        "too_long": 0,
        "too_long_fate": "dropped (documents are cut to fit; these did not fit at all)",
    }
    assert said == ["8 label examples in 3 query groups (0 did not fit), 2 queries per step"]
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert all(math.isfinite(r["distill/loss"]) for r in result.history)
    with pytest.raises(ValueError, match="kind"):
        train_labels(
            acc,
            _model(tok),
            tok,
            INTERANK_PROMPT,
            PAIRS,
            records,
            lambda q, d: "",
            "pairwise",
            1,
            1e-2,
            400,
            3,
            0.2,
            _loop(tmp_path / "x"),
        )


REFINE = RefineSettings(
    pairs=3, samples=2, steps=2, temperature=1.0, threshold=0.85, max_new_tokens=6, sample_batch_size=2
)


def test_reward_weighted_refinement_keeps_the_teachers_answer_and_reuses_samples(
    tmp_path, tiny_tokenizer, acc
):
    tok = tiny_tokenizer
    said: list[str] = []
    loop = _loop(tmp_path, said, batch_size=2, micro_batch_size=1)
    result = refine_reward_weighted(
        acc, _model(tok), tok, INTERANK_PROMPT, PAIRS, RECORDS, REFINE, 1e-2, True, 512, loop
    )
    samples = json.loads((tmp_path / "refine_samples.json").read_text())
    assert len(samples) == 3 and all(len(g) == 2 for g in samples)
    agree = result.notes["samples_agreeing_with_teacher"]
    # the random tiny model hardly ever writes a label: the teacher's answer (reward 1) is kept for each pair
    assert result.notes["pairs"] == 3 and result.notes["samples"] == 6 and result.notes["kept"] >= 3
    assert said[0] == "sampling 2 explanations for each of 3 pairs"
    assert said[1].startswith(f"{agree} of 6 samples agree with the teacher's label;")
    assert [r["step"] for r in result.history] == [1, 2]

    said.clear()  # a resumed run reuses the stored samples and the finished phase's checkpoint
    again = refine_reward_weighted(
        acc, _model(tok), tok, INTERANK_PROMPT, PAIRS, RECORDS, REFINE, 1e-2, True, 512, loop
    )
    assert not any(s.startswith("sampling") for s in said) and again.notes == result.notes
    assert [r["refine/loss"] for r in again.history] == [r["refine/loss"] for r in result.history]


def test_grpo_refinement_logs_its_reward(tmp_path, tiny_tokenizer, acc):
    tok = tiny_tokenizer
    said: list[str] = []
    loop = _loop(tmp_path, said, batch_size=2, micro_batch_size=1)
    result = refine_grpo(acc, _model(tok), tok, INTERANK_PROMPT, PAIRS, RECORDS, REFINE, 1e-2, 512, loop)
    assert result.notes == {"method": "grpo", "pairs": 3, "samples_per_prompt": 2, "prompts_per_step": 2}
    assert said == ["GRPO on 3 pairs, 2 samples per prompt, 2 prompt(s) per step"]
    assert [r["step"] for r in result.history] == [1, 2]
    assert all(0.0 <= r["refine/reward"] <= 1.5 for r in result.history)
    assert not any("refine/kl" in r for r in result.history)  # kl_beta = 0: no reference, no KL row
    kl_loop = _loop(tmp_path / "kl", said, batch_size=2, micro_batch_size=1)
    settings = dataclasses.replace(REFINE, kl_beta=0.3)
    anchored = refine_grpo(
        acc, _model(tok), tok, INTERANK_PROMPT, PAIRS, RECORDS, settings, 1e-2, 512, kl_loop
    )
    kls = [r["refine/kl"] for r in anchored.history]
    assert len(kls) == 2 and kls[0] == pytest.approx(0.0, abs=1e-6) and all(k >= 0 for k in kls)
    unlabelled = [TeacherRecord(r.qid, r.docid, "t", "?", None) for r in RECORDS]
    with pytest.raises(ValueError, match="no teacher-labelled pair"):
        refine_grpo(acc, _model(tok), tok, INTERANK_PROMPT, PAIRS, unlabelled, REFINE, 1e-2, 512, loop)


def test_distributed_layout_of_one_process(tiny_tokenizer, acc):
    note, line = distributed_layout(acc, _model(tiny_tokenizer))
    assert note == {"type": "NO", "processes": 1, "sharded": False} and line == "1 process(es), NO"


def test_lr_schedules_warm_up_then_decay_to_zero():
    # warmup 4 of 20 steps: 1/4 .. 1 over steps 0..3 in every schedule
    for schedule in LR_SCHEDULES:
        assert [lr_factor(s, 20, 4, schedule) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [lr_factor(s, 20, 4, "constant") for s in (4, 12, 19)] == [1.0, 1.0, 1.0]
    # after warmup: t = (s - 4) / 16
    assert [lr_factor(s, 20, 4, "linear") for s in (4, 12, 19)] == pytest.approx([1.0, 0.5, 1 / 16])
    assert lr_factor(12, 20, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(8, 20, 4, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    with pytest.raises(ValueError, match="lr_schedule"):
        _loop(Path("unused"), lr_schedule="step")


def test_a_phase_logs_the_decaying_rate(tmp_path, tiny_tokenizer, acc):
    tok = tiny_tokenizer
    encoded, _ = answer_examples(tok, PAIRS, RECORDS, INTERANK_PROMPT, True, 512, False, say=lambda _: None)
    loop = _loop(tmp_path, said=[], warmup_steps=1, lr_schedule="linear")
    result = train_answers(acc, _model(tok), tok.pad_token_id, encoded, 4, 1e-2, "distill", loop)
    # the row of step s logs the rate of step s + 1 (the scheduler has stepped): 1 - s / 3 after warmup
    assert [row["lr"] for row in result.history] == pytest.approx([1e-2 * (1 - s / 3) for s in range(4)])


def test_weight_average_covers_the_phases_last_fraction(tmp_path, tiny_tokenizer, acc):
    assert _loop(tmp_path).average_from(3000) is None  # off by default
    assert _loop(tmp_path, weight_average=0.5).average_from(3000) == 1500
    assert _loop(tmp_path, weight_average=0.01).average_from(5) == 4  # at least the last step
    assert _loop(tmp_path, weight_average=1.0).average_from(4) == 0
    with pytest.raises(ValueError, match="weight_average"):
        _loop(tmp_path, weight_average=1.5)
    # a phase ends with the average: not the last step's adapter
    tok = tiny_tokenizer
    encoded, _ = answer_examples(tok, PAIRS, RECORDS, INTERANK_PROMPT, True, 512, False, say=lambda _: None)
    last = train_answers(
        acc, _model(tok), tok.pad_token_id, encoded, 4, 1e-2, "distill", _loop(tmp_path / "a")
    )
    loop = _loop(tmp_path / "b", weight_average=0.5)
    averaged = train_answers(acc, _model(tok), tok.pad_token_id, encoded, 4, 1e-2, "distill", loop)
    assert [r["distill/loss"] for r in averaged.history] == [r["distill/loss"] for r in last.history]
    lora = [n for n, p in last.model.named_parameters() if p.requires_grad]
    a, b = dict(last.model.named_parameters()), dict(averaged.model.named_parameters())
    assert lora and any(not torch.equal(a[n], b[n]) for n in lora)
