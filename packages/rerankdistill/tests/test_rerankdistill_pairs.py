"""Training pairs: positives from selected answers' links, BM25 hard negatives, dedup, leak-free split."""

from __future__ import annotations

import json
import random

import pytest

from rerankdistill.pairs import build_training_pairs, load_pages

TOPICS = [
    "photosynthesis chlorophyll light",
    "plate tectonics earthquakes",
    "insect vision phototaxis",
    "ocean tides moon gravity",
    "volcano magma eruption",
    "dna replication polymerase",
    "glacier ice melting climate",
    "bird migration navigation",
    "soil erosion rivers",
    "cloud rain formation",
]


def make_world(n_questions: int = 60, seed: int = 0):
    rng = random.Random(seed)
    pages, records = {}, []
    for i in range(n_questions):
        topic = TOPICS[i % len(TOPICS)]
        urls = [f"https://w.example/{i}/{j}" for j in range(3)]
        for j, u in enumerate(urls):
            pages[u] = f"page {i}-{j} on {topic} " + " ".join(rng.choice(topic.split()) for _ in range(30))
        answers = [
            {"body": "see link", "score": 5, "accepted": True, "links": urls[:1]},
            {"body": "other", "score": 9, "accepted": False, "links": urls[1:2]},
            {"body": "low", "score": 1, "accepted": False, "links": urls[2:] + ["https://missing.example/x"]},
        ]
        records.append(
            {"id": f"q{i}", "title": f"question {i} about {topic}", "body": "why?", "answers": answers}
        )
    return records, pages


def test_positives_negatives_and_no_leak():
    records, pages = make_world()
    # a textual duplicate of q3 under another id, and a duplicate page under another url
    records.append(dict(records[3], id="q3-dup"))
    pages["https://mirror.example/0/0"] = pages["https://w.example/0/0"]
    split = build_training_pairs(records, pages, negatives_per_question=2, top_answers=2, eval_fraction=0.3)
    assert split.stats["duplicate_questions"] == 1 and split.stats["duplicate_pages"] == 1
    assert split.stats["missing_pages"] == 61
    train_q = {p.qid for p in split.train}
    eval_q = {p.qid for p in split.eval}
    assert train_q and eval_q and not train_q & eval_q
    assert "q3-dup" not in train_q | eval_q
    texts = {p.query for p in split.train} & {p.query for p in split.eval}
    assert not texts
    pairs = split.train + split.eval
    assert len({(p.qid, p.docid) for p in pairs}) == len(pairs)
    by_q: dict[str, list] = {}
    for p in pairs:
        by_q.setdefault(p.qid, []).append(p)
    for qid, ps in by_q.items():
        i = int(qid[1:])
        pos = [p for p in ps if p.source == "linked"]
        neg = [p for p in ps if p.source == "bm25_negative"]
        # accepted answer + the top-scored other answer -> pages j=0 and j=1
        assert sorted(p.document.split()[1] for p in pos) == [f"{i}-0", f"{i}-1"]
        assert len(neg) == 2
        # hard negatives never include pages linked from any answer of the question (j=2 included)
        assert all(not p.document.startswith(f"page {i}-") for p in neg)
        # BM25 finds same-topic pages first
        topic = TOPICS[i % len(TOPICS)]
        assert all(topic in p.document for p in neg)


def test_split_is_deterministic_and_seeded():
    records, pages = make_world(40)
    a = build_training_pairs(records, pages, eval_fraction=0.5, seed=1)
    b = build_training_pairs(records, pages, eval_fraction=0.5, seed=1)
    c = build_training_pairs(records, pages, eval_fraction=0.5, seed=2)
    assert a.train == b.train and {p.qid for p in a.eval} != {p.qid for p in c.eval}


def test_bad_arguments_and_pages_index(tmp_path):
    with pytest.raises(ValueError, match="eval_fraction"):
        build_training_pairs([], {}, eval_fraction=1.0)
    with pytest.raises(ValueError, match="needs `id` and `answers`"):
        build_training_pairs([{"title": "x"}], {})
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "a.txt").write_text("hello page")
    (tmp_path / "index.jsonl").write_text(json.dumps({"url": "u1", "file": "pages/a.txt"}) + "\n")
    assert load_pages(tmp_path / "index.jsonl") == {"u1": "hello page"}
    (tmp_path / "index.jsonl").write_text(json.dumps({"url": "u1", "file": "pages/none.txt"}) + "\n")
    with pytest.raises(FileNotFoundError, match="missing file"):
        load_pages(tmp_path / "index.jsonl")
