"""The rubric reward model: prompt, score parsing, the offline stand-in's rubric, any backend (batch or
async), and reward-weighted refinement rewarded by it."""

from __future__ import annotations

import asyncio

import pytest

from rerankdistill.reward_model import (
    OfflineRubricJudge,
    RubricRewardModel,
    parse_score,
    rubric_messages,
)
from rerankdistill.teacher import Completion

DOC = "Moths circle street lamps because their navigation keeps the light at a fixed angle."
Q = "why do moths fly around lamps"


def test_parse_score():
    assert parse_score("Score: 7") == 0.7 and parse_score("score = 10") == 1.0
    assert parse_score("Score: 3 ... final Score: 6.5") == 0.65  # the last one counts
    assert parse_score("eleven") is None and parse_score("Score: 11") is None


def test_offline_judge_applies_the_rubric():
    judge = OfflineRubricJudge()
    grounded = "Navigation at a fixed angle to the light explains it. Relevance Label: 2"
    assert judge.grade(rubric_messages(Q, DOC, grounded, 2)[-1]["content"]) == 10
    assert judge.grade(rubric_messages(Q, DOC, grounded, 1)[-1]["content"]) == 7  # label off by one: 2 of 5
    assert (
        judge.grade(rubric_messages(Q, DOC, "Cats. Relevance Label: 0", 2)[-1]["content"]) == 2
    )  # format only
    assert judge.grade(rubric_messages(Q, DOC, "no idea", 0)[-1]["content"]) == 0
    model = RubricRewardModel(judge)
    assert model.score([(Q, DOC, grounded, 2), (Q, DOC, "no idea", 2)]) == [1.0, 0.0]


def test_async_backends_and_unparseable_replies_are_counted():
    class Async:
        closed = False

        async def acomplete(self, messages):
            await asyncio.sleep(0)
            return Completion("Score: 4" if "Label: 2" in messages[-1]["content"] else "I refuse")

        async def aclose(self):
            Async.closed = True

    model = RubricRewardModel(Async(), concurrency=2)
    assert model.score([(Q, DOC, "x Relevance Label: 2", 2), (Q, DOC, "y", 1), (Q, DOC, "z", 0)]) == [
        0.4,
        0.0,
        0.0,
    ]
    assert model.unparseable == 2 and Async.closed
    with pytest.raises(TypeError, match="neither complete_batch nor acomplete"):
        RubricRewardModel(object()).score([(Q, DOC, "a", 0)])


def test_refine_with_the_rubric_reward_model(tmp_path, tiny_tokenizer):
    from rerankdistill.train.common import LoopConfig
    from rerankdistill.train.rwft import RefinePair, reward_weighted_finetune
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    pairs = [RefinePair(Q, DOC, 2, "Lamps pull moths off their navigation angle. Relevance Label: 2 ##")]
    judge = RubricRewardModel(OfflineRubricJudge())
    result = reward_weighted_finetune(
        tiny_causal_lm(tokenizer=tiny_tokenizer, seed=2),
        tiny_tokenizer,
        pairs,
        tmp_path / "rubric",
        k=3,
        max_new_tokens=6,
        reward_model=judge,
        loop=LoopConfig(lr=1e-3, epochs=1, batch_size=1, grad_accum=1),
        progress=False,
    )
    # the random tiny model's samples earn no rubric point; the teacher's grounded answer earns all 10
    assert result.stats["candidates"] == 4 and result.stats["kept"] == 1 and judge.unparseable == 0
