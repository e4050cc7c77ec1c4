"""SemEval-2022 Task 2A: the official submission file (written by a sweep, read back, scored as the task
does), its zero-shot / one-shot settings as conditions and per-setting rows."""

from __future__ import annotations

import csv
import random

import pytest

from idiomreason import SweepConfig, load_dataset, macro_f1, run_sweep
from idiomreason.backends.base import Generation
from idiomreason.examples import Example
from idiomreason.prompts import TemplateLibrary
from idiomreason.semeval import read_submission, score_submission, submission_text


def _examples(n, seed):
    rng = random.Random(seed)
    return [
        Example(
            id=str(1000 + i),
            language=rng.choice(["en", "pt"]),
            expression=f"mwe {i % 5}",
            target=f"sentence {i}",
            label=rng.choice(["idiomatic", "literal"]),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_submission_round_trip_and_scores(tmp_path, seed):
    gold = _examples(37, seed)
    rng = random.Random(seed + 10)
    zero = {ex.id: rng.choice(["idiomatic", "literal", None]) for ex in gold}
    one = {ex.id: rng.choice(["idiomatic", "literal"]) for ex in gold}
    path = tmp_path / "sub.csv"
    path.write_text(submission_text(gold, {"zero_shot": zero, "one_shot": one}))
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["ID", "Language", "Setting", "Label"] and len(rows) == 1 + 2 * len(gold)
    assert [r[2] for r in rows[1:]] == ["zero_shot"] * len(gold) + ["one_shot"] * len(gold)
    assert {r[1] for r in rows[1:]} <= {"EN", "PT"} and {r[3] for r in rows[1:]} <= {"0", "1"}
    back = read_submission(path)
    assert [(k, lab) for k, _, lab in back["one_shot"]] == [(ex.id, one[ex.id]) for ex in gold]
    assert [lab for _, _, lab in back["zero_shot"]] == [zero[ex.id] or "literal" for ex in gold]
    scores = score_submission(path, gold)
    assert scores[("one_shot", "all")] == pytest.approx(
        macro_f1([ex.label for ex in gold], [one[ex.id] for ex in gold])
    )
    en = [ex for ex in gold if ex.language == "en"]
    assert scores[("one_shot", "EN")] == pytest.approx(
        macro_f1([ex.label for ex in en], [one[ex.id] for ex in en])
    )
    # a setting not run is submitted with empty labels and scores None, as the task's scorer does
    path.write_text(submission_text(gold, {"zero_shot": zero}))
    assert score_submission(path, gold)[("one_shot", "all")] is None


def test_submission_format_errors_name_the_line(tmp_path):
    gold = _examples(3, 0)
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Language,Setting,Label\n1000,EN,zero_shot,2\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: Label must be 0, 1 or empty"):
        read_submission(bad)
    bad.write_text("ID,Lang,Setting,Label\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: header must be ID,Language,Setting,Label"):
        read_submission(bad)
    shuffled = submission_text(gold, {"zero_shot": {ex.id: "literal" for ex in gold}}).splitlines()
    shuffled[1], shuffled[2] = shuffled[2], shuffled[1]
    bad.write_text("\n".join(shuffled) + "\n")
    with pytest.raises(ValueError, match="gold order"):
        score_submission(bad, gold)
    with pytest.raises(ValueError, match="no prediction for ID"):
        submission_text(gold, {"one_shot": {}})


def test_one_shot_setting_uses_the_query_expression_examples(shared_data):
    folder = shared_data / "semeval2022_task2a"
    dev = load_dataset("semeval2022-2a", folder, "dev")
    pool = load_dataset("semeval2022-2a", folder, "train_one_shot")
    library = TemplateLibrary()
    one, zero = library.condition("direct:oneshot"), library.condition("direct:2shot")
    assert one.key == "direct.v1.oneshot" and one.setting == "one_shot" and zero.setting == "zero_shot"
    covered = 0
    for ex in dev:
        shots = one.shots_for(ex, pool)
        assert all(s.expression.lower() == ex.expression.lower() and s.id != ex.id for s in shots)
        covered += bool(shots)
        assert all(s.expression.lower() != ex.expression.lower() for s in zero.shots_for(ex, pool))
    assert (
        covered / len(dev) > 0.9
    )  # the one-shot training file has examples of (nearly) every dev expression


class _Echo:
    def __init__(self):
        self.n = 0

    def generate(self, prompts, max_new_tokens):
        for i, p in enumerate(prompts):
            self.n += 1
            yield i, Generation("Answer: literal" if len(p.messages) > 1 else "Answer: idiomatic", 2, "stop")

    def close(self):
        pass


def test_sweep_writes_per_setting_rows_and_the_submission(tmp_path):
    folder = tmp_path / "semeval"
    folder.mkdir()
    (folder / "dev.csv").write_text(
        "ID,Language,MWE,Previous,Target,Next\n1,EN,big fish,,He is a big fish.,\n"
        "2,PT,pão duro,,Ele é pão duro.,\n3,EN,big fish,,A big fish swam.,\n"
    )
    (folder / "dev_gold.csv").write_text("ID,DataID,Language,Label\n1,d1,EN,0\n2,d2,PT,0\n3,d3,EN,1\n")
    (folder / "train_one_shot.csv").write_text(
        "DataID,Language,MWE,Setting,Previous,Target,Next,Label\n"
        "t1,EN,big fish,one_shot,,The big fish boss.,,0\n"
        "t2,PT,pão duro,one_shot,,Pão duro de ontem.,,1\n"
    )
    config = SweepConfig.from_dict({
        "models": [{"name": "m", "backend": "http", "options": {"base_url": "http://x/v1"}}],
        "datasets": [
            {"name": "semeval2022-2a", "path": str(folder), "split": "dev", "shots_split": "train_one_shot"}
        ],
        "conditions": ["direct", "direct:oneshot"], "out_dir": str(tmp_path / "run"), "n_resamples": 10,
        "progress": False})  # fmt: skip
    backend = _Echo()
    result = run_sweep(config, backend_factory=lambda spec: backend)
    settings = {(r["condition"], r["setting"]) for r in result.rows if r["language"] == "all"}
    assert settings == {("direct", "zero_shot"), ("direct:oneshot", "one_shot")}
    sub = tmp_path / "run" / "semeval" / "semeval2022-2a_dev__m__direct.csv"
    back = read_submission(sub)
    assert [lab for _, _, lab in back["zero_shot"]] == ["idiomatic"] * 3  # no shots in the prompt
    assert [lab for _, _, lab in back["one_shot"]] == ["literal"] * 3  # every dev expression had its shot
    gold = load_dataset("semeval2022-2a", folder, "dev")
    assert score_submission(sub, gold)[("zero_shot", "all")] == pytest.approx(
        macro_f1([ex.label for ex in gold], ["idiomatic"] * 3)
    )
