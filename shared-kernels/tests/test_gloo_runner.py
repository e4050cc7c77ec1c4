"""`shared_kernels.testing.gloo.run_worker`, the runner of every multi-process test: it must fail a test
with the output of the rank that failed, and must not wait forever for a hung rank."""

from __future__ import annotations

import textwrap

import pytest

from shared_kernels.testing.gloo import run_worker


def test_a_failing_rank_fails_the_test_with_its_own_output(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        textwrap.dedent(
            """
            import sys
            from shared_kernels.testing.gloo import spawn_checks

            def checks(rank):
                if rank == 1:
                    raise ValueError("rank one cannot go on")
                return {"rank": rank}

            spawn_checks(checks, sys.argv[1])
            """
        )
    )
    with pytest.raises(AssertionError, match=r"(?s)worker.py rank 1 exited 1:.*rank one cannot go on"):
        run_worker(worker, timeout=300)


def test_ranks_return_their_checks_in_rank_order(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        textwrap.dedent(
            """
            import sys
            from shared_kernels.testing.gloo import spawn_checks

            def checks(rank, word):
                return {"rank": rank, "word": word}

            spawn_checks(checks, sys.argv[1], sys.argv[2], world=3)
            """
        )
    )
    assert run_worker(worker, "odd", world=3, timeout=300) == [{"rank": r, "word": "odd"} for r in range(3)]


def test_a_hung_rank_is_stopped_after_the_timeout(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text("import time\ntime.sleep(600)\n")
    with pytest.raises(AssertionError, match="rank 0 still running after 1 s"):
        run_worker(worker, timeout=1)
