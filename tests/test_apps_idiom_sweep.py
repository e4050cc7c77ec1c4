"""idiom-sweep: shipped configs validate (also as idiomreason sweeps); a tiny sweep with the model loaded in
4 bits through nf4lora runs end to end, writes the table and plot, and a re-run reuses every prediction."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from idiom_sweep.cli import main
from idiom_sweep.config import IdiomSweepConfig
from idiom_sweep.recipe import sweep_config
from shared_kernels.runconfig import ConfigError, load_config

APP = Path(__file__).resolve().parents[1] / "apps" / "idiom-sweep"


@pytest.mark.parametrize("path", sorted((APP / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "idiom-sweep --config" in first
    cfg = load_config(IdiomSweepConfig, path)
    sweep = sweep_config(cfg)  # idiomreason's own validation
    assert len(sweep.models) == len(cfg.models) and sweep.conditions == cfg.conditions


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="models must list"):
        load_config(IdiomSweepConfig)
    with pytest.raises(ConfigError, match=r"'load_in_4bit': expected one of"):
        load_config(
            IdiomSweepConfig,
            overrides=["load_in_4bit=fp4", "models=[{name: a}]", "datasets=[{name: generic, path: x}]"],
        )
    with pytest.raises(ConfigError, match=r"'datasets\[0\].name'"):
        load_config(IdiomSweepConfig, overrides=["models=[{name: a}]", "datasets=[{name: dice, path: x}]"])


ROWS = [("He kicked the bucket last year.", "kick the bucket", "idiomatic"),
        ("She kicked the bucket across the yard.", "kick the bucket", "literal"),
        ("They spilled the beans at dinner.", "spill the beans", "idiomatic"),
        ("The cook spilled the beans on the floor.", "spill the beans", "literal"),
        ("It is raining cats and dogs.", "rain cats and dogs", "idiomatic")]  # fmt: skip


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "idioms.csv"
    path.write_text(
        "id,target,expression,label,language\n"
        + "".join(f"{i},{t},{e},{lab},en\n" for i, (t, e, lab) in enumerate(ROWS))
    )
    return path


def test_tiny_sweep_in_4bit_end_to_end(tmp_path, data, tiny_lm_dir, capsys):
    rows = ROWS
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"out_dir: {tmp_path / 'run'}\nload_in_4bit: nf4lora\nconditions: [direct]\nmax_new_tokens: 4\n"
        f"n_resamples: 20\nmodels:\n  - {{name: tiny-0.01B, path: {tiny_lm_dir}, reasoning: true,"
        f" options: {{batch_size: 5, dtype: float32}}}}\n"
        f"datasets:\n  - {{name: generic, path: {data}}}\n"
    )
    assert main(["--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4-bit: nf4lora" in out and "table:" in out
    run = tmp_path / "run"
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(rows)
    assert {p["model"] for p in preds} == {"tiny-0.01B"}
    for name in ("idiom-sweep.yaml", "config.yaml"):
        assert (run / name).is_file(), name
    assert list(run.glob("*.md")) and list(run.glob("*.csv"))

    # The 4-bit path really quantized the linears (every one but the LM head) with nf4lora.
    from idiom_sweep.recipe import nf4lora_backend
    from idiomreason import ModelSpec
    from nf4lora.lora import Linear4bit

    backend = nf4lora_backend(ModelSpec(name="t", path=str(tiny_lm_dir), options={"dtype": "float32"}))
    kinds = {type(m).__name__ for m in backend.model.modules()}
    assert Linear4bit.__name__ in kinds

    # A re-run finds every prediction cached: nothing is generated again.
    assert main(["--config", str(config), "--no-progress"]) == 0
    again = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(again) == len(preds)


class _CountingBackend:
    """Answers every prompt 'idiomatic' and counts the prompts it was asked to generate."""

    def __init__(self, calls):
        self.calls = calls

    def generate(self, prompts, max_new_tokens):
        from idiomreason.backends.base import Generation

        for i, _ in enumerate(prompts):
            self.calls.append(i)
            yield i, Generation("Answer: idiomatic", n_tokens=3, finish_reason="stop")

    def close(self):
        pass


def test_load_in_4bit_is_in_the_cache_key(tmp_path, data, monkeypatch):
    """load_in_4bit changes a model's outputs, so it travels in the model's options (which idiomreason
    hashes into the prediction key): a changed mode is a miss, an unchanged re-run all hits; http models
    ignore it."""
    import idiomreason.sweep
    from idiom_sweep.recipe import build_backend
    from idiomreason import run_sweep

    def run(mode):
        cfg = load_config(
            IdiomSweepConfig,
            overrides=[
                f"out_dir={tmp_path / 'run'}",
                "conditions=[direct]",
                "max_new_tokens=4",
                "n_resamples=10",
                f"load_in_4bit={mode}",
                f"datasets=[{{name: generic, path: '{data}'}}]",
                "models=[{name: m-1B, path: m}, {name: h-1B, backend: http, options: {base_url: 'http://x/v1'}}]",
            ],
        )
        calls = {"m-1B": [], "h-1B": []}
        run_sweep(
            sweep_config(cfg, progress=False), backend_factory=lambda spec: _CountingBackend(calls[spec.name])
        )
        return len(calls["m-1B"]), len(calls["h-1B"])

    assert run("none") == (len(ROWS), len(ROWS))
    assert run("none") == (0, 0)
    for mode in ("nf4lora", "bitsandbytes"):
        assert run(mode) == (len(ROWS), 0), mode  # the transformers model is regenerated, the http one is not
        assert run(mode) == (0, 0), mode
    assert run("none") == (0, 0)  # the full-precision predictions are still there

    # The backend builder takes the option out again: backends never see it; bitsandbytes = quantization 4bit.
    built = []
    monkeypatch.setattr(idiomreason.sweep, "default_backend_factory", built.append)
    cfg = load_config(
        IdiomSweepConfig,
        overrides=[
            "load_in_4bit=bitsandbytes",
            "models=[{name: m-1B, path: m}]",
            "datasets=[{name: generic, path: x}]",
        ],
    )
    (spec,) = sweep_config(cfg).models
    assert spec.options == {"load_in_4bit": "bitsandbytes"}
    build_backend(spec)
    assert built[0].options == {"quantization": "4bit"}


def _cli_case_config(tmp_path, data_text: str | bytes, **changes) -> list[str]:
    data = tmp_path / "d.csv"
    (data.write_bytes if isinstance(data_text, bytes) else data.write_text)(data_text)
    model = {"name": "m-1B", "backend": "http", "options": {"base_url": "http://127.0.0.1:9/v1"}}
    config = {
        "out_dir": str(tmp_path / "run"),
        "models": [model],
        "datasets": [{"name": "generic", "path": str(data)}],
        "conditions": ["direct"],
    }
    for key, value in changes.items():
        if key == "datasets":
            value = [{**d, "path": str(data) if d.get("path") == "D" else d["path"]} for d in value]
        if key == "options":
            model["options"].update(value)
        else:
            config[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(config))
    return ["--config", str(path), "--no-progress"]


GOOD = "id,target,expression,label,language\n1,He kicked the bucket.,kick the bucket,idiomatic,en\n"
SWEEP_CLI_CASES = [
    ("trust-remote-code-string", dict(options={"trust_remote_code": "false"}), GOOD,
     r"options.trust_remote_code must be bool, got 'false'"),
    ("max-new-tokens-negative", dict(max_new_tokens=-5), GOOD, r"max_new_tokens must be >= 1, got -5"),
    ("header-only-csv", {}, GOOD.splitlines()[0] + "\n", r"d.csv has a header line but no rows"),
    ("nul-byte-csv", {}, GOOD.replace("bucket.", "buck\x00et."), r"d.csv:2: holds a NUL byte"),
    ("utf16-csv", {}, GOOD.encode("utf-16"), r"d.csv:1: is UTF-16 text"),
    ("latin1-csv", {}, GOOD.replace("bucket.", "bucké.").encode("latin-1"), r"d.csv:2: is not UTF-8 text"),
    ("missing-dataset", {"datasets": [{"name": "generic", "path": "/nonexistent/d.csv"}]}, GOOD,
     r"/nonexistent/d.csv' is not a file"),
    ("trust-remote-code-int", dict(options={"trust_remote_code": 1}), GOOD,
     r"trust_remote_code must be bool"),
    ("max-new-tokens-string", dict(max_new_tokens="5"), GOOD, r"max_new_tokens"),
    ("max-new-tokens-zero", dict(max_new_tokens=0), GOOD, r"max_new_tokens must be >= 1"),
    ("no-models", dict(models=[]), GOOD, r"models"),
    ("no-datasets", dict(datasets=[]), GOOD, r"datasets"),
    ("unknown-condition", dict(conditions=["telepathy"]), GOOD, r"telepathy"),
    ("unknown-backend", dict(models=[{"name": "m-1B", "backend": "carrier-pigeon"}]), GOOD, r"backend"),
    ("unknown-loader", dict(datasets=[{"name": "nope", "path": "x"}]), GOOD, r"datasets\[0\].name"),
    ("unknown-key", dict(temperature_of_sun=5), GOOD, r"temperature_of_sun"),
    ("bad-load-in-4bit", dict(load_in_4bit="yes"), GOOD, r"load_in_4bit"),
    ("bad-on-error", dict(on_error="ignore"), GOOD, r"on_error"),
    ("negative-limit", {"datasets": [{"name": "generic", "path": "D", "limit": -3}]}, GOOD, r"limit"),
    ("negative-size", dict(models=[{"name": "m", "backend": "http", "size_b": -1,
                                    "options": {"base_url": "http://127.0.0.1:9/v1"}}]), GOOD, r"size_b"),
    ("missing-definitions-file", dict(definitions="/nonexistent/defs.csv"), GOOD, r"/nonexistent/defs.csv"),
]  # fmt: skip


@pytest.mark.parametrize("case", SWEEP_CLI_CASES, ids=[c[0] for c in SWEEP_CLI_CASES])
def test_cli_bad_inputs_exit_2_with_one_message(tmp_path, capsys, case):
    _, changes, data_text, pattern = case
    with pytest.raises(SystemExit) as exc_info:
        raise SystemExit(main(_cli_case_config(tmp_path, data_text, **changes)))
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(pattern, err), err
    assert "error: " in err.strip().splitlines()[-1]


def test_no_arguments_runs_the_offline_default(tmp_path, monkeypatch, capsys):
    """`idiom-sweep` alone: tiny models built here, SemEval-2022 2A dev (the real file when the shared data is
    here), all three conditions, the table and the plot; a re-run generates nothing."""
    monkeypatch.chdir(tmp_path)
    assert main(["--no-progress"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "idiom-sweep" / "offline-default"
    table = (run / "results.md").read_text()
    assert "tiny-64x2-reasoning" in table and "tiny-128x4-base" in table
    assert (run / "macro_f1_vs_size.png").read_bytes()[:4] == b"\x89PNG"
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    base = [p for p in preds if p["model"] == "tiny-128x4-base"]
    assert len(base) >= 2 * 64 and all(p["finish_reason"] == "loglik" and p["prediction"] for p in base)
    reasoning = [p for p in preds if p["model"] == "tiny-64x2-reasoning"]
    assert {p["condition"] for p in reasoning} >= {"direct.v1.0shot", "cot.v2.0shot"}
    assert all(p["generation_settings"]["max_new_tokens"] == 12 for p in preds)
    from shared_kernels.testing import shared_data_dir

    real = shared_data_dir() is not None and (shared_data_dir() / "semeval2022_task2a" / "dev.csv").is_file()
    assert ("the real SemEval-2022 Task 2A dev set" if real else "the bundled fixture") in out
    assert main(["--no-progress"]) == 0
    assert len((run / "predictions.jsonl").read_text().splitlines()) == len(preds)


def test_offline_default_falls_back_to_the_bundled_fixture(monkeypatch):
    import shared_kernels.testing
    from idiom_sweep.offline import semeval_dev_folder
    from idiomreason import load_dataset

    monkeypatch.setattr(shared_kernels.testing, "shared_data_dir", lambda: None)
    folder, source = semeval_dev_folder()
    assert "bundled fixture" in source
    examples = load_dataset("semeval2022-2a", folder, "dev")
    assert len(examples) == 24 and {e.language for e in examples} == {"en", "pt"}
    assert examples.label_counts()["idiomatic"] == 12


def test_help_example_is_accepted(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "max_new_tokens=2048" in capsys.readouterr().out
    cfg = load_config(
        IdiomSweepConfig,
        overrides=["max_new_tokens=2048", "models=[{name: a}]", "datasets=[{name: generic, path: x}]"],
    )
    assert cfg.max_new_tokens == 2048
