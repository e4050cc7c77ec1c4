"""Benchmarks against the anchors, side by side in one process (not part of pytest).

Each module `bench/bench_*.py` registers benchmarks with `@benchmark(...)`; run them with
`uv run python -m bench list` and
`uv run python -m bench run NAME [NAME ...] [--quick] [--append BENCHMARKS.md]`.
"""

from bench.harness import BenchContext, benchmark, machine_info

__all__ = ["BenchContext", "benchmark", "machine_info"]
