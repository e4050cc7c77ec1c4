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
    with pytest.raises(AssertionError) as failure:
        run_worker(worker, timeout=300)
    message = str(failure.value)
    # rank 0 may fail too (its peer vanished inside a collective), but rank 1's own error must be shown
    assert message.startswith("worker.py: ") and "rank 1 exited 1" in message.splitlines()[0]
    assert "--- rank 1 output:" in message and "rank one cannot go on" in message


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
    with pytest.raises(
        AssertionError, match="worker.py: rank 0 still running after 1 s, rank 1 still running after 1 s"
    ):
        run_worker(worker, timeout=1)
