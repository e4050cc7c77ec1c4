"""rerank-qlora bad inputs: every user error is one line on stderr with exit code 2 before any work; a loss
that turns non-finite stops training and no NaN adapter or checkpoint is written; an OpenAI-compatible teacher
that echoes the Authorization header leaks the API key nowhere (stderr, stdout, run directory)."""

from __future__ import annotations

import re

import pytest
from rerank_qlora_tiny import TINY as SHARED_TINY
from safetensors.torch import load_file

from rerank_qlora.cli import main
from shared_kernels.testing.auth_echo_server import auth_echo_server

TINY = [
    *SHARED_TINY,
    "model.tiny_pretrain_steps=2",
    "task.max_train_queries=4",
    "task.max_eval_queries=2",
    "task.max_validation_queries=0",
    "train.log_every=1",
    "refine.method=none",
    "rerank.max_new_tokens=4",
]

CASES = [
    (["train.lr=inf"], r"train.lr must be a finite number > 0, got inf"),
    (["train.lr=.nan"], r"train.lr must be a finite number > 0, got nan"),
    (["train.lr=-2e-4"], r"train.lr must be a finite number > 0"),
    (["train.lr=0"], r"train.lr must be a finite number > 0"),
    (["train.checkpoint_every=0"], r"train.checkpoint_every must be >= 1, got 0"),
    (["train.warmup_steps=-1"], r"train.warmup_steps must be >= 0"),
    (["train.weight_average=1.5"], r"train.weight_average must be in \[0, 1\]"),
    (["train.max_grad_norm=inf"], r"train.max_grad_norm must be a finite number >= 0"),
    (["model.tiny_heads=3"], r"model.tiny_heads \(3\) must divide model.tiny_hidden_size \(128\)"),
    (["model.tiny_heads=5", "model.tiny_hidden_size=160"], r"be 1 or even"),
    (["model.tiny_hidden_size=0"], r"model.tiny_hidden_size must be >= 1"),
    (["attention.tau=.nan"], r"attention.tau must be a finite number > 0"),
    (["attention.p_rope_fraction=-0.1"], r"attention.p_rope_fraction must be in \[0, 1\]"),
    (["refine.temperature=0"], r"refine.temperature must be a finite number > 0"),
    (["refine.threshold=2"], r"refine.threshold must be in \[0, 1\]"),
    (["refine.kl_beta=-1"], r"refine.kl_beta must be a finite number >= 0, got -1"),
    (
        ["refine.kl_beta=0.1"],
        r"refine.kl_beta applies to refine.method=grpo only, got method=none",
    ),
    (["refine.samples=0"], r"refine.samples must be >= 1"),
    (["rerank.k=0"], r"rerank.k must be >= 1"),
    (["rerank.max_new_tokens=-5"], r"rerank.max_new_tokens must be >= 1"),
    (["teacher.concurrency=0"], r"teacher.concurrency and teacher.pairs_per_query must be >= 1"),
    (["task.max_eval_queries=0"], r"task.max_train_queries and task.max_eval_queries must be >= 1"),
    (["teacher.kind=gpt"], r"'teacher.kind': expected one of"),
    (
        ["train.objective=label-listwise", "refine.method=grpo"],
        r"train.objective=label-listwise .* needs rerank.judge=forced and ",
    ),
    (["refine.method=reward-weighted"], r"train.objective=label-pointwise .* needs rerank.judge=forced and "),
    (
        ["train.objective=label-pointwise", "refine.method=none", "rerank.judge=generate"],
        r"needs rerank.judge=forced and refine.method=none",
    ),
    (["train.listwise_temperature=0"], r"train.listwise_temperature must be > 0, got 0"),
    (["model.trust_remote_code=false-ish"], r"'model.trust_remote_code': expected bool"),
    (["train.stpes=3"], r"did you mean 'train.steps'"),
    (["--config", "{missing}"], r"config file .*missing.yaml' does not exist"),
    (["--config", "{latin1}"], r"latin1.yaml:2: is not UTF-8 text"),
    (["--config", "{utf16}"], r"utf16.yaml:1: is UTF-16 text"),
    (["--config", "{binary}"], r"binary.yaml:1: holds a NUL byte"),
]


@pytest.mark.parametrize("args, match", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_config_is_one_line_exit_2_before_any_work(tmp_path, capsys, args, match):
    files = {
        "missing": tmp_path / "missing.yaml",
        "latin1": tmp_path / "latin1.yaml",
        "utf16": tmp_path / "utf16.yaml",
        "binary": tmp_path / "binary.yaml",
    }
    files["latin1"].write_bytes("model:\n  name_or_path: caf\xe9\n".encode("latin-1"))
    files["utf16"].write_bytes("train:\n  steps: 3\n".encode("utf-16"))
    files["binary"].write_bytes(b"\x00\x01steps: 3\n")
    run_dir = tmp_path / "run"
    assert main([*(a.format(**files) for a in args), f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rerank-qlora: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert not run_dir.exists()


def test_non_finite_loss_stops_and_saves_no_nan(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # finite but absurd: the first update moves the adapters by ~1e30 and the next loss is NaN/inf
    assert (
        main(
            [
                f"run_dir={run_dir}",
                "--no-progress",
                *TINY,
                "train.steps=4",
                "train.checkpoint_every=1",
                "train.max_grad_norm=0",
                "train.lr=1e30",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rerank-qlora: error: ") and ("loss is" in err[-1] or "NaN/inf" in err[-1]), err
    assert not (run_dir / "adapter").exists()
    for ckpt in (run_dir / "checkpoints").rglob("step-*"):
        assert all(t.isfinite().all() for t in load_file(ckpt / "model.safetensors").values()), ckpt


def test_openai_teacher_never_leaks_the_api_key(tmp_path, capsys, monkeypatch):
    key = "sk-rerank-qlora-secret-0123456789"
    monkeypatch.setenv("RQ_TEST_KEY", key)
    run_dir = tmp_path / "run"
    with auth_echo_server() as base_url:
        rc = main(
            [
                f"run_dir={run_dir}",
                "--no-progress",
                *TINY,
                "train.steps=1",
                "teacher.kind=openai",
                "rerank.judge=generate",
                f"teacher.base_url={base_url}",
                "teacher.api_key_env=RQ_TEST_KEY",
                "teacher.concurrency=1",
            ]
        )
    out = capsys.readouterr()
    assert rc == 2, out.err[-2000:]
    last = out.err.strip().splitlines()[-1]
    assert last.startswith("rerank-qlora: error: ") and "401" in last and "***" in last, last
    assert key not in out.err and key not in out.out
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
