"""Query splits: deterministic seeded (or given) lists, leakage refused in training commands unless
allow_test_leak=true, the split file's checks."""

from __future__ import annotations

import json
import random

import pytest

from rerankdistill.cli import RerankOptions, main, split_queries
from rerankdistill.splits import TestLeakError, make_splits, read_splits
from shared_kernels.runconfig import ConfigError, load_config


def test_make_splits_is_deterministic_and_disjoint():
    qids = [str(i) for i in range(1, 226)]
    a = make_splits(qids, validation=0.1, test=0.2, seed=3)
    shuffled = qids[:]
    random.Random(0).shuffle(shuffled)
    assert (
        make_splits(shuffled + qids[:5], validation=0.1, test=0.2, seed=3) == a
    )  # order and repeats ignored
    assert [len(a[s]) for s in ("train", "validation", "test")] == [158, 22, 45]
    assert set(a["train"]) | set(a["validation"]) | set(a["test"]) == set(qids)
    assert not set(a["train"]) & set(a["test"]) and not set(a["validation"]) & set(a["test"])
    assert make_splits(qids, seed=4)["test"] != a["test"]
    given = make_splits(qids, validation=0.5, seed=0, test_qids=["7", "9"])
    assert given["test"] == ["7", "9"] and len(given["validation"]) == 112 and "7" not in given["train"]
    with pytest.raises(ValueError, match="validation \\+ test must be < 1"):
        make_splits(qids, validation=0.5, test=0.5)
    with pytest.raises(ValueError, match="not in the collection"):
        make_splits(qids, test_qids=["nope"])


def test_split_command_writes_the_same_file_and_refuses_to_change_it(tmp_path, shared_data, capsys):
    cran = [
        "split",
        "collection=cranfield",
        f"path={shared_data / 'cranfield'}",
        f"out={tmp_path / 's.json'}",
    ]
    assert main(cran) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["train"], summary["validation"], summary["test"]) == (158, 22, 45)
    first = (tmp_path / "s.json").read_text()
    assert main(cran) == 0 and (tmp_path / "s.json").read_text() == first  # deterministic: rewritten equal
    assert main([*cran, "seed=1"]) == 2
    assert (
        "exists with other splits" in capsys.readouterr().err and (tmp_path / "s.json").read_text() == first
    )
    assert main([*cran, "seed=1", "overwrite=true"]) == 0 and (tmp_path / "s.json").read_text() != first


def test_training_commands_refuse_test_queries(tmp_path, shared_data, capsys):
    splits = tmp_path / "s.json"
    cran = ["collection=cranfield", f"path={shared_data / 'cranfield'}"]
    assert main(["split", *cran, f"out={splits}"]) == 0
    test = read_splits(splits)["test"]
    gen = [
        "generate",
        *cran,
        "backend=offline-qrels",
        "max_queries=2",
        "depth=2",
        f"splits={splits}",
        f"output={tmp_path / 't.jsonl'}",
        f"pairs_out={tmp_path / 'p.jsonl'}",
    ]
    assert main([*gen, "queries=test"]) == 2
    assert "training on test queries leaks" in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists()
    assert main([*gen, "queries=test", "allow_test_leak=true"]) == 0
    capsys.readouterr()
    assert {json.loads(line)["qid"] for line in (tmp_path / "p.jsonl").open()} <= set(test)
    # a pairs file holding test qids is refused by sft before any model is loaded
    sft = [
        "sft",
        f"pairs={tmp_path / 'p.jsonl'}",
        f"teacher={tmp_path / 't.jsonl'}",
        f"splits={splits}",
        "model=unused",
    ]
    assert main(sft) == 2
    assert f"pairs file '{tmp_path / 'p.jsonl'}' holds 2 test queries" in capsys.readouterr().err
    # the default split for generate is train
    assert main([*gen, f"output={tmp_path / 't2.jsonl'}"]) == 0
    train = set(read_splits(splits)["train"])
    assert {json.loads(line)["qid"] for line in (tmp_path / "p.jsonl").open()} <= train


def test_split_selection_and_file_checks(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"train": ["1", "2"], "validation": ["3"], "test": ["4"]}))
    o = load_config(RerankOptions, None, [f"splits={path}"])
    assert split_queries(o, "test", training=False)[1] == {"4"}  # rerank reports on test by default
    o = load_config(RerankOptions, None, [f"splits={path}", "queries=validation"])
    assert split_queries(o, "test", training=False)[1] == {"3"}
    with pytest.raises(TestLeakError):
        split_queries(
            load_config(RerankOptions, None, [f"splits={path}", "queries=test"]), "train", training=True
        )
    with pytest.raises(ConfigError, match="queries must be one of train, validation, test"):
        split_queries(
            load_config(RerankOptions, None, [f"splits={path}", "queries=dev"]), "test", training=False
        )
    with pytest.raises(ConfigError, match="needs splits=FILE"):
        split_queries(load_config(RerankOptions, None, ["queries=train"]), "test", training=False)
    path.write_text(json.dumps({"train": ["1"], "validation": ["1"], "test": []}))
    with pytest.raises(ConfigError, match="1 qid\\(s\\) in both train and validation"):
        read_splits(path)
    path.write_text("{")
    with pytest.raises(ConfigError, match="is not JSON"):
        read_splits(path)
