"""rerank-qlora-seeds: two seeds run into their own folders (train.seed = s, all else the same); seeds.json
holds exactly each seed's results.json numbers and tests, their mean +- std and the seed-averaged test over
the seeds' TREC files; a rerun reuses finished seeds (no stage runs, results.json untouched) and a changed
setting or an unfinished run is rerun; the verdict on constructed results; bad input is one line, exit 2."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import statistics

import pytest
import yaml
from rerank_qlora_tiny import TINY as SHARED_TINY

from rerank_qlora.config import RerankQLoRAConfig
from rerank_qlora.recipe import CODE, STUDENT
from rerank_qlora.seed_report import summarize, verdict
from rerank_qlora.seeds import main, parse_seeds, seed_config, why_rerun
from rerankdistill.run_report import FUSED_NAME
from shared_kernels.errors import UserError
from shared_kernels.runconfig import load_config

TINY = [
    *SHARED_TINY,
    "model.tiny_pretrain_steps=2",
    "task.max_train_queries=6",
    "task.max_eval_queries=12",
    "task.max_validation_queries=3",
    "train.steps=2",
    "refine.method=none",
]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([f"run_dir={root}", "--no-progress", *TINY, "--seeds", "0", "3"]) == 0
    return root, out.getvalue()


def test_each_seed_runs_in_its_folder_and_seeds_json_holds_its_numbers(two_seeds):
    root, out = two_seeds
    assert out.count("stage 1/9") == 2 and "seed 3 (2 of 2): running in" in out
    summary = json.loads((root / "seeds.json").read_text())
    assert summary["seeds"] == [0, 3] and summary["command"].startswith("rerank-qlora-seeds run_dir=")
    results = {}
    for seed in (0, 3):
        config = yaml.safe_load((root / f"seed-{seed}" / "config.yaml").read_text())
        assert config["train"]["seed"] == seed and config["train"]["steps"] == 2
        results[seed] = json.loads((root / f"seed-{seed}" / "results.json").read_text())
        per = summary["per_seed"][str(seed)]
        assert per["scores"] == results[seed]["scores"]
        assert per["fusion_weight"] == results[seed]["fusion"]["weight"]
        own = [
            r
            for r in results[seed]["significance"]
            if r["baseline"] == CODE and r["measure"] == "ndcg_cut_10"
        ]
        assert {r["run"] for r in own} == {STUDENT, FUSED_NAME} and all(
            per["gains"][r["run"]] == r for r in own
        )
    for run in (STUDENT, FUSED_NAME, CODE):
        values = [results[s]["scores"][run]["ndcg_cut_10"] for s in (0, 3)]
        got = summary["mean_std"][run]["ndcg_cut_10"]
        assert got["mean"] == pytest.approx(statistics.fmean(values))
        assert got["std"] == pytest.approx(statistics.stdev(values))
    assert set(summary["mean_std"][CODE]) == {"ndcg_cut_10", "recip_rank_10", "judged_10", "map", "recall_5"}
    averaged = summary["seed_averaged"]
    assert "over 12 queries" in averaged["test"] and "averaged over 2 seeds" in averaged["test"]
    for run in (
        STUDENT,
        FUSED_NAME,
    ):  # the mean of the seed-averaged differences = the mean of the seeds' own
        mean_gain = statistics.fmean(
            results[s]["scores"][run]["ndcg_cut_10"] for s in (0, 3)
        ) - statistics.fmean(results[s]["scores"][CODE]["ndcg_cut_10"] for s in (0, 3))
        assert averaged["rows"][run]["mean_diff"] == pytest.approx(mean_gain, abs=1e-9)
    assert summary["verdict"]["met"] is False  # two seeds never establish the goal
    report = (root / "seeds.md").read_text()
    assert summary["verdict"]["line"] in report and "| seed 0 | seed 3 | mean ± std |" in report
    assert summary["verdict"]["line"] in out


def test_rerun_reuses_finished_seeds(two_seeds, capsys):
    root, _ = two_seeds
    stamps = {s: (root / f"seed-{s}" / "results.json").stat().st_mtime_ns for s in (0, 3)}
    before = json.loads((root / "seeds.json").read_text())
    assert main([f"run_dir={root}", "--no-progress", *TINY, "--seeds", "0,3"]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing the finished run") == 2 and "stage 1/9" not in out
    assert {s: (root / f"seed-{s}" / "results.json").stat().st_mtime_ns for s in (0, 3)} == stamps
    after = json.loads((root / "seeds.json").read_text())
    assert after["per_seed"] == before["per_seed"] and after["seed_averaged"] == before["seed_averaged"]


def test_changed_or_unfinished_seed_is_rerun(two_seeds):
    root, _ = two_seeds
    cfg = load_config(RerankQLoRAConfig, overrides=[f"run_dir={root}", *TINY])
    one = seed_config(cfg, 0)
    assert why_rerun(one) is None
    assert why_rerun(dataclasses.replace(one, trackers=["auto"])) is None  # changes no result
    steps = dataclasses.replace(one, train=dataclasses.replace(one.train, steps=3))
    assert why_rerun(steps) == "settings changed: train.steps 2 -> 3"
    assert why_rerun(dataclasses.replace(one, resume=False)) == "resume=false"
    assert why_rerun(seed_config(cfg, 7)) == "no finished run there"
    recorded = root / "seed-0" / "config.yaml"
    stamp = os.stat(recorded)
    try:  # a later run started (it rewrote config.yaml) and never wrote its results.json
        os.utime(recorded, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9 * 3600))
        assert why_rerun(one) == "its last run did not finish"
    finally:
        os.utime(recorded, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def test_trec_files_of_another_run_are_refused(two_seeds):
    root, _ = two_seeds
    results = {s: json.loads((root / f"seed-{s}" / "results.json").read_text()) for s in (0, 3)}
    dirs = {0: root / "seed-0", 3: root / "seed-3"}
    row = next(r for r in results[3]["significance"] if r["run"] == STUDENT and r["baseline"] == CODE)
    row["mean_diff"] += 0.01
    with pytest.raises(UserError, match="seed 3: the TREC files give"):
        summarize(results, dirs, "cmd")


def _row(diff, p):
    return {"mean_diff": diff, "p_randomization": p}


def test_verdict_needs_the_same_run_to_win_every_one_of_three_seeds():
    win = {FUSED_NAME: _row(0.03, 0.001), STUDENT: _row(-0.2, 0.0001)}
    assert verdict({0: win, 1: win, 2: win})["met"] is True
    one_weak = {0: win, 1: win, 2: {FUSED_NAME: _row(0.01, 0.2), STUDENT: _row(-0.1, 0.01)}}
    v = verdict(one_weak)
    assert v["met"] is False and v["passing"][FUSED_NAME] == [0, 1] and v["passing"][STUDENT] == []
    assert v["line"].startswith("GOAL NOT MET") and f"{FUSED_NAME} in 2 of 3" in v["line"]
    mixed = {0: win, 1: win, 2: {FUSED_NAME: _row(0.01, 0.2), STUDENT: _row(0.05, 0.001)}}
    assert verdict(mixed)["met"] is False  # fused in two seeds, reranked in the third: not one run
    worse = {s: {FUSED_NAME: _row(-0.05, 0.001)} for s in range(3)}  # significant, but a loss
    assert verdict(worse)["met"] is False
    two = verdict({0: win, 1: win})
    assert two["met"] is False and two["line"].startswith("GOAL NOT ESTABLISHED")
    assert verdict({s: win for s in range(4)})["met"] is True


def test_parse_seeds():
    assert parse_seeds(None) == [0, 1, 2]
    assert parse_seeds(["4", "1,2"]) == [4, 1, 2]
    for tokens, match in (
        ([], "no seeds given"),
        ([","], "no seeds given"),
        (["1", "1"], "seed 1 is given twice"),
        (["-1"], "'-1' is not a seed"),
        (["0", "train.steps=2"], "put key=value overrides before --seeds"),
    ):
        with pytest.raises(UserError, match=match):
            parse_seeds(tokens)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--seeds"], "no seeds given"),
        (["--seeds", "0", "0"], "seed 0 is given twice"),
        (["--seeds", "0", "train.steps=3"], "put key=value overrides before --seeds"),
        (["train.stepz=3"], "unknown config key 'train.stepz'"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, match):
    assert main([f"run_dir={tmp_path / 'run'}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rerank-qlora-seeds: error: ") and match in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert main([f"run_dir={tmp_path / 'run'}", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and err.count("\n") == 1
    assert (tmp_path / "run").read_text() == "not a folder"
    (tmp_path / "run").unlink()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "seed-1").write_text("x")
    assert main([f"run_dir={tmp_path / 'run'}", "--seeds", "0", "1"]) == 2
    assert "seed-1' is a file, not a folder" in capsys.readouterr().err
