"""`python -m bench list | run NAME... [--quick] [--append FILE] [--out DIR]`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import bench
from bench.harness import REGISTRY, BenchContext, machine_info, render_table


def _load_all() -> None:
    for mod in pkgutil.iter_modules(bench.__path__):
        if mod.name.startswith("bench_"):
            importlib.import_module(f"bench.{mod.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the registered benchmarks")
    run = sub.add_parser("run", help="run benchmarks by name ('all', 'cpu' or 'cuda' select groups)")
    run.add_argument("names", nargs="+")
    run.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (smoke run)")
    run.add_argument("--append", metavar="FILE", help="append the tables to this markdown file")
    run.add_argument("--out", metavar="DIR", help="also write each table to DIR/<name>.md")
    args = parser.parse_args(argv)
    _load_all()
    if args.cmd == "list":
        for b in sorted(REGISTRY.values(), key=lambda b: (b.package, b.name)):
            summary = b.description.splitlines()[0] if b.description else ""
            print(f"{b.name:40s} {b.package:14s} {b.device:5s} {summary}")
        return 0
    selected = []
    for name in args.names:
        if name in ("all", "cpu", "cuda"):
            selected += [b for b in REGISTRY.values() if name == "all" or b.device == name]
        elif name in REGISTRY:
            selected.append(REGISTRY[name])
        else:
            parser.error(f"unknown benchmark {name!r}; known: {', '.join(sorted(REGISTRY))}")
    info = machine_info()
    command = "uv run python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    failed = 0
    for b in selected:
        if b.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print(f"skip {b.name}: needs CUDA")
                continue
        print(f"## {b.name}", flush=True)
        ctx = BenchContext(quick=args.quick, device=b.device)
        try:
            b.fn(ctx)
        except Exception as e:  # noqa: BLE001 - report and go on with the other benchmarks
            failed += 1
            print(f"FAILED {b.name}: {type(e).__name__}: {e}")
            continue
        table = render_table(b, ctx.rows, info, command, ctx.load_line())
        print(table)
        if args.append:
            with open(args.append, "a") as f:
                f.write("\n" + table)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"{b.name}.md").write_text(table)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
