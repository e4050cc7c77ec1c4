"""Low-level ops shared by the workspace: one op per module, each a pure-torch reference (the specification)
plus a Triton kernel, selected by `backend="auto" | "torch" | "triton"`.

Nothing heavy is imported here: `import shared_kernels` works without Triton or a GPU.
"""

from shared_kernels.backend import resolve_backend, triton_available, triton_interpreting

__all__ = ["resolve_backend", "triton_available", "triton_interpreting"]
