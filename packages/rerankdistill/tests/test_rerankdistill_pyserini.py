"""Lucene BM25 through pyserini: Java detection, errors without pyserini, a hand-made corpus with a known top
document, and Cranfield against bm25s. The pyserini tests skip when pyserini or a Java 21+ JDK is absent."""

from __future__ import annotations

import json
import sys

import pytest

from rerankdistill.bm25 import bm25_search
from rerankdistill.bm25_lucene import LuceneBM25Index, find_java_home, java_major_version
from rerankdistill.datasets import load_cranfield
from rerankdistill.metrics import evaluate


def _fake_java_home(root, version: str):
    home = root / f"jdk-{version}"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "java").write_text("")
    (home / "release").write_text(f'IMPLEMENTOR="test"\nJAVA_VERSION="{version}"\n')
    return home


def test_java_version_and_home_detection(tmp_path, monkeypatch):
    old, new, newer = (_fake_java_home(tmp_path, v) for v in ("17.0.15", "21.0.2", "25.0.3"))
    assert [java_major_version(h) for h in (old, new, newer)] == [17, 21, 25]
    legacy = _fake_java_home(tmp_path, "1.8.0_382")
    assert java_major_version(legacy) == 8
    assert java_major_version(tmp_path / "nowhere") is None

    monkeypatch.setattr("rerankdistill.bm25_lucene.JVM_ROOTS", (tmp_path,))
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    assert find_java_home() == newer.resolve()  # the newest >= 21, no environment variable needed
    monkeypatch.setenv("JAVA_HOME", str(new))
    assert find_java_home() == new  # JAVA_HOME wins when it qualifies
    monkeypatch.setenv("JAVA_HOME", str(old))
    with pytest.raises(
        RuntimeError, match=r"JAVA_HOME=.*jdk-17.0.15 is Java 17; point JAVA_HOME at .*jdk-25"
    ):
        find_java_home()
    monkeypatch.delenv("JAVA_HOME")
    monkeypatch.setattr("rerankdistill.bm25_lucene.JVM_ROOTS", (tmp_path / "empty",))
    with pytest.raises(RuntimeError, match=r"needs Java 21\+ and none was found"):
        find_java_home()


def test_missing_pyserini_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyserini", None)  # import pyserini -> ImportError
    with pytest.raises(ImportError, match="backend='pyserini' needs pyserini"):
        bm25_search({"a": "text"}, {"1": "text"}, backend="pyserini")


def test_backend_argument_checks():
    corpus, queries = {"a": "some text"}, {"1": "text"}
    with pytest.raises(ValueError, match="backend must be one of"):
        bm25_search(corpus, queries, backend="lucene")
    with pytest.raises(ValueError, match="named Lucene stemmers need backend='pyserini'"):
        bm25_search(corpus, queries, stemmer="porter")
    with pytest.raises(ValueError, match="index_dir is for backend='pyserini'"):
        bm25_search(corpus, queries, index_dir="/tmp/x")
    with pytest.raises(ValueError, match="stemmer must be None or one of"):
        LuceneBM25Index(corpus, stemmer="snowball")


@pytest.fixture(scope="module")
def lucene():
    pytest.importorskip("pyserini")
    try:
        find_java_home()
    except RuntimeError as err:
        pytest.skip(str(err))


TINY = {
    "d1": "The cat sat on the mat and purred.",
    "d2": "Dogs chase cats through the garden; a dog barks.",
    "d3": "Quantum chromodynamics describes quarks and gluons.",
    "d4": "Boundary layer flow over a heated flat plate.",
    "d5": "",
}


def test_tiny_corpus_known_top_document(lucene, tmp_path):
    queries = {
        "q-cat": "cat on a mat",
        "q-qcd": "quarks and gluons?",
        "q-flow": "heated plate (boundary) flow:",
        "q-stop": "the and of",
        "q-none": "zebra",
    }
    run = bm25_search(TINY, queries, k=3, backend="pyserini")
    assert set(run) == set(queries)
    assert all(
        isinstance(d, str) and isinstance(s, float) and s > 0
        for docs in run.values()
        for d, s in docs.items()
    )
    assert max(run["q-cat"], key=run["q-cat"].get) == "d1"
    assert list(run["q-qcd"]) == ["d3"] and list(run["q-flow"]) == ["d4"]
    assert run["q-stop"] == {} and run["q-none"] == {}  # stopwords only / unknown word: nothing retrieved

    # Same shape and the same top documents as bm25s; a kept index in a user-given directory.
    ref = bm25_search(TINY, queries, k=3)
    assert {q: max(d, key=d.get) for q, d in run.items() if d} == {
        q: max(d, key=d.get) for q, d in ref.items() if d
    }
    index_dir = tmp_path / "idx"
    with LuceneBM25Index(TINY, index_dir=index_dir, stemmer="porter") as index:
        assert index.num_docs == 4  # the empty document is not indexed
        assert list(index.search({"q": "dog"}, k=5)["q"]) == ["d2"]  # porter: "dogs" and "dog" match
    assert any(index_dir.iterdir())
    with pytest.raises(ValueError, match="is not empty"):
        LuceneBM25Index(TINY, index_dir=index_dir)
    with pytest.raises(RuntimeError, match="closed"):
        index.search({"q": "dog"})


def test_cranfield_pyserini_close_to_bm25s(lucene, shared_data):
    corpus, queries, qrels = load_cranfield(shared_data / "cranfield")
    measures = ("ndcg_cut_10", "map", "recall_100")
    lucene_run = bm25_search(corpus, queries, k=100, backend="pyserini")
    bm25s_run = bm25_search(corpus, queries, k=100)
    assert set(lucene_run) == set(bm25s_run) == set(queries)
    assert all(0 < len(docs) <= 100 for docs in lucene_run.values())
    ours, ref = evaluate(lucene_run, qrels, measures), evaluate(bm25s_run, qrels, measures)
    # measured: Lucene 0.3160 / 0.2464 / 0.6839, bm25s 0.3161 / 0.2494 / 0.6833 (k1=0.9, b=0.4, no stemming)
    for m in measures:
        assert abs(float(ours[m]) - float(ref[m])) < 0.01, (m, float(ours[m]), float(ref[m]))
    top10 = [
        len(
            set(sorted(lucene_run[q], key=lucene_run[q].get)[-10:])
            & set(sorted(bm25s_run[q], key=bm25s_run[q].get)[-10:])
        )
        / 10
        for q in queries
    ]
    assert sum(top10) / len(top10) > 0.95  # measured 0.981 (lowest query 0.8)


def test_cli_generate_with_pyserini_first_stage(lucene, tmp_path, shared_data, capsys):
    from rerankdistill.cli import main
    from rerankdistill.datasets import read_jsonl

    pairs = tmp_path / "pairs.jsonl"
    assert (
        main(
            [
                "generate",
                "collection=cranfield",
                f"path={shared_data / 'cranfield'}",
                "backend=offline-qrels",
                "bm25_backend=pyserini",
                "max_queries=3",
                "depth=4",
                f"output={tmp_path / 't.jsonl'}",
                f"pairs_out={pairs}",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["done"] == 12
    corpus, queries, _ = load_cranfield(shared_data / "cranfield")
    expected = bm25_search(corpus, {q: queries[q] for q in ("1", "2", "3")}, k=4, backend="pyserini")
    assert [(r["qid"], r["docid"]) for r in read_jsonl(pairs)] == [
        (q, d) for q in expected for d in expected[q]
    ]
