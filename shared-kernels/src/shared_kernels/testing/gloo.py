"""Tests of multi-process code (DDP, FSDP2 `fully_shard`) on CPU: N processes joined by gloo.

A worker script defines `checks(rank, *args) -> dict` and ends with `spawn_checks(checks, out, *args)`; the
test runs it with `run_worker(script, *args)`, which returns every rank's dict (rank order):

    # worker.py                                          # test_x.py
    def checks(rank, root): ...                          def test_x(tmp_path):
    if __name__ == "__main__":                               zero, one = run_worker(WORKER, tmp_path)
        spawn_checks(checks, sys.argv[1], *sys.argv[2:])     assert zero["equal"] and one["equal"]

The worker runs in its own interpreter (a subprocess of the test), so a hang or a crash of a rank fails the
test with the worker's output instead of taking pytest down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_worker", "spawn_checks"]


def _rank_main(rank: int, world: int, init_file: str, out: str, fn: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, *args)
        every: list[Any] = [None] * world
        dist.all_gather_object(every, result)
        if rank == 0:
            torch.save(every, out)
        dist.barrier()  # every rank leaves together, after every collective is done
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without interpreter teardown. Once in ~10 runs of the rerank-qlora FSDP2 worker,
    # rank 0 aborted there ("terminate called without an active exception": a native thread still joinable
    # at exit) after its results were written, failing a test whose checks had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_checks(fn: Callable[..., Any], out: str | Path, *args: Any, world: int = 2) -> None:
    """Run `fn(rank, *args)` in `world` processes (gloo, one thread each); rank 0 saves the list of their
    return values to `out` (torch.save). `fn` must be a module-level function of the calling script."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(world, os.path.join(tmp, "pg"), str(out), fn, args), nprocs=world)


def run_worker(script: str | Path, *args: Any, timeout: float = 600) -> list[Any]:
    """Run `python script OUT *args` (a script ending in `spawn_checks`) and return what its ranks returned.

    Skips the test when torch.distributed or gloo is unavailable; fails it with the worker's output when the
    worker exits non-zero.
    """
    import pytest

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "checks.pt"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("TRITON_INTERPRET", None)
        proc = subprocess.run(
            [sys.executable, str(script), str(out), *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        return torch.load(out, weights_only=False)
