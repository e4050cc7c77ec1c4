"""rerank-qlora's BRIGHT task follows the paper: every judged query of the domain is evaluated zero-shot, none
is trained or tuned on (training and validation come from the stdlib task); a BRIGHT query's candidates are
BRIGHT documents without its excluded ids; configs that would train on the domain are refused.

Real BRIGHT biology topics and qrels (../shared/data/bright); the documents are a small file written here (the
real corpus is not in the shared data): each query's gold documents, plus for two queries a document marked
excluded whose text is the query itself (BM25's top hit unless excluded ids are dropped)."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace

import pytest

from rerank_qlora.config import RerankConfig, RerankQLoRAConfig, TaskConfig
from rerank_qlora.stages import first_stages, load_task
from shared_kernels.runconfig import ConfigError, load_config

EXCLUDED = {"0": "excluded/echo_of_query_0.txt", "1": "excluded/echo_of_query_1.txt"}


@pytest.fixture(scope="module")
def bright(shared_data, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bright")
    real = shared_data / "bright"
    if not (real / "topics.bright-biology-original.jsonl.gz").is_file():
        pytest.skip(f"BRIGHT biology topics not found in {real}")
    rows = [json.loads(line) for line in gzip.open(real / "topics.bright-biology-original.jsonl.gz", "rt")]
    docs = {}
    for row in rows:
        for docid in row["gold_ids"]:
            docs[docid] = f"{docid.replace('_', ' ').replace('/', ' ')} gold document"
        if row["id"] in EXCLUDED:
            row["excluded_ids"] = [EXCLUDED[row["id"]]]
            docs[EXCLUDED[row["id"]]] = row["query"]
    folder = tmp_path / "bright"
    folder.mkdir()
    with gzip.open(folder / "topics.bright-biology-original.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    (folder / "qrels.bright-biology.txt").write_bytes((real / "qrels.bright-biology.txt").read_bytes())
    with open(tmp_path / "documents.jsonl", "w") as f:
        f.writelines(json.dumps({"id": d, "content": t}) + "\n" for d, t in docs.items())
    judged = {
        line.split()[0] for line in (real / "qrels.bright-biology.txt").read_text().splitlines() if line
    }
    return folder, tmp_path / "documents.jsonl", {r["id"] for r in rows}, judged, set(docs)


@pytest.fixture(scope="module")
def task(bright):
    folder, documents, *_ = bright
    return load_task(
        TaskConfig(
            name="bright",
            path=folder,
            corpus_path=documents,
            max_train_queries=8,
            max_validation_queries=4,
            first_stage_queries="reasoning",
        )
    )


def test_every_query_evaluated_none_trained_excluded_never_candidates(bright, task):
    folder, documents, qids, judged, docids = bright
    assert len(judged) == 103
    assert sorted(task.eval_qids) == sorted(judged)
    assert not qids & set(task.train_qids) and not qids & set(task.validation_qids)
    assert len(task.train_qids) == 8 and len(task.validation_qids) == 4
    assert all(q.startswith("q:") for q in task.train_qids + task.validation_qids)  # stdlib queries
    assert set(task.eval_docids) == docids and not docids & set(task.train_docids)
    assert task.search_queries["0"] != task.queries["0"]  # BM25 searches with the reasoning text
    runs = first_stages(task, RerankConfig(candidates=20, k=20, bm25_k1=0.9, bm25_b=0.4))
    for name in ("plain", "code"):
        run = runs[name]
        assert set(task.eval_qids) <= set(run)
        for qid in task.eval_qids:
            assert set(run[qid]) <= docids, (name, qid)
            assert EXCLUDED.get(qid) not in run[qid], (name, qid)
        for qid in task.train_qids + task.validation_qids:
            assert run[qid] and not set(run[qid]) & docids, (name, qid)


def test_excluded_ids_rank_first_without_the_exclusion(task):
    """The check above can fail: searching with the original query, the excluded echo is BM25's top hit
    unless it is dropped (here the task's exclusions are cleared)."""
    plain = replace(task, excluded={}, search_queries={})
    run = first_stages(plain, RerankConfig(candidates=5, k=5, bm25_k1=0.9, bm25_b=0.4))["plain"]
    assert all(max(run[q], key=run[q].get) == EXCLUDED[q] for q in EXCLUDED)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.train_source=bright"], r"task.train_source='bright' would train and tune on BRIGHT queries"),
        (["task.train_source=beir", "task.train_path=../shared/data/bright"], r"is the BRIGHT folder"),
        (["task.train_source=beir"], r"task.train_path is required for task.train_source='beir'"),
        (["task.name=stdlib", "task.first_stage_queries=reasoning"], r"needs task.name='bright'"),
    ],
)
def test_configs_training_on_the_domain_are_refused(overrides, message):
    base = ["task.name=bright", "task.path=../shared/data/bright", "task.corpus_path=documents.jsonl"]
    with pytest.raises(ConfigError, match=message):
        load_config(RerankQLoRAConfig, overrides=base + overrides)


def test_evaluation_cap_below_the_domain_is_refused(bright):
    folder, documents, *_ = bright
    with pytest.raises(
        ConfigError, match=r"max_eval_queries=50 would leave out some of BRIGHT biology's 103"
    ):
        load_task(
            TaskConfig(
                name="bright",
                path=folder,
                corpus_path=documents,
                max_eval_queries=50,
                max_train_queries=2,
                max_validation_queries=1,
            )
        )
