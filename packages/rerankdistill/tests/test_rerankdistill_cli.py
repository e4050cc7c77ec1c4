"""CLI: --help for every command, config file + overrides, and a tiny end-to-end generate -> sft -> refine ->
rerank -> evaluate on Cranfield with the offline teacher and a tiny model."""

from __future__ import annotations

import json

import pytest

from rerankdistill.cli import COMMANDS, GenerateOptions, main
from rerankdistill.trec import read_run
from shared_kernels.runconfig import ConfigError, load_config


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "key=value" in out and "--config" in out


def test_config_file_and_overrides(tmp_path):
    cfg = tmp_path / "g.yaml"
    cfg.write_text("collection: cranfield\ndepth: 5\nconcurrency: 2\n")
    o = load_config(GenerateOptions, cfg, ["depth=7", "temperature=0.5", "backend=offline-qrels"])
    assert (o.collection, o.depth, o.concurrency, o.temperature, o.backend) == (
        "cranfield",
        7,
        2,
        0.5,
        "offline-qrels",
    )
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        load_config(GenerateOptions, None, ["dpeth=3"])
    with pytest.raises(ConfigError, match="'depth': expected int"):
        load_config(GenerateOptions, None, ["depth=many"])
    assert (
        main(
            [
                "generate",
                "backend=nope",
                f"output={tmp_path / 'x.jsonl'}",
                "collection=cranfield",
                f"path={tmp_path}",
            ]
        )
        == 2
    )


def test_end_to_end_on_cranfield(tmp_path, shared_data, tiny_lm_dir, capsys):
    cran = [f"path={shared_data / 'cranfield'}", "collection=cranfield"]
    store, pairs = tmp_path / "teacher.jsonl", tmp_path / "pairs.jsonl"
    gen = [
        "generate",
        *cran,
        "backend=offline-qrels",
        "max_queries=4",
        "depth=5",
        f"output={store}",
        f"pairs_out={pairs}",
    ]
    assert main(gen) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["done"] == first["pairs"] == 20
    assert main(gen) == 0  # resumed: nothing regenerated
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["done"] == 0 and again["skipped_existing"] == 20

    train = [
        f"model={tiny_lm_dir}",
        f"pairs={pairs}",
        f"teacher={store}",
        "max_steps=2",
        "grad_accum=2",
        "lr=1e-3",
        "max_length=4096",
    ]
    assert main(["sft", *train, f"output_dir={tmp_path / 'sft'}"]) == 0
    sft = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sft["used"] == 20 and sft["steps"] == 2
    student = tmp_path / "sft" / "final"
    assert (student / "model.safetensors").exists()

    assert (
        main(
            [
                "refine",
                *train,
                "method=rwft",
                "k=2",
                "max_new_tokens=4",
                f"model={student}",
                f"output_dir={tmp_path / 'rwft'}",
            ]
        )
        == 0
    )
    rwft = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rwft["pairs"] == 20 and rwft["kept"] >= 20  # the teacher answers always reach the threshold

    assert (
        main(
            [
                "refine",
                *train,
                "method=grpo",
                "k=2",
                "max_steps=1",
                "max_new_tokens=4",
                f"model={student}",
                f"output_dir={tmp_path / 'grpo'}",
            ]
        )
        == 0
    )
    grpo = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert grpo["steps"] == 1 and (tmp_path / "grpo" / "final" / "model.safetensors").exists()

    run = tmp_path / "reranked.run"
    assert (
        main(
            [
                "rerank",
                *cran,
                f"model={student}",
                "max_queries=2",
                "depth=3",
                "max_new_tokens=4",
                f"judgements={tmp_path / 'j.jsonl'}",
                f"output={run}",
                f"first_stage_output={tmp_path / 'bm25.run'}",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| first stage |" in out and "| reranked |" in out
    reranked = read_run(run)
    assert set(reranked) == {"1", "2"} and all(len(v) == 3 for v in reranked.values())

    assert (
        main(
            [
                "evaluate",
                *cran,
                f"runs=bm25={tmp_path / 'bm25.run'},rr={run}",
                "measures=ndcg_cut_10",
                f"output={tmp_path / 'table.md'}",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"bm25", "rr", "significance"} and 0 <= summary["rr"]["ndcg_cut_10"] <= 1
    assert "| rr | 2 |" in (tmp_path / "table.md").read_text()


def test_evaluate_bright_without_corpus_drops_excluded(tmp_path, shared_data, capsys):
    import gzip

    d = shared_data / "bright"
    gold = ["insects_attracted_to_light/Phototaxis_0.txt", "insects_attracted_to_light/Phototaxis_3.txt"]
    run = tmp_path / "run.txt"
    run.write_text(f"0 Q0 junk 1 9.0 t\n0 Q0 {gold[0]} 2 8.0 t\n0 Q0 {gold[1]} 3 7.0 t\n")
    measures = "measures=ndcg_cut_10,recall_10"
    assert (
        main(
            [
                "evaluate",
                "collection=bright",
                f"topics={d / 'topics.bright-biology-original.jsonl.gz'}",
                f"qrels={d / 'qrels.bright-biology.txt'}",
                f"runs=r={run}",
                measures,
            ]
        )
        == 0
    )
    real = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["r"]
    assert real["recall_10"] == 0.4 and 0 < real["ndcg_cut_10"] < 1  # query 0 has 5 relevant documents
    scores = {}
    for excluded in (["N/A"], ["junk"]):
        topics = tmp_path / f"topics-{excluded[0].replace('/', '')}.jsonl.gz"
        with gzip.open(topics, "wt") as f:
            f.write(
                json.dumps(
                    {"id": "0", "query": "insects and light", "gold_ids": gold, "excluded_ids": excluded}
                )
            )
        assert main(["evaluate", "collection=bright", f"topics={topics}", f"runs=r={run}", measures]) == 0
        scores[excluded[0]] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["r"]
    assert scores["junk"]["ndcg_cut_10"] == 1.0 > scores["N/A"]["ndcg_cut_10"]  # BRIGHT drops excluded ids


@pytest.mark.slow
def test_sft_runs_under_accelerate_launch(tmp_path, shared_data, tiny_lm_dir):
    import os
    import subprocess
    import sys

    store, pairs = tmp_path / "teacher.jsonl", tmp_path / "pairs.jsonl"
    assert (
        main(
            [
                "generate",
                "collection=cranfield",
                f"path={shared_data / 'cranfield'}",
                "backend=offline-qrels",
                "max_queries=2",
                "depth=3",
                f"output={store}",
                f"pairs_out={pairs}",
            ]
        )
        == 0
    )
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "rerankdistill.cli",
        "sft",
        f"model={tiny_lm_dir}",
        f"pairs={pairs}",
        f"teacher={store}",
        f"output_dir={tmp_path / 'out'}",
        "grad_accum=1",
        "batch_size=2",
        "save_every=1",
        "max_length=4096",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, "max_steps=2"], capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["used"] == 6
    assert (
        tmp_path / "out" / "checkpoints" / "step-00000001"
    ).is_dir()  # saved at step 1 (resume: test_train)
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_evaluate_compares_two_runs_with_paired_tests(tmp_path, capsys):
    """Paired tests over every judged query: a query missing from a run scores 0 on both sides' pairing."""
    from rerankdistill.trec import write_qrels, write_run
    from shared_kernels.significance import compare_runs

    qrels = {str(q): {f"d{q}": 1, "x": 0} for q in range(6)}
    good = {str(q): {f"d{q}": 2.0, "x": 1.0} for q in range(6)}
    bad = {str(q): {"x": 2.0, f"d{q}": 1.0} for q in range(5)}  # query 5 missing: scored 0 in the tests
    write_qrels(qrels, tmp_path / "qrels.txt")
    write_run(good, tmp_path / "good.run")
    write_run(bad, tmp_path / "bad.run")
    args = [
        "evaluate",
        f"qrels={tmp_path / 'qrels.txt'}",
        f"runs=bad={tmp_path / 'bad.run'},good={tmp_path / 'good.run'}",
        "measures=recip_rank,judged_2",
        "n_resamples=200",
        f"output={tmp_path / 't.md'}",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rr = next(r for r in summary["significance"] if r["measure"] == "recip_rank")
    assert rr["run"] == "good" and rr["baseline"] == "bad" and rr["queries"] == 6
    assert rr == {
        "run": "good",
        "baseline": "bad",
        "measure": "recip_rank",
        **compare_runs([1.0] * 6, [0.5] * 5 + [0.0], n_resamples=200),
    }
    assert rr["p_randomization"] == pytest.approx(2 / 64)  # exact: 2^6 <= 200
    assert "randomization p" in (tmp_path / "t.md").read_text()
    assert main([*args, "baseline=nope"]) == 2
    assert "baseline='nope' is not one of the runs" in capsys.readouterr().err
