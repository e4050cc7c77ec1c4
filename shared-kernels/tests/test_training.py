"""The shared training loop: 2 DDP processes (gloo, under accelerate) take the same steps as one; a run
SIGKILLed after a checkpoint resumes to the bitwise result of an uninterrupted one; the first non-finite loss
stops the run before the optimizer step and leaves only finite checkpoints; settings are checked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shared_kernels.checkpoint import CheckpointManager
from shared_kernels.testing.gloo import run_worker
from shared_kernels.training import LoopSettings, NonFiniteLossError, shard_window

HERE = Path(__file__).parent
WORKER = HERE / "training_worker.py"
sys.path.insert(0, str(HERE))
import training_worker  # noqa: E402


def _single(root: Path, **kwargs):
    from accelerate import Accelerator

    return training_worker.train(Accelerator(cpu=True), root, **kwargs)


def _losses(history):
    return [row["train/loss"] for row in history]


def test_two_ddp_processes_equal_one_process(tmp_path):
    zero, one = run_worker(WORKER, "ddp", tmp_path / "ddp")
    assert "MULTI_CPU" in zero["type"]
    state, weights = _single(tmp_path / "single", dropout=0.0)
    assert len(state.history) == training_worker.STEPS
    assert _losses(zero["history"]) == _losses(one["history"])  # the reduced loss: the same on both ranks
    assert _losses(zero["history"]) == pytest.approx(_losses(state.history), rel=1e-5, abs=1e-6)
    assert _losses(state.history)[-1] < 0.5 * _losses(state.history)[0]  # it learns: not two flat curves
    for name, w in weights.items():
        torch.testing.assert_close(zero["weights"][name], w, rtol=1e-5, atol=1e-6)
        assert torch.equal(zero["weights"][name], one["weights"][name])
    # the DDP checkpoints are the one-process format: a single process resumes from them
    assert CheckpointManager(tmp_path / "ddp").latest().name == f"step-{training_worker.STEPS:08d}"


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(WORKER), "-", "single"]
    whole = subprocess.Popen([*cmd, str(tmp_path / "whole"), "0"], env=env)
    killed = subprocess.Popen([*cmd, str(tmp_path / "killed"), "0.05"], env=env)
    deadline = time.monotonic() + 120
    while (
        not (tmp_path / "killed" / "latest").exists()
        and killed.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "result.pt").exists(), "finished before the kill: make the steps slower"
    assert subprocess.run([*cmd, str(tmp_path / "killed"), "0"], env=env, timeout=120).returncode == 0
    assert whole.wait(timeout=120) == 0
    a = torch.load(tmp_path / "whole" / "result.pt")
    b = torch.load(tmp_path / "killed" / "result.pt")
    assert b["start"] > 0 and b["start"] % 2 == 0 and a["start"] == 0
    assert _losses(a["history"]) == _losses(b["history"])  # bitwise: dropout RNG restored with the checkpoint
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


def test_non_finite_loss_stops_before_the_step_and_saves_nothing_non_finite(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"train: the loss is nan at step 5; .*step-00000004"):
        _single(tmp_path, nan_at=5)
    manager = CheckpointManager(tmp_path)
    assert [p.name for p in manager.checkpoints()] == ["step-00000002", "step-00000004"]
    from safetensors.torch import load_file

    assert all(
        torch.isfinite(t).all() for t in load_file(str(manager.latest() / "model.safetensors")).values()
    )
    # resuming from there with the fault gone finishes the run
    state, weights = _single(tmp_path)
    assert state.start_step == 4 and state.step == training_worker.STEPS
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_weight_average_is_the_mean_of_the_tail_and_survives_a_resume(tmp_path):
    trace: list = []
    _, last = _single(tmp_path / "plain", dropout=0.0, trace=trace)
    assert len(trace) == training_worker.STEPS
    _, averaged = _single(tmp_path / "avg", dropout=0.0, average_from=5)
    for name, w in averaged.items():  # steps 5..11 (0-based): the weights after steps 6..12
        torch.testing.assert_close(w, torch.stack([t[name] for t in trace[5:]]).mean(0), rtol=1e-6, atol=1e-7)
        assert not torch.equal(w, last[name])  # an index slip (tail from 4 or 6, or the last step) fails
        assert not torch.allclose(w, torch.stack([t[name] for t in trace[4:]]).mean(0), rtol=0, atol=1e-6)
    # interrupted inside the averaged tail, then resumed: the same average, bit for bit
    with pytest.raises(RuntimeError, match="failed at step 9"):
        _single(tmp_path / "cut", dropout=0.0, average_from=5, fail_at=9)
    state, resumed = _single(tmp_path / "cut", dropout=0.0, average_from=5)
    assert state.start_step == 8
    assert all(torch.equal(resumed[k], averaged[k]) for k in averaged)
    # a checkpoint written without averaging, past where it starts, is refused, not silently half-averaged
    with pytest.raises(RuntimeError, match="failed at step 9"):
        _single(tmp_path / "mixed", dropout=0.0, fail_at=9)
    with pytest.raises(ValueError, match="holds no average"):
        _single(tmp_path / "mixed", dropout=0.0, average_from=5)
    # a checkpoint averaging from another step is refused, not continued as a mixed average
    with pytest.raises(RuntimeError, match="failed at step 9"):
        _single(tmp_path / "moved", dropout=0.0, average_from=5, fail_at=9)
    with pytest.raises(ValueError, match="from step 5, not from step 6"):
        _single(tmp_path / "moved", dropout=0.0, average_from=6)
    with pytest.raises(ValueError, match="average_from"):
        LoopSettings(steps=3, average_from=3)


def test_settings_and_shards_are_checked():
    with pytest.raises(ValueError, match="log_every must be an integer >= 1"):
        LoopSettings(steps=3, log_every=0)
    with pytest.raises(ValueError, match="steps must be"):
        LoopSettings(steps=-1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        LoopSettings(steps=1, max_grad_norm=float("nan"))
    assert shard_window([1, 2, 3, 4, 5, 6], 1, 3) == [3, 4]
    with pytest.raises(ValueError, match="5 micro-batches cannot be shared by 2"):
        shard_window([1, 2, 3, 4, 5], 0, 2)
