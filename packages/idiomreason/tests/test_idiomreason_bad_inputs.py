"""Bad-input table: every public loader, the definitions/template/config readers and both CLIs (idiomreason,
idiom-sweep) answer a user's mistake with one clear error naming the file (and line) or the option, exit
code 2 from a CLI, never a traceback and never a silent empty or wrong result."""

from __future__ import annotations

import json

import pytest

from idiomreason import SweepConfig, load_dataset
from idiomreason.cli import main as idiomreason_main
from idiomreason.definitions import load_definitions
from idiomreason.loaders import load_generic, load_magpie, load_semeval2022_2a, load_vnc_tokens
from idiomreason.prompts import PromptTemplate

SEMEVAL_HEADER = "DataID,Language,MWE,Setting,Previous,Target,Next,Label\n"
SEMEVAL_ROW = "t.1,EN,big fish,zero_shot,,He is a big fish here.,,0\n"
GENERIC = "id,target,expression,label,language\n1,He kicked the bucket.,kick the bucket,idiomatic,en\n"
MAGPIE_ROW = '{"idiom": "spill the beans", "sentence": "She spilled the beans.", "usage": "figurative"}\n'
MODEL = {"name": "m-1B", "backend": "http", "options": {"base_url": "http://127.0.0.1:9/v1"}}


def _write(tmp_path, name, data):
    path = tmp_path / name
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


# (case id, file name, content, loader call, error type, message pattern)
LOADER_CASES = [
    ("semeval-header-only", "train_zero_shot.csv", SEMEVAL_HEADER,
     lambda p: load_semeval2022_2a(p), ValueError, r"train_zero_shot.csv has a header line but no rows"),
    ("semeval-nul-byte", "train_zero_shot.csv",
     SEMEVAL_HEADER + SEMEVAL_ROW.replace("fish here", "fi\x00sh here"),
     lambda p: load_semeval2022_2a(p), ValueError, r"train_zero_shot.csv:2: holds a NUL byte"),
    ("semeval-latin1", "train_zero_shot.csv",
     (SEMEVAL_HEADER + SEMEVAL_ROW.replace("big fish", "pé")).encode("latin-1"),
     lambda p: load_semeval2022_2a(p), ValueError, r"train_zero_shot.csv:2: is not UTF-8 text \(byte 0xe9"),
    ("semeval-utf16", "train_zero_shot.csv", (SEMEVAL_HEADER + SEMEVAL_ROW).encode("utf-16"),
     lambda p: load_semeval2022_2a(p), ValueError, r"train_zero_shot.csv:1: is UTF-16 text"),
    ("semeval-utf16-no-bom", "train_zero_shot.csv", (SEMEVAL_HEADER + SEMEVAL_ROW).encode("utf-16-le"),
     lambda p: load_semeval2022_2a(p), ValueError,
     r"train_zero_shot.csv:1: holds a NUL byte: binary data or UTF-16"),
    ("semeval-binary", "train_zero_shot.csv", bytes(range(256)) * 4,
     lambda p: load_semeval2022_2a(p), ValueError, r"train_zero_shot.csv:2: is not UTF-8 text"),
    ("semeval-empty-file", "train_zero_shot.csv", "",
     lambda p: load_semeval2022_2a(p), ValueError, r"train_zero_shot.csv is empty"),
    ("semeval-missing", "absent.csv", None,
     lambda p: load_semeval2022_2a(p), FileNotFoundError, r"absent.csv"),
    ("generic-header-only", "d.csv", GENERIC.splitlines()[0] + "\n",
     lambda p: load_generic(p), ValueError, r"d.csv has a header line but no rows"),
    ("generic-blank-rows-only", "d.csv", GENERIC.splitlines()[0] + "\n\n ,,,,\n",
     lambda p: load_generic(p), ValueError, r"d.csv has a header line but no rows"),
    ("generic-nul-tsv", "d.tsv", GENERIC.replace(",", "\t").replace("bucket.", "buck\x00et."),
     lambda p: load_generic(p), ValueError, r"d.tsv:2: holds a NUL byte"),
    ("generic-suffix", "d.txt", GENERIC, lambda p: load_generic(p), ValueError, r"must end in .csv"),
    ("generic-split-matches-nothing", "d.csv",
     GENERIC.replace("language\n", "language,split\n").replace(",en\n", ",en,train\n"),
     lambda p: load_dataset("generic", p, "test"), ValueError,
     r"d.csv: no examples to evaluate in split 'test'"),
    ("magpie-empty", "m.jsonl", "\n\n", lambda p: load_magpie(p), ValueError, r"m.jsonl has no records"),
    ("magpie-latin1", "m.jsonl",
     MAGPIE_ROW.replace("beans", "fe\u0301ijão").encode("latin-1", "replace").replace(b"?", b"\xe3"),
     lambda p: load_magpie(p), ValueError, r"m.jsonl:1: is not UTF-8 text"),
    ("vnc-nul", "cook_dataset.tok", "I||blow||whistle||He blew the whis\x00tle .\n",
     lambda p: load_vnc_tokens(p), ValueError, r"cook_dataset.tok:1: holds a NUL byte"),
    ("vnc-only-unknown", "cook_dataset.tok", "Q||blow||whistle||He blew the whistle .\n",
     lambda p: load_dataset("vnc-tokens", p), ValueError, r"no examples to evaluate"),
    ("definitions-latin1", "defs.csv", "expression,definition\npé,foot\n".encode("latin-1"),
     load_definitions, ValueError, r"defs.csv:2: is not UTF-8 text"),
    ("definitions-bad-json", "defs.json", '{"a": "b",\n  oops}',
     load_definitions, ValueError, r"defs.json:2: invalid JSON"),
    ("definitions-jsonl-fields", "defs.jsonl", '{"expression": "a"}\n', load_definitions, ValueError,
     r"defs.jsonl:1: needs 'expression' and 'definition'"),
    ("definitions-header-only", "defs.csv", "expression,definition\n",
     load_definitions, ValueError, r"defs.csv: no definitions"),
    ("definitions-short-row", "defs.csv", "expression,definition\na\n",
     load_definitions, ValueError, r"defs.csv:2"),
    ("template-yaml-syntax", "t.yaml", "name: t\nversion: 1\nuser: [unclosed\n",
     PromptTemplate.from_yaml, ValueError, r"t.yaml:\d+: invalid YAML"),
    ("template-placeholder", "t.yaml", "name: t\nversion: 1\nuser: 'Is {expresion} idiomatic?'\n",
     PromptTemplate.from_yaml, ValueError, r"t.yaml: bad placeholder .*expresion"),
    ("template-string-bool", "t.yaml",
     "name: t\nversion: 1\nneeds_definition: 'false'\nuser: '{expression}'\n",
     PromptTemplate.from_yaml, ValueError, r"needs_definition must be true or false"),
    ("sweep-yaml-utf16", "s.yaml", "models: []\n".encode("utf-16"),
     SweepConfig.from_yaml, ValueError, r"s.yaml:1: is UTF-16 text"),
    ("sweep-yaml-not-mapping", "s.yaml", "- a\n- b\n",
     SweepConfig.from_yaml, ValueError, r"s.yaml: a sweep config must be a mapping"),
]  # fmt: skip


@pytest.mark.parametrize("case", LOADER_CASES, ids=[c[0] for c in LOADER_CASES])
def test_loader_bad_inputs(tmp_path, case):
    _, name, content, call, error, pattern = case
    path = tmp_path / name if content is None else _write(tmp_path, name, content)
    with pytest.raises(error, match=pattern) as info:
        call(path)
    assert "\n" not in str(info.value)


def _sweep(**changes):
    data = {"models": [MODEL], "datasets": [{"name": "generic", "path": "x.csv"}], **changes}
    return data


CONFIG_CASES = [
    ("trust-remote-code-string",
     _sweep(models=[{**MODEL, "options": {**MODEL["options"], "trust_remote_code": "false"}}]),
     r"options.trust_remote_code must be bool, got 'false'"),
    ("trust-remote-code-int", _sweep(models=[{**MODEL, "options": {"trust_remote_code": 1}}]),
     r"options.trust_remote_code must be bool"),
    ("max-new-tokens-negative", _sweep(max_new_tokens=-5), r"max_new_tokens must be >= 1, got -5"),
    ("max-new-tokens-string", _sweep(max_new_tokens="5"), r"max_new_tokens must be int, got '5'"),
    ("max-new-tokens-bool", _sweep(max_new_tokens=True), r"max_new_tokens must be int, got True"),
    ("reasoning-string", _sweep(models=[{**MODEL, "reasoning": "yes"}]),
     r"reasoning must be bool, got 'yes'"),
    ("size-negative", _sweep(models=[{**MODEL, "size_b": -1}]), r"size_b must be a positive number"),
    ("limit-zero", _sweep(datasets=[{"name": "generic", "path": "x.csv", "limit": 0}]),
     r"limit must be >= 1"),
    ("limit-string", _sweep(datasets=[{"name": "generic", "path": "x.csv", "limit": "10"}]),
     r"limit must be int or null"),
    ("unknown-key", _sweep(max_tokens=5), r"unknown keys \['max_tokens'\]"),
    ("no-models", _sweep(models=[]), r"at least one model"),
    ("chunk-size-zero", _sweep(chunk_size=0), r"chunk_size must be >= 1"),
]  # fmt: skip


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_sweep_config_bad_values(case):
    _, data, pattern = case
    with pytest.raises(ValueError, match=pattern):
        SweepConfig.from_dict(data)


def _good_csv(tmp_path):
    return _write(tmp_path, "good.csv", GENERIC)


LATIN1_CSV = GENERIC.replace("bucket.", "bucké.").encode("latin-1")
EVAL = ["eval", "--dataset", "generic", "--model", "m", "--no-progress", "--condition", "direct"]


def _eval(t, *extra):
    """`idiomreason eval` on a good CSV in `t`, writing to `t/o`, with `extra` arguments."""
    return [*EVAL, "--path", str(_good_csv(t)), "--out", str(t / "o"), *extra]


CLI_CASES = [
    ("header-only-csv",
     lambda t: [*EVAL, "--path", str(_write(t, "h.csv", GENERIC.splitlines()[0] + "\n")),
                "--out", str(t / "o")],
     r"h.csv has a header line but no rows"),
    ("latin1-csv",
     lambda t: [*EVAL, "--path", str(_write(t, "l.csv", LATIN1_CSV)),
                "--out", str(t / "o")],
     r"l.csv:2: is not UTF-8 text"),
    ("backend-options-not-json", lambda t: _eval(t, "--backend-options", "{x"),
     r"--backend-options must be a JSON object"),
    ("trust-remote-code-string",
     lambda t: _eval(t, "--backend-options", json.dumps({"trust_remote_code": "false"})),
     r"options.trust_remote_code must be bool, got 'false'"),
    ("max-new-tokens", lambda t: _eval(t, "--max-new-tokens", "-5"), r"max_new_tokens must be >= 1, got -5"),
    ("limit", lambda t: _eval(t, "--limit", "0"), r"limit must be >= 1"),
    ("http-without-url", lambda t: _eval(t, "--backend", "http"), r"needs options\['base_url'\]"),
    ("missing-definitions",
     lambda t: [*EVAL[:-1], "cot_definition", "--path", str(_good_csv(t)), "--out", str(t / "o"),
                "--definitions", str(t / "nope.csv")],
     r"No such file or directory: .*nope.csv"),
    ("decoding-greedy-samples", lambda t: _eval(t, "--decoding", json.dumps({"n_samples": 3})),
     r"n_samples=3 needs sampling"),
    ("loglik-over-http", lambda t: _eval(t, "--backend", "http", "--scoring", "loglik"),
     r"loglik' needs the transformers backend"),
    ("definitions-of-without-file", lambda t: _eval(t, "--definitions-of", "big"),
     r"definitions_of needs definitions"),
    ("sweep-missing-config", lambda t: ["sweep", str(t / "nope.yaml")],
     r"No such file or directory: .*nope.yaml"),
    ("sweep-bad-override", lambda t: ["sweep", str(_write(t, "s.yaml", "models: []\n")), "max_new_tokens"],
     r"override must look like key=value"),
    ("sweep-string-bool",
     lambda t: ["sweep", str(_write(t, "s.yaml", json.dumps(
         {"models": [{"name": "m", "options": {"trust_remote_code": "false"}}],
          "datasets": [{"name": "generic", "path": "x.csv"}]})))],
     r"trust_remote_code must be bool"),
    ("report-not-a-run", lambda t: ["report", str(t)], r"config.yaml not found"),
]  # fmt: skip


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_idiomreason_cli_bad_inputs(tmp_path, capsys, case):
    _, argv, pattern = case
    assert idiomreason_main(argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("idiomreason ") and ": error: " in err[0]
    assert __import__("re").search(pattern, err[0]), err[0]
