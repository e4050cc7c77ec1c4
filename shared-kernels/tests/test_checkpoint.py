"""Atomic checkpoints: exact round trip of weights, optimizer, scheduler and RNG; no partial checkpoint is
ever visible; rotation; trainable-only (adapter) checkpoints; mismatches are reported."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from shared_kernels.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state


class _Net(nn.Module):
    def __init__(self, hidden: int = 13):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(7, hidden), nn.Dropout(0.3), nn.Linear(hidden, 7))
        self.head = nn.Linear(hidden, 7, bias=False)
        self.head.weight = self.body[2].weight  # tied (shared storage) like an LM's embedding and head

    def forward(self, x):
        return self.body(x)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _Net()


def _train(model, opt, sched, steps):
    losses = []
    for _ in range(steps):
        x = torch.randn(9, 7)
        loss = model(x).pow(2).mean() + model.head.weight.sum() * 1e-3
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _setup(seed=0):
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    torch.manual_seed(1)
    model, opt, sched = _setup()
    reference = _train(model, opt, sched, 10)

    torch.manual_seed(1)
    model, opt, sched = _setup()
    first = _train(model, opt, sched, 4)
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(4, model, opt, sched, extra={"losses": first, "epoch": 0})
    _train(model, opt, sched, 3)  # progress after the checkpoint, lost with the "kill"

    random.random(), np.random.rand(), torch.rand(3)  # disturb every RNG
    model2, opt2, sched2 = _setup(seed=123)  # a fresh process would start from other weights
    state = CheckpointManager(tmp_path / "ckpt").load(model2, opt2, sched2)
    assert state["step"] == 4 and state["extra"] == {"losses": first, "epoch": 0}
    assert sched2.last_epoch == 4
    rest = _train(model2, opt2, sched2, 6)
    assert first + rest == reference  # bitwise: same floats


def test_rng_roundtrip():
    state = capture_rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(4))
    restore_rng_state(state)
    b = (random.random(), float(np.random.rand()), torch.rand(4))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_rotation_pointer_and_no_partial_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _setup()
    mgr = CheckpointManager(tmp_path, keep=2)
    assert mgr.latest() is None and mgr.load(model) is None
    for step in (1, 2, 3):
        mgr.save(step, model, opt, sched)
    assert [p.name for p in mgr.checkpoints()] == ["step-00000002", "step-00000003"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"

    # A save killed before the rename leaves only a hidden temp dir: the previous checkpoint stays the latest.
    real_replace = os.replace

    def crash(src, dst):
        if "step-00000004" in str(dst):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(4, model, opt, sched)
    monkeypatch.setattr(os, "replace", real_replace)
    assert mgr.latest().name == "step-00000003"
    assert (tmp_path / ".tmp-step-00000004").is_dir()
    mgr.save(4, model, opt, sched)  # a later save of the same step cleans the temp dir
    assert mgr.latest().name == "step-00000004" and not (tmp_path / ".tmp-step-00000004").exists()


def test_trainable_only_saves_adapters(tmp_path):
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    model.body[2].weight.requires_grad_(True)
    with torch.no_grad():
        model.body[2].weight.add_(1.0)
    CheckpointManager(tmp_path).save(0, model, trainable_only=True)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "step-00000000" / "model.safetensors"))
    assert list(saved) == ["body.2.weight"]
    fresh = _model()
    for p in fresh.parameters():
        p.requires_grad_(False)
    fresh.body[2].weight.requires_grad_(True)
    CheckpointManager(tmp_path).load(fresh)
    assert torch.equal(fresh.body[2].weight, model.body[2].weight)
    assert torch.equal(fresh.body[0].weight, _model().body[0].weight)


def test_mismatches_and_bad_arguments(tmp_path):
    model, opt, sched = _setup()
    CheckpointManager(tmp_path).save(5, model)
    other = _Net(hidden=14)
    with pytest.raises(ValueError, match="shape"):
        CheckpointManager(tmp_path).load(other)
    with pytest.raises(ValueError, match="missing"):
        CheckpointManager(tmp_path).load(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="optimizer"):
        CheckpointManager(tmp_path).load(_model(), opt)
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)
    with pytest.raises(ValueError, match="barrier"):
        CheckpointManager(tmp_path, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        CheckpointManager(tmp_path, rank=2, world_size=2, barrier=lambda: None)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        CheckpointManager(tmp_path).load(model, path=tmp_path / "nope")


def test_latest_extra_reads_settings_without_loading(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    assert mgr.latest_extra() is None
    model = nn.Linear(3, 2)
    mgr.save(1, model, extra={"config": {"lr": 0.1}})
    mgr.save(2, model, extra={"config": {"lr": 0.2}, "losses": [1.0, 0.5]})
    path, extra = mgr.latest_extra()
    assert path.name == "step-00000002" and extra == {"config": {"lr": 0.2}, "losses": [1.0, 0.5]}
    (path / "trainer_state.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"step-00000002/trainer_state\.pt cannot be read"):
        mgr.latest_extra()
