"""Backend selection shared by every op: "auto" picks Triton on CUDA tensors, the torch path elsewhere."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """True when the triton package can be imported (it may still lack a GPU; see `triton_interpreting`)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels run on CPU tensors through Triton's interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend to "torch" or "triton" for tensors on `device`.

    "auto" is Triton for CUDA tensors (when Triton is installed) and torch otherwise. "triton" on a CPU tensor
    is allowed only under the interpreter; anything else raises a ValueError naming the argument.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    on_gpu = device.type == "cuda"
    if backend == "auto":
        return "triton" if on_gpu and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton' requested but triton is not installed")
    if not on_gpu and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 to run the "
            "kernels on CPU through Triton's interpreter"
        )
    return "triton"
