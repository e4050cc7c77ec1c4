"""The bench harness's timing rows: `compare` with and without a floor (no benchmark is run)."""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path


def _load_harness():
    # bench/ is a directory of scripts run with `python -m bench`, not an installed package: load the one
    # file (standard library only) by path.
    path = Path(__file__).resolve().parents[1] / "bench" / "harness.py"
    spec = importlib.util.spec_from_file_location("bench_harness_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


BenchContext = _load_harness().BenchContext


def _spin(seconds: float):
    def run() -> None:
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    return run


def test_compare_floor_is_timed_in_the_interleaving_and_reported_as_cpu_multiples():
    calls: list[str] = []

    def tagged(name: str, seconds: float):
        spin = _spin(seconds)

        def run() -> None:
            calls.append(name)
            spin()

        return run

    ctx = BenchContext(quick=True)
    row = ctx.compare(
        "case",
        tagged("ours", 0.002),
        tagged("anchor", 0.006),
        ours_name="a",
        anchor_name="b",
        floor=tagged("floor", 0.001),
        note="n",
    )
    # warmup 1 + 3 reps, each rep ours, anchor, floor in turn
    assert calls == ["ours", "anchor", "floor"] * 4
    assert len(ctx.last_cpu) == 3
    m = re.fullmatch(r"n; CPU ms \S+ / \S+ / floor \S+: a/floor ([\d.]+), b/floor ([\d.]+)", row.note)
    assert m, row.note
    ours_x, anchor_x = float(m[1]), float(m[2])
    assert 1.5 < ours_x < 2.6 and 4.5 < anchor_x < 7.5, row.note  # 2x and 6x the floor's CPU time
    assert row.cpu_ratio is not None and 0.25 < row.cpu_ratio < 0.45  # ms rows: ours / anchor, 2 / 6


def test_compare_without_floor_keeps_the_note_and_times_two_functions():
    ctx = BenchContext(quick=True)
    row = ctx.compare("case", _spin(0.001), _spin(0.001), note="plain", work=1.0, unit="GB/s")
    assert row.note == "plain"
    assert len(ctx.last_cpu) == 2
    assert not row.lower_is_better and row.unit == "GB/s"
