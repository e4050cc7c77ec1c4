"""Compile-on-first-use for the native CPU kernels (`nf4_cpu.c`, `mx_cpu.c`): one home for the build, the
cache and the guarded load that `shared_kernels.nf4_cpu` and `shared_kernels.mx_cpu` share.

A C source shipped beside this file (package data) is compiled with the system C compiler (`$CC`, default
`cc`) into `$SHARED_KERNELS_CACHE` (default `~/.cache/shared_kernels`), keyed by a hash of source, compiler,
flags and machine, and loaded with ctypes (the GIL is released during calls). The file is built in a
temporary directory and renamed into place, so concurrent processes never load a partial file. No
-march=native: the kernels pick their instruction set at run time, so a cached .so runs on any x86-64.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

# No -ffast-math and no FMA contraction: every product and sum must round exactly as the torch reference.
CFLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-fast-math"]


def _compile(source_file: str, path: Path, source: str, cflags: list[str], cc: str) -> None:
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / source_file
        src.write_text(source)
        out = Path(tmp) / path.name
        proc = subprocess.run([cc, *cflags, str(src), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, path)  # atomic: concurrent processes (pytest-xdist) never load a partial file


def compile_and_load(
    source_file: str, cflags: list[str] = CFLAGS, compiler: str | None = None
) -> ctypes.CDLL:
    """Load `shared_kernels/<source_file>` compiled, compiling it into the cache first when needed, with
    `compiler` (default `$CC`, else `cc`; a C++ source passes `$CXX`).

    Raises RuntimeError (no compiler, compile error) or OSError (load failure)."""
    cc = compiler or os.environ.get("CC", "cc")
    source = importlib.resources.files("shared_kernels").joinpath(source_file).read_text()
    key = hashlib.sha256("\0".join([source, cc, *cflags, os.uname().machine]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SHARED_KERNELS_CACHE", Path.home() / ".cache" / "shared_kernels"))
    path = cache / f"{Path(source_file).stem}_{key}.so"
    if not path.exists():
        _compile(source_file, path, source, cflags, cc)
    return ctypes.CDLL(str(path))


class NativeLibrary:
    """A native kernel library loaded once per process, or None when it cannot be.

    Args:
        source_file: the C file beside this module.
        switch: environment variable that disables it when "0" (callers then use the torch reference).
        what: its name in the one RuntimeWarning a failed build or load gives per process.
        declare: sets the ctypes argtypes / restype of the library's functions.
        cflags: the compiler flags (e.g. tests add a macro that leaves out the x86 paths).
    """

    def __init__(
        self,
        source_file: str,
        switch: str,
        what: str,
        declare: Callable[[ctypes.CDLL], None],
        cflags: list[str] = CFLAGS,
    ):
        self.source_file, self.switch, self.what, self.declare = source_file, switch, what, declare
        self.cflags = cflags
        self.lib: ctypes.CDLL | None = None
        self.failed = False
        self._lock = threading.Lock()

    def get(self) -> ctypes.CDLL | None:
        """The loaded library (compiling it on first use); None when disabled or unavailable."""
        if self.lib is not None or self.failed:
            return self.lib
        if os.environ.get(self.switch, "1") == "0":
            return None
        with self._lock:
            if self.lib is None and not self.failed:
                try:
                    lib = compile_and_load(self.source_file, self.cflags)
                    self.declare(lib)
                    self.lib = lib
                except Exception as exc:  # any failure means: use the torch reference
                    self.failed = True
                    warnings.warn(
                        f"{self.what} unavailable ({exc}); using the torch reference (slower)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return self.lib
