"""convert() under data parallelism on CPU (gloo): two processes under DDP and under FSDP2 `fully_shard`
train a converted tiny GPT and match one process on the same global batch (see distributed_worker.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")


def load_worker():
    spec = importlib.util.spec_from_file_location("mxfp8train_distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# a guard against a hung rank, not a budget: ~20 CPU-s of work, but on a 2-core machine shared by many jobs
# the two ranks' start-up alone took minutes (a 300 s limit failed at load 30)
HANG_GUARD_S = 1800


def run_ranks(out: Path) -> None:
    """Start ranks 0 and 1 of distributed_worker.py; fail with the first failing rank's output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    init_file = out.with_name("pg")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), str(rank), str(init_file)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    deadline = time.monotonic() + HANG_GUARD_S
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one rank failed: the other would wait for it in a collective
            time.sleep(0.5)
    finally:
        killed = [p.poll() is None for p in procs]
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [p.communicate()[0] for p in procs]
    # the rank that failed on its own first (the other was killed here, and its log says nothing)
    for rank in sorted(range(len(procs)), key=lambda r: killed[r]):
        p, log = procs[rank], logs[rank]
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log[-3000:]}"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> dict:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist") / "result.pt"
    run_ranks(out)
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
