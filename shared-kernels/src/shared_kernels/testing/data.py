"""Where the real public test data lives: $SHARED_DATA, else ../shared/data beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path


def _repo_root() -> Path | None:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "uv.lock").exists() and (parent / "shared-kernels").is_dir():
            return parent
    return None


def shared_data_dir() -> Path | None:
    """The shared data folder, or None when it is not present on this machine."""
    env = os.environ.get("SHARED_DATA")
    candidates = [Path(env)] if env else []
    root = _repo_root()
    if root is not None:
        candidates.append(root.parent / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None
