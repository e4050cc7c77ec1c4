"""convert() under data parallelism on CPU (gloo): two processes under DDP and under FSDP2 `fully_shard`
train a converted tiny GPT and match one process on the same global batch (see distributed_worker.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")


def load_worker():
    spec = importlib.util.spec_from_file_location("mxfp8train_distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> dict:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist") / "result.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def one_process() -> tuple[list[float], dict, dict]:
    worker = load_worker()
    torch.set_num_threads(1)
    model = worker.make_model()
    losses, grads = worker.train(model)
    return losses, grads[0], {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_matches_one_process(run: dict, one_process) -> None:
    losses, grads, params = one_process
    # same MX blocks on every operand; only the weight-gradient sums are split differently across ranks
    torch.testing.assert_close(run["losses"], losses, rtol=1e-5, atol=0)
    assert run["grads"].keys() == grads.keys() and run["params"].keys() == params.keys()
    for name in grads:
        torch.testing.assert_close(run["grads"][name], grads[name], rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(run["params"][name], params[name], rtol=1e-4, atol=1e-6, msg=name)
    init = load_worker().make_model()
    assert all(not torch.equal(params[n], p) for n, p in init.named_parameters())  # every parameter trained


def test_ddp_two_processes_match_one_process(two_process_run, one_process):
    assert_matches_one_process(two_process_run["ddp"], one_process)


def test_fsdp2_two_processes_match_one_process(two_process_run, one_process):
    run = two_process_run["fsdp2"]
    # MXLinear parameters are dim-0 DTensor shards between steps, whole plain Parameters inside forward
    assert run["is_mxlinear"] and run["sharded"]
    assert run["local_shape"] == (128, 64)  # fc.weight (256, 64) over 2 ranks
    assert run["in_forward"] == {"dtensor": False, "shape": (256, 64)}
    assert_matches_one_process(run, one_process)
