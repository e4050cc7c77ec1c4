"""The append-only store: torn last lines, duplicates, the lock, and unlocked reads."""

from __future__ import annotations

import json

import pytest

from idiomreason.store import PREDICTION_KEY, JsonlStore, prediction_store, read_records


def _rec(i, **kw):
    return {
        "model": "m",
        "condition": "cot.v1.0shot",
        "dataset": "d",
        "example_id": str(i),
        "generation": "g",
        "prompt": "p",
        "prediction": None,
        **kw,
    }


def test_append_skips_known_keys_and_survives_reopen(tmp_path):
    path = tmp_path / "p.jsonl"
    with prediction_store(path) as store:
        assert store.append([_rec(1), _rec(2), _rec(1, prediction="literal")]) == 2
        assert store.append([_rec(2), _rec(3)]) == 1
        assert ("m", "cot.v1.0shot", "d", "1", "g", "p") in store
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["prediction"] is None
    with prediction_store(path) as store:
        assert len(store) == 3 and store.append([_rec(3)]) == 0


def test_torn_last_line_is_dropped_before_appending(tmp_path):
    path = tmp_path / "p.jsonl"
    with prediction_store(path) as store:
        store.append([_rec(1), _rec(2)])
    intact = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"model": "m", "condition": "cot.v1.0sh')  # a write cut by kill -9
    assert len(read_records(path)) == 2  # readers ignore the fragment without touching the file
    with prediction_store(path) as store:
        assert store.dropped_partial_line and len(store) == 2
        assert path.read_bytes() == intact
        store.append([_rec(3)])
    assert [json.loads(x)["example_id"] for x in path.read_text().splitlines()] == ["1", "2", "3"]


def test_duplicates_in_the_file_keep_the_first(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps(_rec(1, prediction="idiomatic")) + "\n" + json.dumps(_rec(1, prediction="literal")) + "\n"
    )
    with prediction_store(path) as store:
        assert (
            store.duplicates == 1
            and store.get(("m", "cot.v1.0shot", "d", "1", "g", "p"))["prediction"] == "idiomatic"
        )
    assert read_records(path)[("m", "cot.v1.0shot", "d", "1", "g", "p")]["prediction"] == "idiomatic"


def test_corruption_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_rec(1)) + "\nnot json\n" + json.dumps(_rec(2)) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: not a JSON record"):
        prediction_store(path)


def test_one_writer_at_a_time(tmp_path):
    path = tmp_path / "p.jsonl"
    with prediction_store(path):
        with pytest.raises(RuntimeError, match="locked by another running process"):
            prediction_store(path)
    with prediction_store(path):  # released on close
        pass


def test_records_need_their_key_fields(tmp_path):
    with JsonlStore(tmp_path / "p.jsonl", PREDICTION_KEY) as store:
        with pytest.raises(ValueError, match="key field 'example_id'"):
            store.append([{"model": "m", "condition": "c", "dataset": "d"}])
