"""lm-pretrain bad inputs: every user error is one line on stderr with exit code 2, before any work (nothing
trained, no checkpoint); a loss that turns non-finite stops the run and no NaN weights are saved; a run
directory whose checkpoint is past train.steps is refused instead of being reported as a shorter run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lm_pretrain.cli import main

TINY = [
    "model.n_layer=1",
    "model.d_model=16",
    "model.n_head=2",
    "train.seq_len=16",
    "train.batch_size=2",
    "train.micro_batch_size=2",
    "train.warmup_steps=0",
    "eval.length_multipliers=[1]",
    "eval.windows=1",
    "data.max_bytes=20000",
    "trackers=[none]",
]

CASES = [
    (["train.lr=inf"], r"train.lr must be a finite number > 0, got inf"),
    (["train.lr=.nan"], r"train.lr must be a finite number > 0, got nan"),
    (["train.lr=-1e-3"], r"train.lr must be a finite number > 0"),
    (["train.lr=0"], r"train.lr must be a finite number > 0"),
    (["model.n_head=3"], r"model.n_head \(3\) must divide model.d_model \(64\)"),
    (["model.d_model=36", "model.n_head=4"], r"needs an even head dim"),
    (["model.n_kv_head=3"], r"model.n_kv_head \(3\) must be >= 1 and divide model.n_head \(4\)"),
    (["model.n_kv_head=0"], r"model.n_kv_head \(0\) must be >= 1"),
    (["train.keep_checkpoints=0"], r"train.keep_checkpoints must be >= 1, got 0"),
    (["train.checkpoint_every=-1"], r"train.checkpoint_every must be >= 0"),
    (["train.warmup_steps=-5"], r"train.warmup_steps must be >= 0"),
    (["train.grad_clip=.nan"], r"train.grad_clip must be a finite number >= 0"),
    (["train.weight_decay=inf"], r"train.weight_decay must be a finite number >= 0"),
    (["model.tau=0"], r"model.tau must be a finite number > 0"),
    (["model.p_rope_base=-8"], r"model.p_rope_base must be a finite number > 0"),
    (["model.p_rope_fraction=1.5"], r"model.p_rope_fraction must be in \[0, 1\]"),
    (["data.max_bytes=0"], r"data.max_bytes must be >= 1"),
    (["train.steps=-1"], r"train.steps must be >= 1"),
    (["train.steps=ten"], r"'train.steps': expected int"),
    (["train.precision=fp16"], r"'train.precision': expected one of"),
    (["train.lrr=1"], r"did you mean 'train.lr'"),
    (["eval.length_multipliers=[]"], r"eval.length_multipliers must be non-empty"),
    (["--config", "{missing}"], r"config file .*missing.yaml' does not exist"),
    (["--config", "{latin1}"], r"latin1.yaml:3: is not UTF-8 text"),
    (["--config", "{utf16}"], r"utf16.yaml:1: is UTF-16 text"),
    (["--config", "{binary}"], r"binary.yaml:1: holds a NUL byte"),
    (["data.corpus={missing}"], r"data.corpus: .*missing.yaml' is neither 'stdlib'"),
]


@pytest.mark.parametrize("args, match", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_config_is_one_line_exit_2_before_any_work(tmp_path, capsys, args, match):
    files = {
        "missing": tmp_path / "missing.yaml",
        "latin1": tmp_path / "latin1.yaml",
        "utf16": tmp_path / "utf16.yaml",
        "binary": tmp_path / "binary.yaml",
    }
    files["latin1"].write_bytes("# lm-pretrain\ndata:\n  corpus: caf\xe9\n".encode("latin-1"))
    files["utf16"].write_bytes("train:\n  steps: 3\n".encode("utf-16"))
    files["binary"].write_bytes(b"\x00\x01train: 3\n")
    args = [a.format(**files) for a in args]
    run_dir = tmp_path / "run"
    assert main([*args, f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm-pretrain: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert (
        not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
    )  # before any work


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-m", "lm_pretrain.cli", "--no-progress", *TINY, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_non_finite_loss_stops_and_saves_no_nan(tmp_path):
    run_dir = tmp_path / "run"
    # finite but absurd: Adam's first update moves every weight by ~1e30, the next loss is NaN/inf
    done = _run(
        "train.lr=1e30",
        "train.steps=6",
        "train.checkpoint_every=1",
        "train.grad_clip=0",
        f"run_dir={run_dir}",
    )
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lm-pretrain: error: ") and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "loss is" in last or "NaN/inf" in last, last
    assert not (run_dir / "model.safetensors").exists()
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        assert all(t.isfinite().all() for t in load_file(ckpt / "model.safetensors").values()), ckpt


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first = _run("train.steps=4", "train.checkpoint_every=2", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = (run_dir / "model.safetensors").read_bytes()
    again = _run("train.steps=2", f"run_dir={run_dir}")
    assert again.returncode == 2, again.stderr[-3000:]
    last = again.stderr.strip().splitlines()[-1]
    assert (
        "step-00000004 is at step 4, past the 2 steps configured now" in last
        and "Traceback" not in again.stderr
    )
    assert (run_dir / "model.safetensors").read_bytes() == before  # the finished model is untouched
    assert Path(run_dir / "checkpoints" / "step-00000004").is_dir()
