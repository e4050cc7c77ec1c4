"""Tests of multi-process code (DDP, FSDP2 `fully_shard`) on CPU: N processes joined by gloo.

A worker script defines `checks(rank, *args) -> dict` and ends with `spawn_checks(checks, out, *args)`; the
test runs it with `run_worker(script, *args)`, which returns every rank's dict (rank order):

    # worker.py                                          # test_x.py
    def checks(rank, root): ...                          def test_x(tmp_path):
    if __name__ == "__main__":                               zero, one = run_worker(WORKER, tmp_path)
        spawn_checks(checks, sys.argv[1], *sys.argv[2:])     assert zero["equal"] and one["equal"]

`run_worker` starts the ranks itself, one process each running the script (no spawning parent that would
import torch a third time: start-up and imports are most of such a test's cost on a loaded CPU), so a hang
or a crash of a rank fails the test with that rank's output instead of taking pytest down. Run by hand,
`python worker.py OUT ...` spawns the ranks with torch.multiprocessing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_worker", "spawn_checks"]

# how run_worker tells a rank process who it is
_RANK, _WORLD, _INIT_FILE = (
    "SHARED_KERNELS_GLOO_RANK",
    "SHARED_KERNELS_GLOO_WORLD",
    "SHARED_KERNELS_GLOO_INIT",
)
_GRACE_S = 10.0  # how long the other ranks get to exit after one has failed


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
    return values to `out` (torch.save). `fn` must be a module-level function of the calling script.

    Under `run_worker` this process is one of the ranks; run by hand, it spawns them."""
    if _RANK in os.environ:
        started = int(os.environ[_WORLD])
        if started != world:
            raise SystemExit(
                f"spawn_checks: run_worker started {started} ranks, this script wants world={world}"
            )
        _rank_main(int(os.environ[_RANK]), world, os.environ[_INIT_FILE], str(out), fn, args)
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(world, os.path.join(tmp, "pg"), str(out), fn, args), nprocs=world)


def run_worker(script: str | Path, *args: Any, world: int = 2, timeout: float = 600) -> list[Any]:
    """Run `python script OUT *args` (a script ending in `spawn_checks`) as `world` rank processes and return
    what the ranks returned.

    Skips the test when torch.distributed or gloo is unavailable. A rank that exits non-zero fails the test
    with the output of every rank that failed: its peers fail too, in their next collective, or are killed
    here after a grace of 10 s, since they would wait for it. Ranks still running after `timeout` seconds
    fail it the same way (a guard against a hang, not a budget).
    """
    import pytest

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "checks.pt"
        base = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        base.pop("TRITON_INTERPRET", None)
        base.update({_WORLD: str(world), _INIT_FILE: str(Path(tmp) / "pg")})
        logs = [Path(tmp) / f"rank{rank}.log" for rank in range(world)]
        procs = []
        for rank, log in enumerate(logs):
            with open(log, "w") as sink:  # a file, not a pipe: a chatty rank cannot block on a full pipe
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(script), str(out), *map(str, args)],
                        env={**base, _RANK: str(rank)},
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + timeout
        exited: list[int] = []  # ranks in the order they were seen to exit
        try:
            while len(exited) < world and time.monotonic() < deadline:
                exited += [
                    rank for rank, p in enumerate(procs) if rank not in exited and p.poll() is not None
                ]
                if any(procs[rank].returncode != 0 for rank in exited):
                    # the ranks a failure brings down exit within moments (their collectives fail); wait
                    # for them up to a grace, so their own output is complete, then stop the rest
                    deadline = min(deadline, time.monotonic() + _GRACE_S)
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        failed = [rank for rank in exited if procs[rank].returncode != 0]
        stopped = [rank for rank in range(world) if rank not in exited]  # killed here
        if failed or stopped:
            # every rank that failed, in the order seen (within 50 ms: rank order), then those killed here.
            # A rank whose peer died fails too, with a connection error in its next collective, so the
            # message shows every log.
            what = [f"rank {rank} exited {procs[rank].returncode}" for rank in failed]
            wait = f"{_GRACE_S:g} s after a failure" if failed else f"{timeout:g} s"
            what += [f"rank {rank} still running after {wait}" for rank in stopped]
            raise AssertionError(
                f"{Path(script).name}: {', '.join(what)}"
                + "".join(f"\n--- rank {r} output:\n{logs[r].read_text()[-4000:]}" for r in failed + stopped)
            )
        return torch.load(out, weights_only=False)
