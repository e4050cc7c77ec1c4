"""Loaders for what researchers have (JSONL, Parquet, `datasets` folders) and BRIGHT as in the paper:
every query of a domain reranked zero-shot over a document file, excluded ids dropped before scoring,
BM25 over the original or the reasoning queries."""

from __future__ import annotations

import gzip
import json

import pytest

from rerankdistill.cli import main
from rerankdistill.loaders import load_qrels_records, load_texts
from rerankdistill.trec import read_run

DOCS = [
    {"_id": "d1", "title": "Bees", "text": "bees see ultraviolet"},
    {"_id": "d2", "text": "moths and light"},
]


def test_jsonl_parquet_and_datasets_folder_load_the_same_texts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(d) + "\n" for d in DOCS)
    rows = [{**d, "title": d.get("title", "")} for d in DOCS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    DatasetDict({"biology": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "folder"))
    want = {"d1": "Bees\nbees see ultraviolet", "d2": "moths and light"}
    assert load_texts(tmp_path / "c.jsonl.gz") == want
    assert load_texts(tmp_path / "c.parquet") == want
    assert load_texts(tmp_path / "folder", split="biology") == want
    assert load_texts(tmp_path / "c.parquet", "_id", "text", title_field=None)["d1"] == "bees see ultraviolet"
    with pytest.raises(ValueError, match=r"holds splits \['biology'\]: choose one with split="):
        load_texts(tmp_path / "folder")
    with pytest.raises(ValueError, match="no field 'body' for the text"):
        load_texts(tmp_path / "c.parquet", text_field="body")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(tmp_path / "missing.jsonl")
    Dataset.from_list(
        [{"query-id": "q1", "corpus-id": "d1", "score": 2}, {"query-id": "q1", "corpus-id": "d2", "score": 0}]
    ).save_to_disk(str(tmp_path / "qrels"))
    assert load_qrels_records(tmp_path / "qrels") == {"q1": {"d1": 2, "d2": 0}}
    Dataset.from_list([{"query-id": "q1", "corpus-id": "d1", "score": 0.5}]).save_to_disk(
        str(tmp_path / "bad")
    )
    with pytest.raises(ValueError, match="gain 0.5 is not an integer"):
        load_qrels_records(tmp_path / "bad")


def test_evaluate_with_a_datasets_collection(tmp_path, capsys):
    from datasets import Dataset

    Dataset.from_list(DOCS[1:] + [{"_id": "d1", "text": "bees"}]).save_to_disk(str(tmp_path / "corpus"))
    Dataset.from_list([{"_id": "q1", "text": "what do bees see"}]).save_to_disk(str(tmp_path / "queries"))
    Dataset.from_list([{"query-id": "q1", "corpus-id": "d1", "score": 1}]).save_to_disk(
        str(tmp_path / "qrels")
    )
    (tmp_path / "r.run").write_text("q1 Q0 d2 1 2.0 t\nq1 Q0 d1 2 1.0 t\n")
    assert (
        main(
            [
                "evaluate",
                "collection=datasets",
                f"corpus={tmp_path / 'corpus'}",
                f"topics={tmp_path / 'queries'}",
                f"qrels={tmp_path / 'qrels'}",
                f"runs=r={tmp_path / 'r.run'}",
                "measures=recip_rank",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["r"]["recip_rank"] == 0.5


def test_bright_zero_shot_over_a_document_file_drops_excluded_ids(tmp_path, shared_data, tiny_lm_dir, capsys):
    """A student trained elsewhere (here: an untrained tiny model) reranks BRIGHT biology queries over a
    synthetic Parquet document file: the excluded document (the query's own text, BM25's best match) is never
    ranked, and BM25 over the reasoning texts finds the document written from them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = shared_data / "bright"
    rows = [json.loads(line) for line in gzip.open(d / "topics.bright-biology-original.jsonl.gz", "rt")][:2]
    rows[0]["excluded_ids"] = ["copy/of-query-0.txt"]
    topics = tmp_path / "topics.jsonl.gz"
    with gzip.open(topics, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    docs = [
        {"id": "copy/of-query-0.txt", "content": rows[0]["query"]},
        {"id": "from/reasoning-1.txt", "content": rows[1]["reasoning"]},
        *(
            {"id": g, "content": f"gold document {i} " + r["query"][:200]}
            for r in rows
            for i, g in enumerate(r["gold_ids"][:2])
        ),
        *({"id": f"junk/{i}.txt", "content": f"unrelated text number {i} about rocks"} for i in range(5)),
    ]
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "documents.parquet")
    qrels = tmp_path / "qrels.txt"  # the real judgements of the two queries kept
    qrels.write_text(
        "".join(line for line in (d / "qrels.bright-biology.txt").open() if line.split()[0] in "01")
    )
    bright = [
        "collection=bright",
        f"topics={topics}",
        f"qrels={qrels}",
        f"corpus={tmp_path / 'documents.parquet'}",
    ]
    rerank = ["rerank", *bright, f"model={tiny_lm_dir}", "depth=3", "max_new_tokens=4"]
    assert (
        main(
            [
                *rerank,
                f"judgements={tmp_path / 'j.jsonl'}",
                f"output={tmp_path / 'rr.run'}",
                f"first_stage_output={tmp_path / 'bm25.run'}",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["queries"] == 2  # every query of the (cut) domain: nothing held out for training
    first, reranked = read_run(tmp_path / "bm25.run"), read_run(tmp_path / "rr.run")
    assert "copy/of-query-0.txt" not in first["0"] and "copy/of-query-0.txt" not in reranked["0"]
    assert set(reranked["0"]) == set(first["0"]) and len(first["0"]) == 3
    assert (
        main(
            [
                *rerank,
                "first_stage_queries=reasoning",
                f"judgements={tmp_path / 'j2.jsonl'}",
                f"output={tmp_path / 'rr2.run'}",
                f"first_stage_output={tmp_path / 'bm25r.run'}",
            ]
        )
        == 0
    )
    capsys.readouterr()
    by_reasoning = read_run(tmp_path / "bm25r.run")
    assert max(by_reasoning["1"], key=by_reasoning["1"].get) == "from/reasoning-1.txt"
    assert "copy/of-query-0.txt" not in by_reasoning["0"]
    assert (
        main(
            [
                "evaluate",
                *bright,
                f"runs=bm25={tmp_path / 'bm25.run'},rr={tmp_path / 'rr.run'}",
                "measures=ndcg_cut_10,judged_10",
                "n_resamples=100",
            ]
        )
        == 0
    )
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < table["bm25"]["ndcg_cut_10"] <= 1 and table["significance"][0]["queries"] == 2
