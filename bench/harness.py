"""The benchmark harness: registry, interleaved timing, markdown tables with the machine they ran on.

A benchmark is a function taking a `BenchContext`; it calls `ctx.compare(...)` (times ours and the anchor,
interleaved, medians, ratio = ours / anchor, and the same ratio in process CPU time, steadier than wall time
on a machine shared with other jobs) or `ctx.record(...)` (a metric measured by the benchmark itself,
e.g. peak memory or throughput) once per case. The harness prints one markdown table per benchmark.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REGISTRY: dict[str, Benchmark] = {}


@dataclass
class Benchmark:
    name: str
    fn: Callable[[BenchContext], None]
    package: str
    device: str  # "cpu" or "cuda"
    description: str


def benchmark(name: str, *, package: str, device: str = "cpu", description: str = "") -> Callable:
    """Register `fn(ctx)` as a named benchmark."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")

    def wrap(fn: Callable[[BenchContext], None]) -> Callable[[BenchContext], None]:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        REGISTRY[name] = Benchmark(name, fn, package, device, description or (fn.__doc__ or "").strip())
        return fn

    return wrap


@dataclass
class Row:
    case: str
    ours: float
    anchor: float
    unit: str
    ours_name: str
    anchor_name: str
    lower_is_better: bool = True
    note: str = ""
    # `ratio` in process CPU time (user + sys, all threads) instead of wall time; compare() rows only.
    cpu_ratio: float | None = None

    @property
    def ratio(self) -> float:
        return self.ours / self.anchor if self.anchor else float("nan")


@dataclass
class BenchContext:
    quick: bool = False
    device: str = "cpu"
    rows: list[Row] = field(default_factory=list)
    load_start: tuple[float, ...] = field(default_factory=os.getloadavg)
    # Median process CPU seconds per call of each fn of the last time_interleaved().
    last_cpu: list[float] = field(default_factory=list)

    def load_line(self) -> str:
        """The 1/5/15-minute load averages when the benchmark started and now."""
        start, end = ("/".join(f"{v:.1f}" for v in load) for load in (self.load_start, os.getloadavg()))
        return f"load average (1/5/15 min) {start} at the start, {end} at the end"

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def time_interleaved(self, fns: list[Callable[[], Any]], reps: int, warmup: int) -> list[float]:
        """Median seconds per call of each fn, alternating them rep by rep so drift hits all equally; the
        median process CPU seconds per call (user + sys of all threads) go to `self.last_cpu`."""
        for _ in range(warmup):
            for fn in fns:
                fn()
        self._sync()
        samples: list[list[float]] = [[] for _ in fns]
        cpu: list[list[float]] = [[] for _ in fns]
        for _ in range(reps):
            for i, fn in enumerate(fns):
                gc.collect()
                self._sync()
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                self._sync()
                samples[i].append(time.perf_counter() - t0)
                cpu[i].append(time.process_time() - c0)
        self.last_cpu = [statistics.median(c) for c in cpu]
        return [statistics.median(s) for s in samples]

    def compare(
        self,
        case: str,
        ours: Callable[[], Any],
        anchor: Callable[[], Any],
        *,
        ours_name: str = "ours",
        anchor_name: str = "anchor",
        reps: int | None = None,
        warmup: int = 2,
        unit: str = "ms",
        work: float | None = None,
        note: str = "",
        floor: Callable[[], Any] | None = None,
    ) -> Row:
        """Time `ours` and `anchor` interleaved; with `work` (e.g. bytes or pairs per call) report throughput
        in `unit` per second (higher is better) instead of milliseconds.

        `floor`: a lower bound on the work's cost (e.g. only writing the output bytes and reading the input),
        timed in the same interleaving; the note gets each side's CPU time as a multiple of the floor's. An
        anchor within k x its floor cannot be beaten by more than k x."""
        reps = reps if reps is not None else (3 if self.quick else 11)
        fns = [ours, anchor] if floor is None else [ours, anchor, floor]
        t_ours, t_anchor, *_ = self.time_interleaved(fns, reps=reps, warmup=1 if self.quick else warmup)
        c_ours, c_anchor, *c_floor = self.last_cpu
        if c_floor:
            floor_note = (
                f"CPU ms {c_ours * 1e3:.3g} / {c_anchor * 1e3:.3g} / floor {c_floor[0] * 1e3:.3g}:"
                f" {ours_name}/floor {c_ours / c_floor[0]:.2f},"
                f" {anchor_name}/floor {c_anchor / c_floor[0]:.2f}"
            )
            note = f"{note}; {floor_note}" if note else floor_note
        if work is None:
            row = Row(case, t_ours * 1e3, t_anchor * 1e3, "ms", ours_name, anchor_name, True, note)
            row.cpu_ratio = c_ours / c_anchor if c_anchor else float("nan")
        else:
            row = Row(case, work / t_ours, work / t_anchor, unit, ours_name, anchor_name, False, note)
            row.cpu_ratio = c_anchor / c_ours if c_ours else float("nan")
        self.rows.append(row)
        print(
            f"  {case}: {ours_name} {row.ours:.4g} {row.unit} | {anchor_name} {row.anchor:.4g} {row.unit}"
            f" | ratio {row.ratio:.3f} | CPU ms {c_ours * 1e3:.4g} vs {c_anchor * 1e3:.4g}, ratio"
            f" {row.cpu_ratio:.3f}" + (f" | {note}" if c_floor else ""),
            flush=True,
        )
        return row

    def record(
        self,
        case: str,
        ours: float,
        anchor: float,
        unit: str,
        *,
        ours_name: str = "ours",
        anchor_name: str = "anchor",
        lower_is_better: bool = True,
        note: str = "",
    ) -> Row:
        row = Row(case, ours, anchor, unit, ours_name, anchor_name, lower_is_better, note)
        self.rows.append(row)
        print(
            f"  {case}: {ours_name} {ours:.4g} {unit} | {anchor_name} {anchor:.4g} {unit} "
            f"| ratio {row.ratio:.3f}",
            flush=True,
        )
        return row


def machine_info() -> dict[str, str]:
    info: dict[str, str] = {"python": platform.python_version(), "os": platform.platform(terse=True)}
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = f"{cpu} ({os.cpu_count()} logical cores)"
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch threads"] = str(torch.get_num_threads())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    for mod in ("triton", "transformers", "bitsandbytes", "torchao", "peft", "bm25s"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - an optional anchor that fails to import is just absent
            pass
    return info


def render_table(
    bench: Benchmark, rows: list[Row], info: dict[str, str], command: str, load: str = ""
) -> str:
    lines = [f"### {bench.name} ({bench.package}, {bench.device})", ""]
    if bench.description:
        lines += [bench.description, ""]
    lines += [
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}  ",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ("  " if load else ""),
        *([f"Load: {load}"] if load else []),
        "",
    ]
    lines += [
        "| case | ours | anchor | ours | anchor | unit | ratio (ours/anchor) | ratio in CPU time | better"
        " | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        better = "lower" if r.lower_is_better else "higher"
        cpu = "" if r.cpu_ratio is None else f"{r.cpu_ratio:.3f}"
        lines.append(
            f"| {r.case} | {r.ours_name} | {r.anchor_name} | {r.ours:.4g} | {r.anchor:.4g} | {r.unit} |"
            f" {r.ratio:.3f} | {cpu} | {better} | {r.note} |"
        )
    return "\n".join(lines) + "\n"
