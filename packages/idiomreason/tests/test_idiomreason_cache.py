"""The prediction cache holds everything that can change an output (issue 19, item 4), decoding follows model
cards with n samples and a majority vote, log-likelihood scoring, and reports re-parse stored raw outputs."""

from __future__ import annotations

import json

import pytest

from idiomreason import ModelSpec, SweepConfig, run_sweep
from idiomreason.backends.base import Generation
from idiomreason.decoding import Decoding, majority_vote, resolve_decoding

ROWS = [("He kicked the bucket last year.", "kick the bucket", "idiomatic"),
        ("She kicked the bucket across the yard.", "kick the bucket", "literal"),
        ("They spilled the beans at dinner.", "spill the beans", "idiomatic"),
        ("The cook spilled the beans on the floor.", "spill the beans", "literal"),
        ("It is raining cats and dogs.", "rain cats and dogs", "idiomatic")]  # fmt: skip


class ScriptedBackend:
    """Answers from `script(prompt_text, seed_offset)`; counts the prompts it was asked to generate."""

    def __init__(self, script, calls):
        self.script, self.calls = script, calls

    def generate(self, prompts, max_new_tokens):
        for i, p in enumerate(prompts):
            self.calls.append((p.messages[-1]["content"], p.seed_offset, max_new_tokens))
            yield (
                i,
                Generation(
                    self.script(p.messages[-1]["content"], p.seed_offset), n_tokens=3, finish_reason="stop"
                ),
            )

    def close(self):
        pass


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        "id,target,expression,label,language\n"
        + "".join(f"{i},{t},{e},{lab},en\n" for i, (t, e, lab) in enumerate(ROWS))
    )
    return path


def _config(tmp_path, data, model=None, **changes):
    model = model or {"name": "m-1B", "path": "m", "backend": "http", "options": {"base_url": "http://x/v1"}}
    base = {
        "models": [model],
        "datasets": [{"name": "generic", "path": str(data)}],
        "conditions": ["direct"],
        "out_dir": str(tmp_path / "run"),
        "max_new_tokens": 16,
        "n_resamples": 10,
        "progress": False,
    }
    return SweepConfig.from_dict({**base, **changes})


def _run(config, script=lambda text, s: "Answer: idiomatic"):
    calls = []
    result = run_sweep(config, backend_factory=lambda spec: ScriptedBackend(script, calls))
    return result, calls


def test_unchanged_rerun_is_all_hits_and_each_setting_change_is_a_miss(tmp_path, data):
    _, calls = _run(_config(tmp_path, data))
    assert len(calls) == len(ROWS)
    _, calls = _run(_config(tmp_path, data))
    assert calls == []  # unchanged: every prediction comes from the cache
    changes = [
        {"max_new_tokens": 32},
        {"models": [{"name": "m-1B", "path": "m", "backend": "http", "options": {"base_url": "http://x/v1"},
                     "decoding": {"temperature": 0.7, "top_p": 0.9}}]},
        {"models": [{"name": "m-1B", "path": "m", "backend": "http", "options": {"base_url": "http://x/v1",
                                                                                "revision": "abc123"}}]},
        {"models": [{"name": "m-1B", "path": "other/m", "backend": "http", "options": {"base_url": "http://x/v1"}}]},
    ]  # fmt: skip
    for change in changes:
        _, calls = _run(_config(tmp_path, data, **change))
        assert len(calls) == len(ROWS), change
        _, calls = _run(_config(tmp_path, data, **change))
        assert calls == [], change
    # Transport-only options (server address, concurrency) do not change outputs: still hits.
    moved = {
        "name": "m-1B",
        "path": "m",
        "backend": "http",
        "options": {"base_url": "http://y/v1", "concurrency": 3},
    }
    _, calls = _run(_config(tmp_path, data, models=[moved]))
    assert calls == []


def test_a_changed_prompt_is_a_miss_and_the_report_uses_the_newest_record(tmp_path, data):
    defs = tmp_path / "defs.csv"
    defs.write_text(
        "expression,definition\nkick the bucket,to die\nspill the beans,to reveal a secret\n"
        "rain cats and dogs,to rain heavily\n"
    )
    config = _config(tmp_path, data, conditions=["direct", "cot_definition"], definitions=str(defs))
    _, calls = _run(config)
    assert len(calls) == 2 * len(ROWS)
    defs.write_text(defs.read_text().replace("to die", "to pass away"))  # one definition changed
    result, calls = _run(config, script=lambda text, s: "Answer: literal")
    assert len(calls) == 2 and all("to pass away" in c[0] for c in calls)  # only the 2 'kick the bucket' rows
    row = next(r for r in result.rows if r["condition"] == "cot_definition")
    assert row["n"] == len(ROWS) and row["cm_literal_literal"] + row["cm_idiomatic_literal"] == 2


def test_report_reparses_stored_outputs_and_counts_changed_labels(tmp_path, data):
    result, _ = _run(
        _config(tmp_path, data), script=lambda text, s: "Answer: 0" if "bucket" in text else "Answer: 1"
    )
    path = tmp_path / "run" / "predictions.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["prediction"] for r in records] == ["idiomatic", "idiomatic", "literal", "literal", "literal"]
    # Pretend the records were written by an older parser that could not read "Answer: 0/1".
    path.write_text("".join(json.dumps({**r, "prediction": None}) + "\n" for r in records))
    report = run_sweep(_config(tmp_path, data), generate=False)
    row = next(r for r in report.rows if r["language"] == "all")
    assert row["n_relabelled"] == len(ROWS) and row["n_unparseable"] == 0
    assert row["cm_idiomatic_idiomatic"] == 1 and row["cm_literal_literal"] == 1  # scored with the new labels
    assert f"current parser: {len(ROWS)} differ" in report.markdown_path.read_text()


def test_model_card_decoding_and_overrides():
    r1 = resolve_decoding("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", None)
    assert (r1.temperature, r1.top_p, r1.n_samples) == (0.6, 0.95, 1) and "model card" in r1.source
    base = resolve_decoding("Qwen/Qwen2.5-Math-7B", None)
    assert (base.temperature, base.top_p) == (0.0, None) and base.source.startswith("greedy")
    mine = resolve_decoding("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", {"n_samples": 5})
    assert (mine.temperature, mine.top_p, mine.n_samples) == (0.6, 0.95, 5)
    assert (
        ModelSpec(name="x", path="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B").backend_options()["temperature"]
        == 0.6
    )
    for bad, match in [
        ({"n_samples": 3}, "needs sampling"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"beams": 2}, "unknown keys"),
    ]:
        with pytest.raises(ValueError, match=match):
            resolve_decoding("Qwen/Qwen2.5-7B", bad)
    with pytest.raises(ValueError, match=r"options \['temperature'\] belong in decoding"):
        ModelSpec(name="x", options={"temperature": 0.6})


def test_the_report_states_each_model_decoding(tmp_path, data):
    r1 = {
        "name": "R1-1.5B",
        "path": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        "backend": "http",
        "reasoning": True,
        "options": {"base_url": "http://x/v1"},
    }
    mine = {
        "name": "mine-1B",
        "path": "m",
        "backend": "http",
        "options": {"base_url": "http://x/v1"},
        "decoding": {"temperature": 0.7},
    }
    base = {"name": "base-1B", "path": "Qwen/Qwen2.5-Math-1.5B", "backend": "http",
            "options": {"base_url": "http://x/v1"}}  # fmt: skip
    result, _ = _run(_config(tmp_path, data, models=[r1, mine, base]))
    markdown = result.markdown_path.read_text()
    assert "- R1-1.5B: DeepSeek-R1-Distill model card (temperature 0.6, top-p 0.95)\n" in markdown
    assert "- mine-1B: config {'temperature': 0.7} over greedy (no model-card setting)\n" in markdown
    assert "- base-1B: greedy (no model-card setting)\n" in markdown
    assert markdown.count("- R1-1.5B:") == 1  # once per model, not per row


@pytest.mark.parametrize("labels, expected", [
    (["idiomatic", "literal", "idiomatic"], "idiomatic"), (["literal", None, None], "literal"),
    (["idiomatic", "literal"], None), ([None, None], None),
    (["literal", "idiomatic", "literal", None], "literal"),
])  # fmt: skip
def test_majority_vote(labels, expected):
    assert majority_vote(labels) == expected


def test_n_samples_are_distinct_requests_and_vote(tmp_path, data):
    model = {
        "name": "m-1B",
        "path": "m",
        "backend": "http",
        "options": {"base_url": "http://x/v1"},
        "decoding": {"temperature": 0.8, "n_samples": 3},
    }
    # samples 0 and 2 say idiomatic, sample 1 literal -> idiomatic by 2 votes to 1
    result, calls = _run(
        _config(tmp_path, data, model=model),
        script=lambda text, s: "Answer: literal" if s == 1 else "Answer: idiomatic",
    )
    assert sorted(s for _, s, _ in calls) == sorted([0, 1, 2] * len(ROWS))
    records = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(r["samples"]) == 3 and r["prediction"] == "idiomatic" for r in records)
    assert records[0]["generation_settings"]["decoding"] == Decoding(0.8, None, 3, 0).settings()


def test_loglik_scoring_with_a_tiny_model(tmp_path, data, tiny_lm_dir):
    from idiomreason.backends.hf import TransformersBackend
    from idiomreason.prompts import Prompt

    model = {
        "name": "tiny-0.01B",
        "path": str(tiny_lm_dir),
        "scoring": "loglik",
        "options": {"dtype": "float32", "device": "cpu"},
    }
    result = run_sweep(_config(tmp_path, data, model=model))
    records = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == len(ROWS) and all(r["finish_reason"] == "loglik" for r in records)
    for r in records:
        assert r["prediction"] == max(r["scores"], key=r["scores"].get) and r["output"] == ""
    assert next(r for r in result.rows if r["language"] == "all")["scoring"] == "loglik"
    assert (
        "- tiny-0.01B: log-likelihood scoring of the answers (no generation)"
        in result.markdown_path.read_text()
    )
    # the scores are the summed token log-probabilities of the continuation, computed by hand here
    import torch

    backend = TransformersBackend(str(tiny_lm_dir), dtype="float32", device="cpu")
    prompt = Prompt(messages=[{"role": "user", "content": "Is it idiomatic?"}], prefill="Answer:")
    (got,) = backend.loglikelihood([prompt], [" literal"])
    ctx = backend.renderer.token_ids(backend.renderer.render(prompt))
    cont = backend.tokenizer(" literal", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = backend.model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    manual = sum(float(logits[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert got[0] == pytest.approx(manual, abs=1e-4) and got[0] < 0
    with pytest.raises(ValueError, match="loglik' needs the transformers backend"):
        ModelSpec(name="x", backend="http", scoring="loglik")
