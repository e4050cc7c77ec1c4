"""End to end with a tiny real model: the transformers backend, the HTTP backend against a real
OpenAI-compatible server (transformers serve) on loopback, kill -9 and resume, and a sweep report."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from idiomreason import DatasetSpec, ModelSpec, SweepConfig, extract_label, load_dataset, macro_f1, run_sweep
from idiomreason.cli import main as cli_main
from idiomreason.prompts import TemplateLibrary, build_prompt
from shared_kernels.testing.openai_server import (
    save_tiny_chat_model,
)

DEV_ROWS = [
    ("EN", "big fish", "He is a big fish in a small pond.", "0"),
    ("EN", "big fish", "They caught a big fish in the lake.", "1"),
    ("EN", "cold feet", "She got cold feet before the wedding.", "0"),
    ("EN", "cold feet", "After the snow walk I had cold feet.", "1"),
    ("PT", "pé direito", "O pé direito da sala é alto.", "1"),
    ("PT", "pão duro", "Ele é um pão duro, nunca paga nada.", "0"),
    ("EN", "high life", "They enjoy the high life in Monaco.", "0"),
    ("PT", "mão de obra", "Falta mão de obra qualificada.", "0"),
    ("EN", "hot potato", "The budget is a political hot potato.", "0"),
    ("EN", "hot potato", "Careful, that hot potato burns.", "1"),
    ("PT", "sangue quente", "O réptil não tem sangue quente.", "1"),
    ("EN", "red tape", "Too much red tape slows us down.", "0"),
]


def _write_semeval(folder: Path, n: int = len(DEV_ROWS)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "dev.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["ID", "Language", "MWE", "Previous", "Target", "Next"])
        for i, (lang, mwe, target, _) in enumerate(DEV_ROWS[:n]):
            w.writerow([100 + i, lang, mwe, "Earlier that day." if i % 2 else "", target, ""])
    with open(folder / "dev_gold.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["ID", "DataID", "Language", "Label"])
        for i, (lang, _, _, label) in enumerate(DEV_ROWS[:n]):
            w.writerow([100 + i, f"dev.{lang}.{i}", lang, label])
    with open(folder / "train_one_shot.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["DataID", "Language", "MWE", "Setting", "Previous", "Target", "Next", "Label"])
        w.writerow(
            ["t1", "EN", "black sheep", "one_shot", "", "He is the black sheep of the family.", "", "0"]
        )
        w.writerow(["t2", "EN", "black sheep", "one_shot", "", "A black sheep grazed.", "", "1"])
        w.writerow(["t3", "PT", "olho gordo", "one_shot", "", "Ela tem olho gordo.", "", "0"])
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("idiomreason_tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _write_semeval(tmp_path_factory.mktemp("idiomreason_semeval"))


@pytest.fixture
def served(served_tiny_model):
    """The workspace's session-wide `transformers serve` of the tiny chat model (skips without the extra)."""
    return served_tiny_model


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _model(tiny_dir, name="tiny-0.5B", **options):
    return ModelSpec(
        name=name,
        path=str(tiny_dir),
        backend="transformers",
        reasoning=True,
        options={"dtype": "float32", "device": "cpu", "batch_size": 4, **options},
    )


def test_transformers_backend_end_to_end(tiny_dir, data_dir, tmp_path):
    config = SweepConfig(
        models=[_model(tiny_dir)], datasets=[DatasetSpec("semeval2022-2a", str(data_dir), "dev")],
        conditions=["direct", "cot"], out_dir=str(tmp_path / "run"), max_new_tokens=10, n_resamples=50,
        progress=False,
    )  # fmt: skip
    result = run_sweep(config)
    records = _lines(tmp_path / "run" / "predictions.jsonl")
    assert len(records) == 2 * len(DEV_ROWS)
    assert {(r["condition"], r["example_id"]) for r in records} == {
        (c, str(100 + i)) for c in ("direct.v1.0shot", "cot.v2.0shot") for i in range(len(DEV_ROWS))
    }
    for r in records:
        assert r["prediction"] == extract_label(r["prefix"] + r["output"])
        assert r["prefix"] == (
            "<think>\n\n</think>\n\n" if r["condition"].startswith("direct") else "<think>\n"
        )
        assert 1 <= r["n_tokens"] <= 10 and r["finish_reason"] in ("stop", "length")
    gold = {str(100 + i): ("idiomatic" if row[3] == "0" else "literal") for i, row in enumerate(DEV_ROWS)}
    assert all(r["gold"] == gold[r["example_id"]] for r in records)
    overall = {(row["condition"], row["language"]): row for row in result.rows}
    assert set(overall) == {(c, lang) for c in ("direct", "cot") for lang in ("all", "en", "pt")}
    direct = [r for r in records if r["condition"] == "direct.v1.0shot"]
    row = overall[("direct", "all")]
    assert row["n"] == len(DEV_ROWS) and row["n_unparseable"] == sum(r["prediction"] is None for r in direct)
    assert row["macro_f1"] == pytest.approx(
        macro_f1([r["gold"] for r in direct], [r["prediction"] for r in direct])
    )
    assert overall[("direct", "en")]["n"] + overall[("direct", "pt")]["n"] == len(DEV_ROWS)
    cm = {
        (g, p): row[f"cm_{g}_{p}"] for g in ("idiomatic", "literal") for p in ("idiomatic", "literal", "none")
    }
    assert cm == {
        (g, p or "none"): sum(r["gold"] == g and r["prediction"] == p for r in direct)
        for g in ("idiomatic", "literal")
        for p in ("idiomatic", "literal", None)
    }
    with open(result.csv_path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert "| semeval2022-2a:dev | tiny-0.5B | 0.5 | direct | all | 12 |" in result.markdown_path.read_text()


def test_batched_local_and_http_generation_agree(data_dir, served):
    """Greedy outputs are the same one prompt at a time, in left-padded batches, and through the server."""
    from idiomreason.backends.hf import TransformersBackend
    from idiomreason.backends.http import OpenAIHTTPBackend

    examples = load_dataset("semeval2022-2a", data_dir, "dev")[:7]
    template = TemplateLibrary().get("direct")
    prompts = [build_prompt(template, ex, reasoning=True) for ex in examples]  # prefilled think block
    tiny_dir = served.model_dir
    one = TransformersBackend(str(tiny_dir), dtype="float32", device="cpu", batch_size=1)
    local = dict(one.generate(prompts, 9))
    batched = dict(TransformersBackend(one.model, one.tokenizer, batch_size=4).generate(prompts, 9))
    http = OpenAIHTTPBackend(
        served.base_url, served.model, api="completions", tokenizer=str(tiny_dir), concurrency=2
    )
    remote = dict(http.generate(prompts, 9))
    http.close()
    assert sorted(local) == sorted(batched) == sorted(remote) == list(range(7))
    assert [batched[i].text for i in range(7)] == [local[i].text for i in range(7)]
    assert [remote[i].text for i in range(7)] == [local[i].text for i in range(7)]
    assert len({local[i].text for i in range(7)}) > 1  # the prompts really differ


def test_http_backend_end_to_end_through_the_cli(data_dir, served, tmp_path, capsys):
    out = tmp_path / "http-run"
    argv = ["eval", "--dataset", "semeval2022-2a", "--path", str(data_dir), "--split", "dev",
            "--model", served.model, "--model-name", "tiny-http", "--backend", "http",
            "--base-url", served.base_url, "--api", "chat", "--concurrency", "3",
            "--condition", "cot", "--condition", "cot:1shot", "--shots-split", "train_one_shot",
            "--max-new-tokens", "8", "--out", str(out), "--n-resamples", "20", "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    records = _lines(out / "predictions.jsonl")
    assert len(records) == 2 * len(DEV_ROWS)
    assert all(r["model"] == "tiny-http" and r["n_tokens"] is not None for r in records)
    printed = capsys.readouterr().out
    assert "| semeval2022-2a:dev | tiny-http |" in printed and "cot:1shot" in printed
    assert cli_main(argv) == 0  # a re-run finds everything done and appends nothing
    assert len(_lines(out / "predictions.jsonl")) == 2 * len(DEV_ROWS)


def test_kill_9_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path, served):
    data = _write_semeval(tmp_path / "data")
    out = tmp_path / "killed"
    argv = ["eval", "--dataset", "semeval2022-2a", "--path", str(data), "--split", "dev",
            "--model", served.model, "--model-name", "tiny", "--backend", "http",
            "--base-url", served.base_url, "--api", "chat",
            "--concurrency", "1", "--condition", "cot", "--max-new-tokens", "40",
            "--out", str(out), "--no-progress", "--n-resamples", "10"]  # fmt: skip
    predictions = out / "predictions.jsonl"
    child = subprocess.Popen(
        [sys.executable, "-m", "idiomreason.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if predictions.exists() and predictions.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.01)
        assert child.poll() is None, (
            f"the eval ended before it could be killed: {child.stderr.read()[-2000:]!r}"
        )
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    before = predictions.read_bytes()
    done = before.count(b"\n")
    assert 3 <= done < len(DEV_ROWS)
    with open(predictions, "ab") as f:  # and a write torn by the kill
        f.write(b'{"condition": "cot.v2.0shot", "dataset": "semeval2022-2a:dev", "example_id": "1')
    assert cli_main(argv) == 0
    after = predictions.read_bytes()
    assert after.startswith(before[: before.rfind(b"\n") + 1])  # finished work kept, byte for byte
    records = [json.loads(x) for x in after.splitlines()]
    keys = [(r["model"], r["condition"], r["dataset"], r["example_id"]) for r in records]
    assert len(keys) == len(set(keys)) == len(DEV_ROWS)


def test_sweep_report_of_a_small_run(tmp_path, tiny_tokenizer, data_dir):
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    small, big = tmp_path / "small", tmp_path / "big"
    tiny_causal_lm(save_dir=small, tokenizer=tiny_tokenizer, seed=1, hidden_size=32, num_layers=1)
    tiny_causal_lm(save_dir=big, tokenizer=tiny_tokenizer, seed=2, hidden_size=64, num_layers=2)
    config = SweepConfig.from_dict({
        "models": [
            {"name": "tiny-small", "path": str(small), "size_b": 0.1, "reasoning": False,
             "options": {"dtype": "float32", "device": "cpu", "batch_size": 8}},
            {"name": "tiny-big-R1", "path": str(big), "size_b": 0.3, "reasoning": True,
             "options": {"dtype": "float32", "device": "cpu", "batch_size": 8}},
        ],
        "datasets": [{"name": "semeval2022-2a", "path": str(data_dir), "split": "dev", "limit": 6}],
        "conditions": ["direct", "cot_definition"], "definitions_model": "tiny-small",
        "definition_max_new_tokens": 6, "out_dir": str(tmp_path / "sweep"), "max_new_tokens": 6,
        "n_resamples": 20, "progress": False,
    })  # fmt: skip
    result = run_sweep(config)
    overall = [r for r in result.rows if r["language"] == "all"]
    assert {(r["model"], r["condition"]) for r in overall} == {
        (m, c) for m in ("tiny-small", "tiny-big-R1") for c in ("direct", "cot_definition")
    }
    assert all(r["n_examples"] == 6 and r["n"] + r["n_not_predicted"] == 6 for r in overall)
    definitions = _lines(tmp_path / "sweep" / "definitions.jsonl")
    chosen = {ex.expression for ex in load_dataset("semeval2022-2a", data_dir, "dev")}
    assert {d["model"] for d in definitions} == {"tiny-small"} and {
        d["expression"] for d in definitions
    } <= chosen
    md = result.markdown_path.read_text()
    assert md.startswith("## Overall") and "## By language" in md and "tiny-big-R1" in md
    assert result.plot_path is not None and result.plot_path.read_bytes()[:4] == b"\x89PNG"

    built = []
    run_sweep(config, backend_factory=lambda spec: built.append(spec.name))  # everything is cached
    assert built == []
    assert cli_main(["report", str(tmp_path / "sweep")]) == 0


def test_core_import_pulls_in_no_torch():
    code = (
        "import sys, idiomreason, idiomreason.cli, idiomreason.backends.http; "
        "bad = [m for m in ('torch', 'transformers', 'triton', 'bitsandbytes') if m in sys.modules]; "
        "sys.exit(', '.join(bad) or 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"importing the core loaded: {done.stderr.strip()}"
