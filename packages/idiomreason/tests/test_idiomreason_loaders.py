"""Each loader on small files written in its source format, on bad rows, and on the shared real data."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest

from idiomreason import MalformedRowError, load_dataset
from idiomreason.examples import Example

SEMEVAL_TRAIN = (
    "DataID,Language,MWE,Setting,Previous,Target,Next,Label\n"
    'train.EN.1.1,EN,big fish,zero_shot,Before.,"He is a big fish in a small pond, they say.",After.,0\n'
    'train.PT.2.1,PT,pé direito,zero_shot,"Linha um,\nlinha dois",O pé direito da sala é alto.,,1\n'
    "train.GL.3.1,GL,porta aberta,zero_shot,,Deixou a porta aberta.,Despois.,1\n"
)
SEMEVAL_DEV = (
    "ID,Language,MWE,Previous,Target,Next\n"
    "101,EN,high life,P1.,They enjoy the high life.,N1.\n"
    "102,EN,high life,,The high life of birds in trees.,\n"
    "103,PT,mão de obra,P3.,Falta mão de obra.,N3.\n"
)
SEMEVAL_DEV_GOLD = "ID,DataID,Language,Label\n101,dev.EN.1.1,EN,0\n102,dev.EN.1.2,EN,1\n103,dev.PT.2.1,PT,0\n"


@pytest.fixture
def semeval_dir(tmp_path):
    (tmp_path / "train_zero_shot.csv").write_text(SEMEVAL_TRAIN, encoding="utf-8")
    (tmp_path / "dev.csv").write_text(SEMEVAL_DEV, encoding="utf-8")
    (tmp_path / "dev_gold.csv").write_text(SEMEVAL_DEV_GOLD, encoding="utf-8")
    return tmp_path


def test_semeval_train_rows(semeval_dir):
    ex = load_dataset("semeval2022-2a", semeval_dir, "train_zero_shot")
    assert [e.id for e in ex] == ["train.EN.1.1", "train.PT.2.1", "train.GL.3.1"]
    assert [e.label for e in ex] == ["idiomatic", "literal", "literal"]  # Label 0 = idiomatic
    assert [e.language for e in ex] == ["en", "pt", "gl"]
    assert ex[0].target == "He is a big fish in a small pond, they say." and ex[0].previous == "Before."
    assert ex[1].previous == "Linha um,\nlinha dois" and ex[1].next == ""
    assert ex[0].source["Setting"] == "zero_shot" and ex[0].split == "train_zero_shot"


def test_semeval_dev_is_joined_with_its_gold_file(semeval_dir):
    ex = load_dataset("semeval2022-2a", semeval_dir, "dev")
    assert {e.id: e.label for e in ex} == {"101": "idiomatic", "102": "literal", "103": "idiomatic"}
    assert ex[0].source["gold_DataID"] == "dev.EN.1.1"
    assert len(load_dataset("semeval2022-2a", semeval_dir)) == 6  # every split of the folder
    assert len(load_dataset("semeval2022-2a", semeval_dir / "dev.csv")) == 3


def test_semeval_bad_rows_name_file_and_line(semeval_dir, caplog):
    # line 3 starts the PT record (its Previous spans lines 3-4), so the GL record is on line 5
    bad = SEMEVAL_TRAIN.replace(",1\ntrain.GL", ",7\ntrain.GL").replace(
        "porta aberta,zero_shot,,", "porta aberta,zero_shot,"
    )
    (semeval_dir / "train_zero_shot.csv").write_text(bad, encoding="utf-8")
    with pytest.raises(MalformedRowError, match=r"train_zero_shot.csv:3: unknown label '7'"):
        load_dataset("semeval2022-2a", semeval_dir, "train_zero_shot")
    with caplog.at_level(logging.WARNING, logger="idiomreason"):
        ex = load_dataset("semeval2022-2a", semeval_dir, "train_zero_shot", on_error="skip")
    assert [e.id for e in ex] == ["train.EN.1.1"]
    assert [(p.line, p.reason.split(" (")[0]) for p in ex.skipped] == [
        (3, "unknown label '7'"),
        (5, "expected 8 fields"),
    ]
    assert "skipped 2 malformed rows" in caplog.text


def test_semeval_missing_and_orphan_gold(semeval_dir):
    (semeval_dir / "dev_gold.csv").write_text("ID,DataID,Language,Label\n101,d1,EN,0\n999,d9,EN,1\n")
    with pytest.raises(MalformedRowError, match=r"dev.csv:3: ID '102' has no gold label"):
        load_dataset("semeval2022-2a", semeval_dir, "dev")
    ex = load_dataset("semeval2022-2a", semeval_dir, "dev", on_error="skip")
    assert [e.id for e in ex] == ["101"]
    assert sorted(str(p).split("/")[-1] for p in ex.skipped) == [
        "dev.csv:3: ID '102' has no gold label in dev_gold.csv",
        "dev.csv:4: ID '103' has no gold label in dev_gold.csv",
        "dev_gold.csv:3: gold ID '999' has no row in dev.csv",
    ]


def test_semeval_unlabelled_needs_opt_in(tmp_path):
    (tmp_path / "eval.csv").write_text(SEMEVAL_DEV)
    with pytest.raises(ValueError, match="include_unlabelled"):
        load_dataset("semeval2022-2a", tmp_path, "eval")
    ex = load_dataset("semeval2022-2a", tmp_path, "eval", include_unlabelled=True)
    assert [e.label for e in ex] == [None, None, None]
    with pytest.raises(ValueError, match="split 'test'"):
        load_dataset("semeval2022-2a", tmp_path, "test")


def _magpie_line(**fields):
    base = {
        "id": 1, "idiom": "off the hook", "label": "i", "split": "training", "confidence": 1.0,
        "context": ["S1.", "S2.", "He was let off the hook.", "S4.", "S5."],
    }  # fmt: skip
    base.update(fields)
    return json.dumps(base)


def test_magpie_original_layout(tmp_path):
    lines = [
        _magpie_line(id=1),
        _magpie_line(id=2, label="l", split="development"),
        _magpie_line(id=3, label="f"),
        _magpie_line(id=4, label="?", split="test"),
        _magpie_line(id=5, label="i", split="test", confidence=0.5),
        "",
        _magpie_line(id=6, label="zzz"),
        "{not json",
        _magpie_line(id=8, context=["only target"]),
    ]
    path = tmp_path / "MAGPIE_filtered_split_random.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MalformedRowError, match=r"\.jsonl:7: unknown label 'zzz'"):
        load_dataset("magpie", path)
    ex = load_dataset("magpie", path, on_error="skip", min_confidence=0.75)
    assert [(e.id, e.label, e.split) for e in ex] == [
        ("1", "idiomatic", "train"),
        ("2", "literal", "dev"),
        ("8", "idiomatic", "train"),
    ]
    assert (
        ex[0].previous == "S1. S2." and ex[0].target == "He was let off the hook." and ex[0].next == "S4. S5."
    )
    assert ex[2].previous == "" and ex[2].target == "only target"
    assert [p.line for p in ex.skipped] == [7, 8]
    assert ex.excluded == Counter(
        {
            "MAGPIE sense 'f' (neither idiomatic nor literal)": 1,
            "MAGPIE sense '?' (neither idiomatic nor literal)": 1,
            "confidence below 0.75": 1,
        }
    )
    assert [e.id for e in load_dataset("magpie", path, "dev", on_error="skip")] == ["2"]


def test_magpie_hub_layout(tmp_path):
    path = tmp_path / "magpie.jsonl"
    rows = [
        {"sentence": "It was across the board.", "idiom": "across the board", "usage": "figurative"},
        {"sentence": "He walked across the board.", "idiom": "across the board", "usage": "literal"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = load_dataset("magpie", path)
    assert [(e.id, e.label, e.expression) for e in ex] == [
        ("magpie:1", "idiomatic", "across the board"),
        ("magpie:2", "literal", "across the board"),
    ]


def test_vnc_tokens(tmp_path):
    path = tmp_path / "cook_dataset.tok"
    path.write_text(
        "L||blow||smoke||And he blows the smoke back .\n"
        "I||blow||whistle||Diana &apos;s aide blew the whistle .\n"
        "Q||make||face||She made a face .\n"
        "X||hit||roof||He hit the roof .\n"
        "I||hit||roof\n"
    )
    with pytest.raises(MalformedRowError, match=r"cook_dataset.tok:4: unknown label 'X'"):
        load_dataset("vnc-tokens", tmp_path)
    ex = load_dataset("vnc-tokens", tmp_path, on_error="skip")
    assert [(e.id, e.label, e.expression) for e in ex] == [
        ("cook_dataset:1", "literal", "blow smoke"),
        ("cook_dataset:2", "idiomatic", "blow whistle"),
    ]
    assert ex[1].target == "Diana 's aide blew the whistle ." and "&apos;" in ex[1].source["sentence"]
    assert ex.excluded == Counter({"VNC label Q (unknown)": 1}) and [p.line for p in ex.skipped] == [4, 5]
    with_q = load_dataset("vnc-tokens", path, on_error="skip", include_unknown=True)
    assert [e.label for e in with_q] == ["literal", "idiomatic", None]
    with pytest.raises(ValueError, match="no splits"):
        load_dataset("vnc-tokens", path, "dev")


def test_generic_csv_tsv_jsonl_with_mappings(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text(
        "sid,sentence,mwe,gold,lang\na,He kicked the bucket.,kick the bucket,1,en\n"
        "b,She kicked a bucket.,kick the bucket,0,en\nc,Unsure one.,kick the bucket,2,en\n"
    )
    ex = load_dataset(
        "generic",
        csv_path,
        columns={"id": "sid", "target": "sentence", "expression": "mwe", "label": "gold", "language": "lang"},
        label_map={"1": "idiomatic", "0": "literal", "2": None},
    )
    assert [(e.id, e.label) for e in ex] == [("a", "idiomatic"), ("b", "literal")]
    assert ex.excluded == Counter({"label '2' mapped to None": 1})
    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_text(
        "expression\ttarget\tlabel\tsplit\nbreak the ice\tThey broke the ice.\tIdiomatic\ttest\n"
        "break the ice\tIce broke.\tliteral\ttrain\n"
    )
    ex = load_dataset("generic", tsv_path, "test", language="en")
    assert [(e.id, e.label, e.split) for e in ex] == [("d:2", "idiomatic", "test")]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        json.dumps({"expression": "x y", "target": "x y z", "label": "I", "language": "PT"})
        + "\n"
        + json.dumps({"expression": "x y", "label": "literal", "language": "pt"})
        + "\n"
    )
    with pytest.raises(MalformedRowError, match=r"d.jsonl:2: missing column 'target'"):
        load_dataset("generic", jsonl)
    ex = load_dataset("generic", jsonl, on_error="skip")
    assert [(e.language, e.label) for e in ex] == [("pt", "idiomatic")] and len(ex.skipped) == 1
    with pytest.raises(MalformedRowError, match="missing column 'language'"):
        load_dataset("generic", tsv_path)
    with pytest.raises(ValueError, match="columns keys"):
        load_dataset("generic", csv_path, columns={"sentence": "x"})
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="must end in"):
        load_dataset("generic", tmp_path / "d.txt")


def test_duplicate_ids_are_bad_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    row = {"id": "1", "expression": "a b", "target": "a b", "label": "literal", "language": "en"}
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(MalformedRowError, match=r"d.jsonl:2: duplicate id '1' \(first at .*d.jsonl:1\)"):
        load_dataset("generic", path)


def test_hf_datasets_loading(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({
        "sentence": ["He spilled the beans.", "The beans spilled.", "Odd."],
        "idiom": ["spill the beans"] * 3, "usage": ["figurative", "literal", "unknown"],
    })  # fmt: skip
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    options = dict(
        columns={"target": "sentence", "expression": "idiom", "label": "usage"},
        language="en",
        label_map={"figurative": "idiomatic", "literal": "literal"},
    )
    with pytest.raises(MalformedRowError, match=r"saved\[train\]:3: unknown label 'unknown'"):
        load_dataset("hf", tmp_path / "saved", **options)
    ex = load_dataset("hf", tmp_path / "saved", "train", on_error="skip", **options)
    assert [(e.id, e.label, e.split) for e in ex] == [
        ("train:0", "idiomatic", "train"),
        ("train:1", "literal", "train"),
    ]
    # a local folder of data files goes through datasets.load_dataset (no hub needed)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "test.jsonl").write_text(
        json.dumps({"expression": "a b", "target": "a b c", "label": "literal", "language": "gl"}) + "\n"
    )
    ex = load_dataset("hf", tmp_path / "files", "test")
    assert [(e.language, e.label, e.split) for e in ex] == [("gl", "literal", "test")]


def test_unknown_loader_and_bad_policy(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        load_dataset("dice", tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        load_dataset("vnc-tokens", tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="label must be one of"):
        Example(id="1", language="en", expression="a", target="a", label="maybe")


# ----- the shared real data -----


def test_semeval_shared_data_counts(shared_data):
    root = shared_data / "semeval2022_task2a"
    expected = {
        "train_zero_shot": (4491, {"idiomatic": 2535, "literal": 1956}, {"en": 3327, "pt": 1164}),
        "train_one_shot": (140, {"idiomatic": 60, "literal": 80}, {"en": 87, "pt": 53}),
        "dev": (739, {"idiomatic": 336, "literal": 403}, {"en": 466, "pt": 273}),
    }
    for split, (n, labels, languages) in expected.items():
        ex = load_dataset("semeval2022-2a", root, split)
        assert len(ex) == n and not ex.skipped
        assert ex.label_counts() == Counter(labels)
        assert Counter(e.language for e in ex) == Counter(languages)
        assert all(e.expression and e.target for e in ex)


def test_vnc_shared_data_counts(shared_data):
    ex = load_dataset("vnc-tokens", shared_data / "vnc_tokens")
    assert len(ex) == 2566 and ex.label_counts() == Counter({"idiomatic": 2016, "literal": 550})
    assert ex.excluded == Counter({"VNC label Q (unknown)": 413}) and not ex.skipped
    assert len(load_dataset("vnc-tokens", shared_data / "vnc_tokens", include_unknown=True)) == 2979
