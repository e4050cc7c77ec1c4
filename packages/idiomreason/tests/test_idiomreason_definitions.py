"""The definition analysis (issue 19, item 2): generated definitions scored against reference glosses, an LLM
judge through a backend, the larger model's stored definitions in a smaller model's prompt, table and plot."""

from __future__ import annotations

import json
import re

import pytest

from idiomreason import SweepConfig, run_sweep
from idiomreason.backends.base import Generation
from idiomreason.definition_analysis import (
    definition_rows,
    judge_definitions,
    judgement_store,
    score_definitions,
    stored_definitions,
    token_f1,
    write_definition_report,
)
from idiomreason.definitions import load_definitions

GLOSSES = ("expression,definition\nkick the bucket,to die\nspill the beans,to reveal a secret by mistake\n"
           "rain cats and dogs,to rain very heavily\n")  # fmt: skip
STORED = [
    ("big-7B", "kick the bucket", "To die."), ("big-7B", "spill the beans", "To reveal a secret."),
    ("big-7B", "rain cats and dogs", "To rain very heavily."),
    ("small-1B", "kick the bucket", "To kick a bucket with the foot."), ("small-1B", "spill the beans", None),
    ("small-1B", "rain cats and dogs", "Heavy rain."),
]  # fmt: skip


@pytest.mark.parametrize("candidate, reference, expected", [
    ("To die.", "to die", 1.0), ("Heavy rain.", "to rain very heavily", 0.4),
    ("To reveal a secret.", "to reveal a secret by mistake", 2 * (1 * 2 / 3) / (1 + 2 / 3)),
    ("", "to die", 0.0), ("Revelar um segredo", "revelar o segredo", 1.0),
])  # fmt: skip
def test_token_f1(candidate, reference, expected):
    assert token_f1(candidate, reference) == pytest.approx(expected)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "definitions.jsonl").write_text(
        "".join(
            json.dumps({"model": m, "template": "define.v1", "expression": e, "definition": d}) + "\n"
            for m, e, d in STORED
        )
    )
    (tmp_path / "glosses.csv").write_text(GLOSSES)
    return run


class Judge:
    """Says yes when the candidate shares its first content word with the reference."""

    def generate(self, prompts, max_new_tokens):
        for i, p in enumerate(prompts):
            text = p.messages[-1]["content"]
            reference = text.split(": ", 1)[1].split("\n")[0].split()
            candidate = text.split("Candidate definition: ")[1].split("\n")[0].lower()
            yield (
                i,
                Generation("<think>comparing</think> yes" if reference[1] in candidate else "No.", 3, "stop"),
            )

    def close(self):
        pass


def test_scoring_judging_table_and_plot(run_dir):
    glosses = load_definitions(run_dir.parent / "glosses.csv")
    items = score_definitions(stored_definitions(run_dir / "definitions.jsonl"), glosses)
    assert len(items) == 6 and [it["token_f1"] for it in items if it["model"] == "small-1B"][1] == 0.0
    with judgement_store(run_dir / "judgements.jsonl") as store:
        judged = judge_definitions(items, Judge(), store, judge="judge")
        again = judge_definitions(items, _Fails(), store, judge="judge")  # all stored: the judge is not asked
    assert [it["judge_yes"] for it in judged] == [it["judge_yes"] for it in again]
    verdicts = {(it["model"], it["expression"]): it["judge_yes"] for it in judged}
    assert (
        verdicts[("big-7B", "kick the bucket")] is True and verdicts[("small-1B", "spill the beans")] is None
    )
    rows = definition_rows(judged, {"big-7B": 7.0, "small-1B": 1.0}, n_resamples=50)
    assert [r["model"] for r in rows] == ["small-1B", "big-7B"]  # ordered by size
    small, big = rows
    assert big["token_f1"] > small["token_f1"] and small["n_no_definition"] == 1
    assert big["token_f1_lo"] <= big["token_f1"] <= big["token_f1_hi"] and big["judge_accepts"] == 1.0
    md, png = write_definition_report(rows, run_dir)
    assert "| big-7B | 7 | 3 | 0 |" in md.read_text() and png.read_bytes()[:4] == b"\x89PNG"


class _Fails:
    def generate(self, prompts, max_new_tokens):
        assert not prompts
        return iter(())


class Recorder:
    def __init__(self, log):
        self.log = log

    def generate(self, prompts, max_new_tokens):
        for i, p in enumerate(prompts):
            self.log.append(p.messages[-1]["content"])
            is_define = "dictionary-style definition" in p.messages[-1]["content"]
            yield i, Generation("To die." if is_define else "Answer: idiomatic", 2, "stop")

    def close(self):
        pass


def test_larger_model_definitions_in_a_smaller_model_prompt_and_sweep_glosses(run_dir, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text(
        "id,target,expression,label,language\n1,He kicked the bucket.,kick the bucket,idiomatic,en\n"
        "2,They spilled the beans.,spill the beans,idiomatic,en\n"
    )
    model = {"name": "small-1B", "backend": "http", "options": {"base_url": "http://x/v1"}}
    base = {
        "models": [model],
        "datasets": [{"name": "generic", "path": str(data)}],
        "conditions": ["cot_definition"],
        "n_resamples": 10,
        "progress": False,
    }
    log = []
    config = SweepConfig.from_dict(
        {
            **base,
            "out_dir": str(tmp_path / "borrowed"),
            "definitions": str(run_dir / "definitions.jsonl"),
            "definitions_of": "big-7B",
        }
    )
    run_sweep(config, backend_factory=lambda spec: Recorder(log))
    assert len(log) == 2 and "To die." in log[0] and "To reveal a secret." in log[1]  # the 7B model's words
    with pytest.raises(ValueError, match="no definitions by model 'huge-70B'"):
        run_sweep(
            SweepConfig.from_dict(
                {
                    **base,
                    "out_dir": str(tmp_path / "x"),
                    "definitions_of": "huge-70B",
                    "definitions": str(run_dir / "definitions.jsonl"),
                }
            )
        )
    # a run that generates its own definitions scores them against the glosses
    result_dir = tmp_path / "own"
    run_sweep(
        SweepConfig.from_dict({**base, "out_dir": str(result_dir), "glosses": str(tmp_path / "glosses.csv")}),
        backend_factory=lambda spec: Recorder([]),
    )
    table = (result_dir / "definition_quality.md").read_text()
    assert "| small-1B | 1 | 2 | 0 |" in table  # "To die." scored against both glosses
    assert (result_dir / "definition_quality_vs_size.png").is_file()
    # the same run with a judge: one of the models judges each definition against its gloss
    judged_dir = tmp_path / "judged"
    judge_log = []
    run_sweep(
        SweepConfig.from_dict(
            {
                **base,
                "out_dir": str(judged_dir),
                "glosses": str(tmp_path / "glosses.csv"),
                "definition_judge": "small-1B",
            }
        ),
        backend_factory=lambda spec: _JudgeAndAnswer(judge_log),
    )
    assert len(judge_log) == 2  # one judgement per definition with a gloss
    table = (judged_dir / "definition_quality.md").read_text()
    assert "| small-1B | 1 | 2 | 0 | 0.500 [" in table and "| 2 | 0.500 |" in table
    with pytest.raises(ValueError, match="definition_judge 'nobody' needs glosses"):
        SweepConfig.from_dict({**base, "definition_judge": "nobody"})


class _JudgeAndAnswer(Recorder):
    """Defines everything as "To die.", answers idiomatic, judges yes only for 'kick the bucket'."""

    def generate(self, prompts, max_new_tokens):
        for i, p in enumerate(prompts):
            text = p.messages[-1]["content"]
            if text.startswith("Reference definition"):
                self.log.append(text)
                yield i, Generation("yes" if "kick the bucket" in text else "no", 1, "stop")
            else:
                yield from ((i, g) for _, g in Recorder([]).generate([p], max_new_tokens))


def test_definitions_cli_scores_stored_definitions(run_dir, tmp_path, capsys):
    """`idiomreason definitions`: the analysis from a stored definitions.jsonl and a glosses file alone."""
    from idiomreason.cli import main

    glosses = str(tmp_path / "glosses.csv")
    assert main(["definitions", str(run_dir / "definitions.jsonl"), glosses, "--n-resamples", "50"]) == 0
    out = capsys.readouterr().out
    md = (run_dir / "definition_quality.md").read_text()
    assert "| big-7B | 7 | 3 | 0 |" in md and "| small-1B | 1 | 3 | 1 |" in md and md in out
    # the same numbers as the library's scoring of the same files
    items = score_definitions(stored_definitions(run_dir / "definitions.jsonl"), load_definitions(glosses))
    big = definition_rows(items, {"big-7B": 7.0, "small-1B": 1.0}, n_resamples=50)[1]
    assert (
        f"| big-7B | 7 | 3 | 0 | {big['token_f1']:.3f} [{big['token_f1_lo']:.3f}, {big['token_f1_hi']:.3f}]"
        in md
    )
    assert (run_dir / "definition_quality_vs_size.png").read_bytes()[:4] == b"\x89PNG"
    elsewhere = tmp_path / "report"
    assert (
        main(
            ["definitions", str(run_dir / "definitions.jsonl"), glosses, "--out", str(elsewhere), "--no-plot"]
        )
        == 0
    )
    assert (elsewhere / "definition_quality.md").read_text() == md and not list(elsewhere.glob("*.png"))


@pytest.mark.parametrize("case, pattern", [
    ("missing-definitions", r"definitions file '.*nope.jsonl' not found"),
    ("missing-glosses", r"glosses file '.*nope.csv' not found"),
    ("folder-as-definitions", r"definitions file '.*run' is a folder"),
    ("definitions-not-json", r"definitions.jsonl:2: not a JSON record"),
    ("definitions-not-objects", r"definitions.jsonl:1: not a JSON record \(a list"),
    ("definitions-without-model", r"is not a stored definition \(needs text fields 'model'"),
    ("glosses-bad-suffix", r"definitions file must be .json, .jsonl, .csv or .tsv, got 'glosses.txt'"),
    ("no-gloss-matches", r"no definition in .* has a gloss in .*: nothing to score"),
    ("out-is-a-file", r"--out '.*glosses.csv' is a file"),
    ("zero-resamples", r"--n-resamples must be >= 1"),
])  # fmt: skip
def test_definitions_cli_bad_inputs_exit_2_with_one_line(run_dir, tmp_path, capsys, case, pattern):
    from idiomreason.cli import main

    defs, glosses = run_dir / "definitions.jsonl", tmp_path / "glosses.csv"
    extra = []
    if case == "missing-definitions":
        defs = tmp_path / "nope.jsonl"
    elif case == "missing-glosses":
        glosses = tmp_path / "nope.csv"
    elif case == "folder-as-definitions":
        defs = run_dir
    elif case == "definitions-not-json":
        defs.write_text(defs.read_text().splitlines()[0] + "\n{not json\n")
    elif case == "definitions-not-objects":
        defs.write_text('["big-7B", "kick the bucket"]\n')
    elif case == "definitions-without-model":
        defs.write_text('{"expression": "kick the bucket", "definition": "to die"}\n')
    elif case == "glosses-bad-suffix":
        glosses = glosses.with_name("glosses.txt")
        glosses.write_text(GLOSSES)
    elif case == "no-gloss-matches":
        glosses.write_text("expression,definition\nbreak the ice,to ease tension\n")
    elif case == "out-is-a-file":
        extra = ["--out", str(glosses)]
    elif case == "zero-resamples":
        extra = ["--n-resamples", "0"]
    assert main(["definitions", str(defs), str(glosses), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("idiomreason definitions: error: ") and re.search(pattern, err[0])
    ), err
