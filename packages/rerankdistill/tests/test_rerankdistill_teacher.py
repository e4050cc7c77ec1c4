"""Teacher store (append-only, crash-safe), offline teacher, HTTP backend retries/accounting, real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from rerankdistill.backends.openai_http import OpenAIChatBackend, TeacherRequestError
from rerankdistill.labels import parse_relevance
from rerankdistill.teacher import Pair, QrelsTeacher, TeacherRecord, TeacherStore, generate_teacher_outputs

PAIRS = [Pair(str(q), f"d{d}", f"query {q}", f"document {d} text") for q in range(3) for d in range(4)]
QRELS = {"0": {"d0": 2, "d1": 1}, "1": {"d2": 3, "d3": -1}}


def test_offline_teacher_store_and_resume(tmp_path):
    path = tmp_path / "teacher.jsonl"
    teacher = QrelsTeacher(QRELS)
    with TeacherStore(path) as store:
        stats = generate_teacher_outputs(PAIRS[:5], teacher, store, progress=False)
    assert stats.done == 5 and stats.unparseable == 0
    with TeacherStore(path) as store:
        stats = generate_teacher_outputs(PAIRS, teacher, store, progress=False)
        assert stats.skipped_existing == 5 and stats.done == len(PAIRS) - 5
        labels = {(r.qid, r.docid): r.label for r in store.records.values()}
    assert labels[("0", "d0")] == 2 and labels[("0", "d1")] == 1 and labels[("1", "d2")] == 2
    assert labels[("1", "d3")] == 0 and labels[("2", "d0")] == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(PAIRS) and all(r["teacher"] == "offline-qrels-oracle" for r in rows)
    assert all("[offline teacher" in r["text"] for r in rows)


def test_offline_teacher_explanation_modes():
    per_label, fixed = QrelsTeacher(QRELS), QrelsTeacher(QRELS, explanation="fixed")
    assert len({per_label.explanation(g) for g in (0, 1, 2)}) == 3  # the label shows in the sentence
    assert len({fixed.explanation(g) for g in (0, 1, 2)}) == 1  # only the label line decides
    assert fixed.name != per_label.name  # stored outputs of the two never mix
    assert parse_relevance(fixed.text_for("0", "d0")) == 2 and parse_relevance(fixed.text_for("1", "d3")) == 0
    with pytest.raises(ValueError, match="explanation"):
        QrelsTeacher(QRELS, explanation="short")
    # evidence: computed from the pair, the same whatever the label; the label line still decides
    ev = QrelsTeacher(QRELS, explanation="evidence")
    assert ev.name.startswith("offline-qrels-oracle-evidence-v") and ev.name not in (
        fixed.name,
        per_label.name,
    )
    texts = [c.text for c in ev.complete_pairs(PAIRS[:2])]
    assert texts[0] == "Matches: none (0 of 1 query words). Relevance Label: 2 ##"
    assert (
        ev.explanation(0, "sort the list", "def sort_list(xs): return sorted(xs)")
        == ev.explanation(2, "sort the list", "def sort_list(xs): return sorted(xs)")
        == (
            "Matches: sort, list (2 of 2 query words). Defines sort_list. Calls sorted. "
            "Name sort_list spells: sort, list (2 of 2 query words)."
        )
    )


def test_store_repairs_torn_tail_and_rejects_corruption(tmp_path):
    path = tmp_path / "t.jsonl"
    with TeacherStore(path) as store:
        store.append(TeacherRecord("1", "a", "t", "x Relevance Label: 1", 1))
        store.append(TeacherRecord("1", "b", "t", "y", None))
        with pytest.raises(ValueError, match="already stored"):
            store.append(TeacherRecord("1", "b", "t", "y", None))
    good = path.read_bytes()
    path.write_bytes(good + b'{"qid": "1", "docid": "c", "tea')  # a write torn by kill -9
    with TeacherStore(path) as store:
        assert len(store) == 2 and store.repaired_bytes > 0
    assert path.read_bytes() == good
    path.write_bytes(good.replace(b'"docid": "a"', b'"docid": "a"oops', 1))
    with pytest.raises(ValueError, match=r"t.jsonl:1: corrupt teacher record"):
        TeacherStore(path)
    path.write_bytes(good + good)
    with pytest.raises(ValueError, match=r"t.jsonl:3: duplicate record"):
        TeacherStore(path)


def test_readers_never_take_the_writers_lock(tmp_path):
    """Every process of a distributed run reads the finished store at once: `TeacherStore.read` takes no lock,
    skips (does not repair) a torn tail, and equals what the writer sees; a second writer is still refused."""
    from shared_kernels.appendfile import FileLockedError

    path = tmp_path / "t.jsonl"
    with TeacherStore(path) as store:
        store.append(TeacherRecord("1", "a", "t", "x Relevance Label: 1", 1))
        store.append(TeacherRecord("2", "b", "t", "y", None))
        with pytest.raises(FileLockedError):
            TeacherStore(path)
        assert TeacherStore.read(path) == store.records  # while the writer holds the lock
    torn = path.read_bytes() + b'{"qid": "3"'
    path.write_bytes(torn)
    readers = [TeacherStore.read(path) for _ in range(2)]
    assert readers[0] == readers[1] and sorted(readers[0]) == [("1", "a", "t"), ("2", "b", "t")]
    assert path.read_bytes() == torn  # a reader never repairs


def test_duplicate_pairs_and_empty_queries_rejected_before_any_call(tmp_path):
    with TeacherStore(tmp_path / "t.jsonl") as store:
        with pytest.raises(ValueError, match="listed twice"):
            generate_teacher_outputs([PAIRS[0], PAIRS[0]], QrelsTeacher(QRELS), store, progress=False)
        with pytest.raises(ValueError, match="empty query"):
            generate_teacher_outputs(
                [PAIRS[0], Pair("9", "d", " ", "doc")], QrelsTeacher(QRELS), store, progress=False
            )
        assert len(store) == 0


def _chat_reply(text: str, p: int = 7, c: int = 3) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "choices": [{"message": {"content": text}}],
            "usage": {"prompt_tokens": p, "completion_tokens": c},
        },
    )


def test_http_backend_retries_accounts_tokens_and_hides_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_TEACHER_KEY", "sk-secret-value")
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        assert request.headers["authorization"] == "Bearer sk-secret-value"
        body = json.loads(request.content)
        assert body["temperature"] == 0.0 and body["model"] == "m"
        if calls["n"] % 3 == 1:  # every pair's first try fails with a retryable status
            return httpx.Response(503 if calls["n"] % 2 else 429, headers={"retry-after": "0"})
        return _chat_reply("Looks on topic. Relevance Label: 1 ## trailing")

    backend = OpenAIChatBackend(
        "http://teacher.invalid/v1",
        "m",
        api_key_env="TEST_TEACHER_KEY",
        backoff=0.001,
        transport=httpx.MockTransport(handler),
    )
    assert "sk-secret" not in repr(backend)
    with TeacherStore(tmp_path / "t.jsonl") as store:
        stats = generate_teacher_outputs(PAIRS[:4], backend, store, concurrency=1, progress=False)
        assert {r.label for r in store.records.values()} == {1}
        assert all(r.text.endswith("Relevance Label: 1") for r in store.records.values())
    assert stats.prompt_tokens == 28 and stats.completion_tokens == 12 and backend.retries >= 2
    assert "sk-secret" not in (tmp_path / "t.jsonl").read_text()


def test_http_backend_retries_timeouts(tmp_path):
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise httpx.ReadTimeout("slow", request=request)
        return _chat_reply("ok Relevance Label: 0")

    backend = OpenAIChatBackend(
        "http://teacher.invalid/v1", "m", backoff=0.001, transport=httpx.MockTransport(handler)
    )
    with TeacherStore(tmp_path / "t.jsonl") as store:
        generate_teacher_outputs(PAIRS[:1], backend, store, progress=False)
        assert [r.label for r in store.records.values()] == [0]
    assert backend.retries == 2 and calls["n"] == 3
    dead = OpenAIChatBackend(
        "http://teacher.invalid/v1",
        "m",
        backoff=0.001,
        max_retries=1,
        transport=httpx.MockTransport(lambda r: (_ for _ in ()).throw(httpx.ConnectError("x"))),
    )
    with (
        TeacherStore(tmp_path / "u.jsonl") as store,
        pytest.raises(TeacherRequestError, match="ConnectError after 2"),
    ):
        generate_teacher_outputs(PAIRS[:1], dead, store, progress=False)


def test_http_backend_gives_up_on_client_errors(tmp_path):
    backend = OpenAIChatBackend(
        "http://teacher.invalid/v1",
        "m",
        backoff=0.001,
        transport=httpx.MockTransport(lambda r: httpx.Response(400, text="bad model")),
    )
    with (
        TeacherStore(tmp_path / "t.jsonl") as store,
        pytest.raises(TeacherRequestError, match="answered 400"),
    ):
        generate_teacher_outputs(PAIRS[:2], backend, store, progress=False)
    flaky = OpenAIChatBackend(
        "http://teacher.invalid/v1",
        "m",
        backoff=0.001,
        max_retries=2,
        transport=httpx.MockTransport(lambda r: httpx.Response(500)),
    )
    with (
        TeacherStore(tmp_path / "u.jsonl") as store,
        pytest.raises(TeacherRequestError, match="after 3 tries"),
    ):
        generate_teacher_outputs(PAIRS[:1], flaky, store, progress=False)
    with pytest.raises(ValueError, match="base_url"):
        OpenAIChatBackend("localhost:8000", "m")


_CHILD = textwrap.dedent("""
    import sys
    from rerankdistill.backends.openai_http import OpenAIChatBackend
    from rerankdistill.teacher import Pair, TeacherStore, generate_teacher_outputs
    base_url, model, path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    pairs = [
        Pair(str(i // 4), f"d{i}", f"question number {i // 4}", f"some text about topic {i}")
        for i in range(n)
    ]
    backend = OpenAIChatBackend(base_url, model, name="tiny", max_tokens=6)
    with TeacherStore(path) as store:
        generate_teacher_outputs(pairs, backend, store, concurrency=2, progress=False)
""")


@pytest.mark.slow
def test_real_server_generation_survives_sigkill(tmp_path, served_tiny_model):
    path, n = tmp_path / "teacher.jsonl", 16
    args = [
        sys.executable,
        "-c",
        _CHILD,
        served_tiny_model.base_url,
        served_tiny_model.model,
        str(path),
        str(n),
    ]
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.05)
    assert child.poll() is None, child.stderr.read().decode()[-2000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    before = path.read_bytes()
    done_before = before.count(b"\n")
    assert 3 <= done_before < n
    result = subprocess.run(args, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    after = path.read_bytes()
    complete_part = before[: before.rfind(b"\n") + 1]
    assert after.startswith(complete_part)  # nothing rewritten, only appended
    rows = [json.loads(line) for line in after.decode().splitlines()]
    keys = [(r["qid"], r["docid"], r["teacher"]) for r in rows]
    assert len(keys) == len(set(keys)) == n  # nothing lost, nothing duplicated
    assert all(r["completion_tokens"] > 0 and r["prompt_tokens"] > 0 for r in rows)


@pytest.mark.slow
def test_http_teacher_equals_local_greedy_generation(tmp_path, served_tiny_model):
    from rerankdistill.backends.hf import TransformersBackend, load_causal_lm
    from rerankdistill.labels import INTERANK_PROMPT

    pairs = PAIRS[:3]
    http = OpenAIChatBackend(
        served_tiny_model.base_url, served_tiny_model.model, name="tiny-http", max_tokens=6
    )
    with TeacherStore(tmp_path / "t.jsonl") as store:
        stats = generate_teacher_outputs(pairs, http, store, concurrency=3, progress=False)
        texts = [store.records[(p.qid, p.docid, "tiny-http")].text for p in pairs]
    model, tok = load_causal_lm(served_tiny_model.model_dir, dtype="float32", device="cpu")
    local = TransformersBackend(model, tok, max_new_tokens=6, batch_size=1)
    expected = local.complete_batch([INTERANK_PROMPT.messages(p.query, p.document) for p in pairs])
    assert texts == [c.text for c in expected]
    assert stats.completion_tokens == sum(c.completion_tokens for c in expected)


def test_a_backend_without_a_completion_method_is_refused(tmp_path):
    class NameOnly:
        name = "name-only"

    with (
        TeacherStore(tmp_path / "t.jsonl") as store,
        pytest.raises(TypeError, match="NameOnly has none of acomplete, complete_pairs, complete_batch"),
    ):
        generate_teacher_outputs(PAIRS[:1], NameOnly(), store, progress=False)
