"""Low-level ops shared by the workspace: one op per module, each a pure-torch reference (the specification)
plus a Triton kernel, selected by `backend="auto" | "torch" | "triton"`.

Nothing heavy is imported here: `import shared_kernels` works without Triton or a GPU, and without torch, so
the torch-free modules (`runconfig`, `app`) serve packages and commands that never load torch.
"""

from __future__ import annotations

__all__ = ["resolve_backend", "triton_available", "triton_interpreting"]


def __getattr__(name: str):
    if name in __all__:  # torch is imported only when a backend helper is used
        from shared_kernels import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'shared_kernels' has no attribute {name!r}")
