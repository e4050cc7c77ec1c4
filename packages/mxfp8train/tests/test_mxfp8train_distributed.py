"""convert() under data parallelism on CPU (gloo): two processes under DDP and under FSDP2 `fully_shard`
train a converted tiny GPT and match one process on the same global batch (see distributed_worker.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from shared_kernels.testing.gloo import run_worker

WORKER = Path(__file__).with_name("distributed_worker.py")


def load_worker():
    spec = importlib.util.spec_from_file_location("mxfp8train_distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# a guard against a hung rank, not a budget: ~20 CPU-s of work, but on a 2-core machine shared by many jobs
# the two ranks' start-up alone took minutes (a 300 s limit failed at load 30)
HANG_GUARD_S = 1800


@pytest.fixture(scope="module")
def two_process_run() -> dict:
    return run_worker(WORKER, timeout=HANG_GUARD_S)[0]  # rank 0's results (whole tensors on every rank)


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
