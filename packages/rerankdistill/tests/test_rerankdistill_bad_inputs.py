"""rerankdistill bad inputs, loader by loader and through the CLI: every case a one-line error naming the file
(and line) -- exit code 2 from the CLI -- never a bare UnicodeDecodeError/EOFError, a silently dropped or
overwritten topic, a 0.0 over 0 queries, a leaked API key or duplicated teacher records."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rerankdistill.backends.openai_http import OpenAIChatBackend, TeacherRequestError
from rerankdistill.cli import main
from rerankdistill.datasets import (
    load_beir,
    load_bright,
    load_cranfield,
    load_jsonl,
    read_beir_qrels,
    read_jsonl,
)
from rerankdistill.metrics import evaluate
from rerankdistill.teacher import Pair, QrelsTeacher, TeacherStore, generate_teacher_outputs
from rerankdistill.trec import read_qrels, read_run, read_topics
from shared_kernels.errors import UserError
from shared_kernels.testing.auth_echo_server import auth_echo_server

GZ = gzip.compress("".join(f'{{"id": "d{i}", "text": "alpha"}}\n' for i in range(300)).encode())
SGML_OK = "<top>\n<num> Number: 401\n<title> foreign minorities\n</top>\n"

# (loader, file name, bytes, message pattern after the file name)
LOADER_CASES = [
    (read_qrels, "empty.qrels", b"", r": holds no judgements"),
    (read_qrels, "blank.qrels", b"\n\n", r": holds no judgements"),
    (read_qrels, "latin1.qrels", "1 0 d1 1\n2 0 caf\xe9 1\n".encode("latin-1"), r":2: is not UTF-8 text"),
    (read_qrels, "utf16.qrels", "1 0 d1 1\n".encode("utf-16"), r":1: is UTF-16 text"),
    (read_qrels, "binary.qrels", b"1 0 d1 1\n\x00\x00\x00\x00", r":2: holds a NUL byte"),
    (read_qrels, "three.qrels", b"1 0 d1\n", r":1: expected 4 fields"),
    (
        read_qrels,
        "cut.qrels.gz",
        gzip.compress("".join(f"1 0 d{i} 1\n" for i in range(400)).encode())[:60],
        r": truncated or corrupt gzip",
    ),
    (read_run, "latin1.run", "1 Q0 caf\xe9 1 2.0 t\n".encode("latin-1"), r":1: is not UTF-8 text"),
    (read_run, "nan.run", b"1 Q0 d1 1 nan t\n", r":1: score 'nan' is not finite"),
    (
        read_topics,
        "cut.topics",
        (SGML_OK + "<top>\n<num> Number: 402\n<title> cut off").encode(),
        r":5: <top> not closed by </top>: the file is truncated",
    ),
    (
        read_topics,
        "dup.topics",
        (SGML_OK + SGML_OK.replace("foreign", "other")).encode(),
        r":5: duplicate topic number '401'",
    ),
    (
        read_topics,
        "unclosed-middle.topics",
        ("<top>\n<num> 1\n<title> a\n" + SGML_OK).encode(),
        r":1: <top> not closed by </top> before the next <top>",
    ),
    (read_topics, "stray.topics", (SGML_OK + "</top>\n").encode(), r":5: </top> without an opening <top>"),
    (read_topics, "empty.topics", b"\n", r": holds no topics"),
    (read_topics, "dup.tsv", b"1\tfirst\n1\tsecond\n", r":2: duplicate query id '1'"),
    (read_topics, "utf16.tsv", "1\tq\n".encode("utf-16"), r":1: is UTF-16 text"),
    (read_topics, "latin1.tsv", "1\tcaf\xe9\n".encode("latin-1"), r":1: is not UTF-8 text"),
    (read_jsonl, "cut.jsonl.gz", GZ[: len(GZ) // 2], r": truncated or corrupt gzip file"),
    (read_jsonl, "plain.jsonl.gz", b'{"id": 1}\n', r": truncated or corrupt gzip file"),
    (read_jsonl, "bad.jsonl", b'{"id": 1}\n{"id": \n', r":2: invalid JSON"),
    (read_jsonl, "list.jsonl", b"[1, 2]\n", r":1: expected a JSON object, got list"),
    (read_jsonl, "latin1.jsonl", '{"id": "caf\xe9"}\n'.encode("latin-1"), r":1: is not UTF-8 text"),
    (lambda p: load_jsonl(p), "noid.jsonl", b'{"text": "x"}\n', r": record 1 lacks 'id' or 'text'"),
    (read_beir_qrels, "utf16.tsv", "query-id\tcorpus-id\tscore\n".encode("utf-16"), r":1: is UTF-16 text"),
    (read_beir_qrels, "two.tsv", b"query-id\tcorpus-id\tscore\nq1\td1\n", r":2: expected 3 tab-separated"),
    (
        lambda p: load_bright(p),
        "topics.jsonl.gz",
        gzip.compress(b'{"id": "1", "query": "q"}\n' * 200)[:50],
        r": truncated or corrupt gzip file",
    ),
]


@pytest.mark.parametrize("loader, name, data, match", LOADER_CASES, ids=[c[1] for c in LOADER_CASES])
def test_loader_errors_name_the_file(tmp_path, loader, name, data, match):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=str(path).replace(".", r"\.") + match) as err:
        loader(path)
    assert "\n" not in str(err.value)


def test_collection_folders_name_the_bad_file(tmp_path):
    (tmp_path / "cran.all.1400").write_text(".I 1\n.W\ntext\n")
    (tmp_path / "cran.qry").write_bytes(".I 001\n.W\ncaf\xe9\n".encode("latin-1"))
    (tmp_path / "cranqrel").write_text("1 1 2\n")
    with pytest.raises(UserError, match=r"cran.qry:3: is not UTF-8 text"):
        load_cranfield(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no qrels for split 'dev'"):
        load_beir(tmp_path, "dev")


def test_good_topics_still_read(tmp_path):
    path = tmp_path / "ok.topics"
    path.write_text(SGML_OK + SGML_OK.replace("401", "402").replace("foreign", "other"))
    assert read_topics(path) == {"401": "foreign minorities", "402": "other minorities"}


def test_metrics_refuse_to_score_nothing():
    run = {"q9": {"d1": 1.0}}
    with pytest.raises(ValueError, match="the qrels hold no judged query"):
        evaluate(run, {})
    with pytest.raises(ValueError, match=r"none of the run's 1 queries is judged in the qrels \(1 judged"):
        evaluate(run, {"q1": {"d1": 1}})
    assert float(evaluate(run, {"q1": {"d1": 1}}, ("P_1",), complete=True)["P_1"]) == 0.0  # -c: scored as 0


def test_teacher_store_corrupt_line_and_lock(tmp_path):
    path = tmp_path / "teacher.jsonl"
    row = {"qid": "1", "docid": "d", "teacher": "t", "text": "x", "label": 1}
    path.write_text(json.dumps(row) + "\n{broken\n" + json.dumps({**row, "docid": "e"}) + "\n")
    with pytest.raises(UserError, match=r"teacher.jsonl:2: corrupt teacher record"):
        TeacherStore(path)
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=r"teacher.jsonl:2: duplicate record"):
        TeacherStore(path)
    path.write_text(json.dumps(row) + "\n")
    with TeacherStore(path) as held:
        with pytest.raises(UserError, match=r"teacher.jsonl is locked by another running process"):
            TeacherStore(path)
        assert len(held) == 1
    with TeacherStore(path) as again:  # the failed opens left no lock behind
        assert len(again) == 1


# ------------------------------------------------------------------------------------------------- secrets

KEY = "sk-rerankdistill-secret-0123456789"


def test_teacher_request_error_never_carries_the_key(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RD_TEST_KEY", KEY)
    pairs = [Pair("1", "d1", "a query", "a document")]
    with (
        auth_echo_server() as base_url,
        TeacherStore(tmp_path / "t.jsonl") as store,
        caplog.at_level(logging.DEBUG),
    ):
        backend = OpenAIChatBackend(base_url, "m", api_key_env="RD_TEST_KEY", max_retries=0)
        with pytest.raises(TeacherRequestError) as err:
            generate_teacher_outputs(pairs, backend, store, progress=False)
    import traceback

    text = "".join(traceback.format_exception(err.value))
    assert "answered 401" in text and "***" in text and KEY not in text
    assert "401" in caplog.text and KEY not in caplog.text  # httpx/httpcore DEBUG logs echo response headers
    assert KEY not in repr(backend) and isinstance(err.value, UserError)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rerankdistill.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def _pairs_file(path: Path, n: int) -> Path:
    path.write_text(
        "".join(
            json.dumps(
                {"qid": str(i % 7), "docid": f"d{i}", "query": f"query {i % 7}", "document": f"document {i}"}
            )
            + "\n"
            for i in range(n)
        )
    )
    return path


def test_cli_generate_against_an_echoing_server_leaks_nothing(tmp_path):
    pairs = _pairs_file(tmp_path / "pairs.jsonl", 3)
    out = tmp_path / "teacher.jsonl"
    with auth_echo_server() as base_url:
        done = _cli(
            "generate",
            f"pairs={pairs}",
            f"output={out}",
            "backend=openai",
            f"base_url={base_url}",
            "model=m",
            "api_key_env=RD_TEST_KEY",
            "max_retries=0",
            env={"RD_TEST_KEY": KEY},
        )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]  # (after the progress bar)
    assert last.startswith("rerankdistill generate: error: ") and "Traceback" not in done.stderr, done.stderr
    assert "answered 401" in last and "Authorization: Bearer ***" in last
    assert KEY not in done.stderr + done.stdout and KEY.encode() not in out.read_bytes()


# --------------------------------------------------------------------------------------------- CLI table


def _cli_files(tmp_path: Path) -> dict[str, Path]:
    names = (
        "qrels",
        "empty.qrels",
        "utf16.qrels",
        "run",
        "latin1.yaml",
        "pairs.jsonl.gz",
        "topics",
        "corpus.jsonl",
        "out",
    )
    f = {name.replace(".", "_"): tmp_path / name for name in names}
    f["qrels"].write_text("1 0 d1 1\n1 0 d2 0\n")
    f["empty_qrels"].write_text("")
    f["utf16_qrels"].write_bytes("1 0 d1 1\n".encode("utf-16"))
    f["run"].write_text("9 Q0 d1 1 2.0 t\n9 Q0 d2 2 1.0 t\n")  # query 9 is not judged
    f["latin1_yaml"].write_bytes("collection: trec\ncorpus: caf\xe9\n".encode("latin-1"))
    f["pairs_jsonl_gz"].write_bytes(gzip.compress(_pairs_file(tmp_path / "p.jsonl", 50).read_bytes())[:100])
    f["topics"].write_text(SGML_OK + "<top>\n<num> Number: 402\n<title> cut")
    f["corpus_jsonl"].write_text('{"id": "d1", "text": "foreign minorities"}\n')
    return f


CLI_CASES = [
    (["evaluate", "runs={run}", "qrels={empty_qrels}"], r"empty.qrels: holds no judgements"),
    (["evaluate", "runs={run}", "qrels={qrels}"], r"none of the run's 1 queries is judged"),
    (["evaluate", "runs={run}", "qrels={utf16_qrels}"], r"utf16.qrels:1: is UTF-16 text"),
    (["evaluate", "runs={out}", "qrels={qrels}"], r"out"),
    (["evaluate", "qrels={qrels}"], r"runs= is required"),
    (["evaluate", "runs={run}"], r"evaluate needs qrels= \(a TREC qrels file\) or collection="),
    (["evaluate", "runs={run}", "measures=ndcg@10", "qrels={qrels}"], r"unknown measure 'ndcg@10'"),
    (["generate", "--config", "{latin1_yaml}"], r"latin1.yaml:2: is not UTF-8 text"),
    (
        ["generate", "pairs={pairs_jsonl_gz}", "backend=offline-qrels", "output={out}"],
        r"pairs.jsonl.gz: truncated or corrupt gzip file",
    ),
    (
        [
            "generate",
            "collection=trec",
            "topics={topics}",
            "qrels={qrels}",
            "corpus={corpus_jsonl}",
            "backend=offline-qrels",
            "output={out}",
            "pairs_out={out}.pairs",
        ],
        r"topics:5: <top> not closed",
    ),
    (["generate", "collection=nope", "output={out}"], r"collection must be one of"),
    (
        ["generate", "pairs={corpus_jsonl}", "output={out}"],
        r"corpus.jsonl: record 1 needs string fields .*missing qid",
    ),
    (["generate", "depth=many"], r"'depth': expected int, got 'many'"),
    (["generate", "dpeth=3"], r"did you mean 'depth'"),
    (["generate", "concurrency=0"], r"concurrency must be a finite number >= 1, got 0"),
    (["generate", "timeout=0"], r"timeout must be a finite number > 0"),
    (["generate", "temperature=.nan"], r"temperature must be a finite number >= 0, got nan"),
    (["sft", "lr=inf"], r"lr must be a finite number > 0, got inf"),
    (["sft", "lr=-1e-4"], r"lr must be a finite number > 0"),
    (["sft", "grad_accum=0"], r"grad_accum must be a finite number >= 1"),
    (["sft", "lora_dropout=1.5"], r"lora_dropout must be in \[0, 1\)"),
    (["refine", "temperature=0"], r"temperature must be a finite number > 0"),
    (["refine", "threshold=2"], r"threshold must be in \[0, 1\]"),
    (["refine", "k=0"], r"k must be a finite number >= 1"),
    (["rerank", "depth=0"], r"depth must be a finite number >= 1"),
    (["rerank", "max_new_tokens=-5"], r"max_new_tokens must be a finite number >= 1"),
    # checked before any data is read or any table printed
    (["rerank", "model={out}"], r"model='.*out' is not a directory"),
    (["generate", "backend=transformers", "model={out}"], r"model='.*out' is not a directory"),
    (["generate", "backend=nope"], r"backend must be one of openai, transformers, vllm, offline-qrels"),
    (["sft", "target_format=nope"], r"target_format must be one of interank, release, got 'nope'"),
    (["refine", "method=nope"], r"method must be one of rwft, grpo, got 'nope'"),
    (["refine", "reward=nope"], r"reward must be one of label, rubric"),
    (["refine", "reward=rubric"], r"reward=rubric with reward_backend=openai needs reward_model="),
    (["rerank", "first_stage_queries=nope"], r"first_stage_queries must be one of original, reasoning"),
    (["rerank", "prompt_format=nope"], r"prompt_format must be one of interank, release"),
    (["evaluate", "collection=bright", "runs={run}"], r"collection=bright needs topics="),
    (["evaluate", "runs={run}", "qrels={qrels}", "measures="], r"measures= is empty"),
    (
        ["evaluate", "runs={run}", "qrels={qrels}", "n_resamples=0"],
        r"n_resamples must be a finite number >= 1",
    ),
    (
        ["evaluate", "runs=a={run},b={run}", "qrels={qrels}", "baseline=c"],
        r"baseline='c' is not one of .*: a, b",
    ),
    (["evaluate", "runs={run}", "qrels={qrels}", "baseline=c"], r"baseline='c' is not one of the runs: run"),
    (["evaluate", "runs=a={run},a={run}", "qrels={qrels}"], r"runs: two runs are named 'a'"),
    (["evaluate", "runs={run},{run}", "qrels={qrels}"], r"runs: two runs are named 'run'"),
]


@pytest.mark.parametrize("args, match", CLI_CASES, ids=[" ".join(a[:2]) for a, _ in CLI_CASES])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys, args, match):
    files = _cli_files(tmp_path)
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"rerankdistill {argv[0]}: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert out == "", out  # no table or summary before the error


def test_two_concurrent_generate_runs_never_duplicate_records(tmp_path):
    pairs = _pairs_file(tmp_path / "pairs.jsonl", 400)
    qrels = tmp_path / "qrels"
    qrels.write_text("".join(f"{i % 7} 0 d{i} {i % 3}\n" for i in range(400)))
    topics, corpus = tmp_path / "topics.tsv", tmp_path / "corpus.jsonl"
    topics.write_text("".join(f"{q}\tquery {q}\n" for q in range(7)))
    corpus.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"document {i}"}) + "\n" for i in range(400))
    )
    out = tmp_path / "teacher.jsonl"
    args = [
        sys.executable,
        "-m",
        "rerankdistill.cli",
        "generate",
        f"pairs={pairs}",
        "backend=offline-qrels",
        "collection=trec",
        f"qrels={qrels}",
        f"topics={topics}",
        f"corpus={corpus}",
        f"output={out}",
    ]
    with TeacherStore(out):  # another run holds the store: refused at once, nothing written
        held = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert held.returncode == 2 and "is locked by another running process" in held.stderr, held.stderr[-2000:]
    assert out.read_bytes() == b""
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert all(rc in (0, 2) for rc, _, _ in results) and any(rc == 0 for rc, _, _ in results), results
    for rc, _, err in results:
        if rc == 2:
            assert err.strip().endswith("is locked by another running process; wait for it or stop it"), err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    keys = [(r["qid"], r["docid"], r["teacher"]) for r in rows]
    assert len(keys) == len(set(keys)) == 400
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped_existing"] == 400


def test_qrels_teacher_and_store_still_work(tmp_path):
    with TeacherStore(tmp_path / "t.jsonl") as store:
        stats = generate_teacher_outputs(
            [Pair("1", "d1", "q", "doc")], QrelsTeacher({"1": {"d1": 2}}), store, progress=False
        )
    assert stats.done == 1


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (
            lambda t: ["generate", "collection=cranfield", f"path={t}", f"pairs_out={t / 'cran.qry'}"],
            r"pairs_out=.* would overwrite the input path=",
        ),
        (
            lambda t: [
                "generate",
                f"pairs={t / 'pairs.jsonl'}",
                f"output={t / 'pairs.jsonl'}",
                "backend=offline-qrels",
            ],
            r"output=.* would overwrite the input pairs=",
        ),
        (
            lambda t: [
                "refine",
                f"model={t / 'student' / 'final'}",
                f"pairs={t / 'pairs.jsonl'}",
                f"teacher={t / 'teacher.jsonl'}",
                f"output_dir={t / 'student'}",
            ],
            r"output_dir=.* would overwrite the input model=",
        ),
        (
            lambda t: ["evaluate", f"qrels={t / 'q.txt'}", f"runs=a={t / 'a.run'}", f"output={t / 'a.run'}"],
            r"output=.* would overwrite the input runs\[0\]=",
        ),
    ],
    ids=["pairs-out-is-collection-file", "store-is-pairs", "refine-into-student", "table-over-run"],
)
def test_outputs_never_overwrite_inputs(tmp_path, capsys, argv, pattern):
    """Every output option is checked against every input option before any work: the input is untouched."""
    for name in ("cran.qry", "pairs.jsonl", "teacher.jsonl", "q.txt", "a.run"):
        (tmp_path / name).write_text("keep me\n", encoding="utf-8")
    (tmp_path / "student" / "final").mkdir(parents=True)
    (tmp_path / "student" / "final" / "model.safetensors").write_bytes(b"weights")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_training_commands_name_a_missing_model_directory(tmp_path, capsys):
    """sft and refine read their (small) data first, then refuse a model= that is no directory, before
    transformers would raise a traceback about hub repo ids."""
    pairs = _pairs_file(tmp_path / "pairs.jsonl", 4)
    teacher = tmp_path / "teacher.jsonl"
    with TeacherStore(teacher) as store:
        rows = [json.loads(line) for line in pairs.open()]
        oracle = QrelsTeacher({r["qid"]: {r["docid"]: 1} for r in rows})
        todo = [Pair(r["qid"], r["docid"], r["query"], r["document"]) for r in rows]
        generate_teacher_outputs(todo, oracle, store, progress=False)
    for command in ("sft", "refine"):
        argv = [command, f"pairs={pairs}", f"teacher={teacher}", f"model={tmp_path / 'none'}"]
        assert main([*argv, f"output_dir={tmp_path / command}"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, err
        assert re.search(r"model='.*none' is not a directory", err), err


def test_refine_default_output_is_not_the_students_folder():
    from rerankdistill.cli import RefineOptions, TrainOptions

    assert RefineOptions().output_dir != TrainOptions().output_dir
