"""The stdlib task is mined from files with `ast`: masking, kinds, deduplication, exclusions; split by
top-level module; deterministic and independent of what is imported; a split not asked for is never read."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest

from rerank_qlora.stdlib_task import build_stdlib_task, mine_units, read_source, split_of, stdlib_modules

FILES = {
    "alpha.py": '''
        """Module doc."""
        def quote_plus(s, safe=""):
            """Like quote_plus() but also replaces spaces with plus signs here."""
            return s.replace(" ", "+")
        def _private(x):
            """A private helper that is never part of the task at all."""
            return x
        def short():
            """Too short."""
        def doctested(x):
            """>>> doctested(1) returns one as you can see here
            """
        class HTTPServer(Base):
            """HTTPServer serves files over http from the current directory."""
            def serve_forever(self, poll=0.5):
                """Handle one request at a time until shutdown is called."""
                while True:
                    self.poll(poll)
            def _helper(self):
                pass
    ''',
    "beta/__init__.py": '''
        def copy_of_quote(s, safe=""):
            """Like quote_plus but a different summary for the same code."""
            return s.replace(" ", "+")
        def ambiguous(a):
            """Return the same summary text as another unit does."""
            return a
    ''',
    "beta/inner.py": '''
        def other(b):
            """Return the same summary text as another unit does."""
            return b + 1
        def held(c):
            """A held-out function whose file must be read only when asked."""
            return c
    ''',
    "test/test_alpha.py": 'def test_x():\n    """A test that is excluded from the library code."""\n',
    "encodings/cp1.py": 'def decode(x):\n    """Decode bytes with one of many near identical codecs."""\n',
}


@pytest.fixture
def fake_stdlib(tmp_path):
    for name, text in FILES.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


SPLIT = {"alpha": "train", "beta": "eval"}.__getitem__


def test_modules_exclude_tests_and_codecs(fake_stdlib):
    assert [m for m, _ in stdlib_modules(fake_stdlib)] == ["alpha", "beta", "beta.inner"]


def test_units_masked_kinds_and_documents(fake_stdlib):
    units = {u.docid: u for u in mine_units("alpha", read_source(fake_stdlib / "alpha.py"))}
    assert set(units) == {"alpha.quote_plus", "alpha.HTTPServer", "alpha.HTTPServer.serve_forever"}
    assert (
        units["alpha.quote_plus"].query
        == "Like this function() but also replaces spaces with plus signs here."
    )
    assert units["alpha.HTTPServer"].query.startswith("this class serves files")
    assert units["alpha.HTTPServer.serve_forever"].kind == "method"
    method = units["alpha.HTTPServer.serve_forever"].code
    assert (
        method.startswith("class HTTPServer(Base):") and "self.poll(poll)" in method and '"""' not in method
    )
    cls = units["alpha.HTTPServer"].code
    assert "def serve_forever(self, poll=0.5):\n        ..." in cls and "self.poll" not in cls
    assert "Handle one request" not in cls and "serves files" not in cls  # docstrings removed
    assert mine_units("broken", "def (:\n") == []


def test_task_dedup_split_and_reads(fake_stdlib):
    read = []
    task = build_stdlib_task(
        root=fake_stdlib, split=SPLIT, read=lambda p: read.append(p.name) or read_source(p)
    )
    assert sorted(read) == ["__init__.py", "alpha.py", "inner.py"]
    # identical code: the later unit (beta.copy_of_quote) is dropped; a shared summary: both queries dropped
    assert "beta.copy_of_quote" not in task.corpus and "q:beta.ambiguous" not in task.queries
    assert {"beta.ambiguous", "beta.inner.other"} <= set(task.corpus)  # still documents (distractors)
    assert task.train_qids == sorted(task.train_qids, key=lambda q: hashlib.sha256(q.encode()).hexdigest())
    assert set(task.train_qids) == {
        "q:alpha.quote_plus",
        "q:alpha.HTTPServer",
        "q:alpha.HTTPServer.serve_forever",
    }
    assert task.eval_qids == ["q:beta.inner.held"] and task.validation_qids == []
    assert set(task.train_docids) == {
        "alpha.quote_plus",
        "alpha.HTTPServer",
        "alpha.HTTPServer.serve_forever",
    }
    assert task.qrels["q:beta.inner.held"] == {"beta.inner.held": 2}
    capped = build_stdlib_task(root=fake_stdlib, split=SPLIT, max_train_queries=1)
    assert len(capped.train_qids) == 1 and capped.train_qids[0] in task.train_qids


def test_held_out_files_never_read_for_training(fake_stdlib):
    read = []
    task = build_stdlib_task(
        root=fake_stdlib, split=SPLIT, splits=("train",), read=lambda p: read.append(p) or read_source(p)
    )
    assert [p.name for p in read] == ["alpha.py"]
    assert task.eval_qids == [] and all(d.startswith("alpha.") for d in task.corpus)


def test_bad_arguments(fake_stdlib, tmp_path):
    with pytest.raises(ValueError, match="splits must be among"):
        build_stdlib_task(root=fake_stdlib, splits=("test",))
    with pytest.raises(ValueError, match="max_eval_queries must be >= 0"):
        build_stdlib_task(root=fake_stdlib, max_eval_queries=-1)
    with pytest.raises(ValueError, match="is not a directory"):
        build_stdlib_task(root=tmp_path / "missing")
    with pytest.raises(ValueError, match="not one of"):
        build_stdlib_task(root=fake_stdlib, split=lambda m: "test")


FINGERPRINT = """
import hashlib, json, sys
from rerank_qlora.stdlib_task import build_stdlib_task

def fingerprint():
    t = build_stdlib_task()
    parts = [t.corpus, t.queries, t.qrels, t.train_qids, t.validation_qids, t.eval_qids]
    blob = json.dumps(parts, sort_keys=True)
    return t, hashlib.sha256(blob.encode()).hexdigest()

assert "torch" not in sys.modules
task, before = fingerprint()
import torch  # patches inspect.getfile
_, after = fingerprint()
print(json.dumps({"same": before == after, "splits": [task.train_qids, task.validation_qids, task.eval_qids],
                  "documents": len(task.corpus)}))
"""


def test_real_stdlib_task_deterministic_and_import_state_independent():
    """Built in a fresh interpreter before and after importing torch (which patches `inspect`): the same
    task; >= 500 evaluation and >= 200 validation queries; no top-level module in two splits."""
    out = json.loads(
        subprocess.run([sys.executable, "-c", FINGERPRINT], capture_output=True, text=True, check=True).stdout
    )
    assert out["same"]
    train, val, ev = out["splits"]
    assert out["documents"] > 3000 and len(train) > 1000 and len(val) == 200 and len(ev) == 500
    tops = {
        s: {q[2:].split(".")[0] for q in qids}
        for s, qids in (("train", train), ("validation", val), ("eval", ev))
    }
    assert not tops["train"] & tops["validation"] and not tops["train"] & tops["eval"]
    assert not tops["validation"] & tops["eval"]
    assert all(split_of(t) == s for s, ts in tops.items() for t in ts)
