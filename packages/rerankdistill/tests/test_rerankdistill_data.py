"""Loaders: Cranfield counts and numbering, BEIR, BRIGHT queries/qrels, TREC read/write and malformed
lines."""

from __future__ import annotations

import gzip
import json

import pytest

from rerankdistill.bm25 import bm25_search
from rerankdistill.datasets import (
    CRANFIELD_GAINS,
    drop_excluded,
    load_beir,
    load_bright,
    load_cranfield,
    load_jsonl,
)
from rerankdistill.metrics import evaluate, ndcg_at_k
from rerankdistill.trec import (
    TrecFormatError,
    format_run,
    read_qrels,
    read_run,
    read_topics,
    write_qrels,
    write_run,
    write_topics,
)


@pytest.fixture(scope="module")
def cranfield(shared_data):
    return load_cranfield(shared_data / "cranfield")


def test_cranfield_counts_and_numbering(cranfield):
    corpus, queries, qrels = cranfield
    assert len(corpus) == 1400 and len(queries) == 225
    assert set(queries) == {str(i) for i in range(1, 226)}
    assert set(qrels) == set(queries)
    assert sum(len(v) for v in qrels.values()) == 1837
    # cran.qry's third query is `.I 004` (heat conduction in composite slabs); cranqrel calls it 3.
    assert queries["3"].startswith("what problems of heat conduction in composite slabs")
    assert qrels["1"]["184"] == CRANFIELD_GAINS[2] == 3
    assert {g for v in qrels.values() for g in v.values()} == {0, 1, 2, 3, 4}
    assert corpus["1"].startswith("experimental investigation of the aerodynamics of a wing in a slipstream")
    assert [d for d, text in corpus.items() if not text] == ["471", "995"]  # empty in the source file


def test_cranfield_bm25_ndcg(cranfield):
    corpus, queries, qrels = cranfield
    run = bm25_search(corpus, queries, k=100)
    assert all(len(docs) <= 100 for docs in run.values())
    scores = evaluate(run, qrels, ("ndcg_cut_10", "map", "recall_100"))
    # measured: 0.3161 / 0.2494 / 0.6833 with k1=0.9, b=0.4, English stopwords, no stemming
    assert float(scores["ndcg_cut_10"]) == pytest.approx(0.3161, abs=2e-3)
    assert float(scores["recall_100"]) == pytest.approx(0.6833, abs=2e-3)
    shuffled = {q: dict(zip(docs, reversed(list(docs.values())))) for q, docs in run.items()}
    assert ndcg_at_k(shuffled, qrels) < 0.5 * float(scores["ndcg_cut_10"])


def test_bm25_edge_cases():
    corpus = {"a": "the cat sat on the mat", "b": "dogs chase cats", "c": "quantum chromodynamics"}
    run = bm25_search(corpus, {"1": "cat mat", "2": "zebra unknownword"}, k=10)
    assert list(run["1"]) == ["a"] and run["2"] == {}
    with pytest.raises(ValueError, match="non-empty"):
        bm25_search(corpus, {"1": "  "})
    with pytest.raises(ValueError, match="k must be"):
        bm25_search(corpus, {"1": "cat"}, k=0)


def test_bright_queries_and_qrels_without_corpus(shared_data):
    d = shared_data / "bright"
    task = load_bright(d / "topics.bright-biology-original.jsonl.gz", d / "qrels.bright-biology.txt")
    assert len(task.queries) == 103 and task.corpus is None
    assert sum(len(v) for v in task.qrels.values()) == 372
    built = load_bright(d / "topics.bright-biology-original.jsonl.gz")
    assert built.qrels == {q: {k: 1 for k in v} for q, v in task.qrels.items()}
    run = {"0": {"insects_attracted_to_light/Phototaxis_0.txt": 1.0, "x": 2.0}}
    assert drop_excluded(run, {"0": {"x"}}) == {"0": {"insects_attracted_to_light/Phototaxis_0.txt": 1.0}}


def test_bright_with_corpus_file(tmp_path):
    topics = tmp_path / "t.jsonl.gz"
    with gzip.open(topics, "wt") as f:
        f.write(json.dumps({"id": "7", "query": "why", "gold_ids": ["d1"], "excluded_ids": ["N/A"]}) + "\n")
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(json.dumps({"id": "d1", "content": "because"}) + "\n")
    task = load_bright(topics, corpus=corpus)
    assert (
        task.corpus == {"d1": "because"} and task.qrels == {"7": {"d1": 1}} and task.excluded == {"7": set()}
    )


def test_beir_folder(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text(
        json.dumps({"_id": "d1", "title": "T", "text": "body"})
        + "\n"
        + json.dumps({"_id": "d2", "text": "x"})
        + "\n"
    )
    (tmp_path / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "hello"})
        + "\n"
        + json.dumps({"_id": "q2", "text": "unjudged"})
        + "\n"
    )
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\n")
    corpus, queries, qrels = load_beir(tmp_path)
    assert (
        corpus == {"d1": "T\nbody", "d2": "x"} and queries == {"q1": "hello"} and qrels == {"q1": {"d1": 2}}
    )
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(TrecFormatError, match=r"test.tsv:2: expected 3"):
        load_beir(tmp_path)


def test_trec_roundtrip(tmp_path):
    run = {"2": {"b": 0.5, "a": 0.5, "c": 1e-9}, "10": {"x": -3.25}}
    write_run(run, tmp_path / "run.txt", tag="bm25")
    lines = (tmp_path / "run.txt").read_text().splitlines()
    assert lines[0] == "10 Q0 x 1 -3.25 bm25"
    assert [ln.split()[2] for ln in lines[1:]] == ["b", "a", "c"]  # ties by docid descending
    assert read_run(tmp_path / "run.txt") == run
    qrels = {"1": {"a": 2, "b": -1}}
    write_qrels(qrels, tmp_path / "qrels.txt")
    assert read_qrels(tmp_path / "qrels.txt") == qrels
    write_topics({"1": "multi\nline\tquery"}, tmp_path / "topics.tsv")
    assert read_topics(tmp_path / "topics.tsv") == {"1": "multi line query"}
    assert format_run(run, depth=1).count("\n") == 2


def test_sgml_topics(tmp_path):
    (tmp_path / "t.txt").write_text(
        "<top>\n<num> Number: 301\n<title> International Organized Crime\n<desc> Description:\nblah\n</top>\n"
    )
    assert read_topics(tmp_path / "t.txt") == {"301": "International Organized Crime"}


@pytest.mark.parametrize(
    ("name", "text", "pattern"),
    [
        ("qrels", "1 0 a 1\n1 0 b\n", r"qrels:2: expected 4 fields"),
        ("qrels", "1 0 a x\n", r"qrels:1: relevance 'x' is not an integer"),
        ("qrels", "1 0 a 1\n\n1 0 a 2\n", r"qrels:3: duplicate judgement"),
        ("run", "1 Q0 a 1 0.5 t\n1 Q0 b 2 nan t\n", r"run:2: score 'nan' is not finite"),
        ("run", "1 Q0 a one 0.5 t\n", r"run:1: rank must be an integer"),
        ("run", "1 Q0 a 1 0.5\n", r"run:1: expected 6 fields"),
        ("run", "1 Q0 a 1 0.5 t\n1 Q0 a 2 0.4 t\n", r"run:2: document 'a' retrieved twice"),
        ("topics", "1\thello\n2\t \n", r"topics:2: empty query"),
        ("topics", "1 hello\n", r"topics:1: expected `qid<TAB>query`"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, name, text, pattern):
    path = tmp_path / name
    path.write_text(text)
    reader = {"qrels": read_qrels, "run": read_run, "topics": read_topics}[name]
    with pytest.raises(TrecFormatError, match=pattern):
        reader(path)


def test_jsonl_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "1", "text": "a"}\n{"id": 2\n')
    with pytest.raises(TrecFormatError, match=r"c.jsonl:2: invalid JSON"):
        load_jsonl(path)
    path.write_text('{"id": "1", "text": "a"}\n{"id": "1", "text": "b"}\n')
    with pytest.raises(ValueError, match="repeats id '1'"):
        load_jsonl(path)


def test_write_run_rejects_bad_ids(tmp_path):
    with pytest.raises(ValueError, match="document id"):
        write_run({"1": {"a b": 1.0}}, tmp_path / "r")
    with pytest.raises(ValueError, match="not finite"):
        write_run({"1": {"a": float("inf")}}, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_core_import_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, rerankdistill; rerankdistill.parse_relevance('x'); "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]; "
        "assert not heavy, heavy; assert callable(rerankdistill.sft)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
