"""The MXFP8 training recipe: which tensor roles get which element type, the scale rule, the block size,
which of a linear layer's three GEMMs run in MX, and which modules `convert` leaves alone.

`PAPER_RECIPE` is arXiv 2506.08027's: E4M3 for weights, activations and gradients, RCEIL scales, blocks of
32, all three GEMMs. The presets vary one thing each, for ablations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from shared_kernels.mx_cast import ELEM_DTYPES, SCALE_MODES

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@dataclass(frozen=True)
class MXRecipe:
    """How MXLinear quantizes.

    Attributes:
        input_dtype: element type of the activations X (forward and weight-gradient GEMMs).
        weight_dtype: element type of the weights W (forward and input-gradient GEMMs).
        grad_dtype: element type of the output gradients dY (input- and weight-gradient GEMMs).
        scale_mode: "rceil" (paper) or "floor" (OCP spec).
        block_size: elements per E8M0 scale; hardware GEMMs need 32.
        forward: run Y = X Wᵀ in MX (blocks along in_features).
        input_grad: run dX = dY W in MX (blocks along out_features).
        weight_grad: run dW = dYᵀ X in MX (blocks along tokens).
        skip_modules: fnmatch patterns; `convert` leaves a linear alone when its qualified name or its last
            name component matches one. Embeddings and norms are never nn.Linear, so they stay as they are.
        track_stats: accumulate per-layer clip / flush-to-zero / amax statistics (eager mode only).
        gemm_backend: "auto" | "emulated" | "scaled_mm" (see `shared_kernels.mx_gemm`).
        cast_backend: "auto" | "torch" | "triton" (see `shared_kernels.mx_cast`).
    """

    input_dtype: torch.dtype = E4M3
    weight_dtype: torch.dtype = E4M3
    grad_dtype: torch.dtype = E4M3
    scale_mode: str = "rceil"
    block_size: int = 32
    forward: bool = True
    input_grad: bool = True
    weight_grad: bool = True
    skip_modules: tuple[str, ...] = ("lm_head", "output", "*embed*", "*norm*")
    track_stats: bool = False
    gemm_backend: str = "auto"
    cast_backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("input_dtype", "weight_dtype", "grad_dtype"):
            if getattr(self, name) not in ELEM_DTYPES:
                raise ValueError(
                    f"{name} must be torch.float8_e4m3fn or torch.float8_e5m2, got {getattr(self, name)!r}"
                )
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2 or bs > 1024 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two in [2, 1024], got {bs!r}")
        if self.gemm_backend == "scaled_mm" and bs != 32:
            raise ValueError(f"block_size must be 32 with gemm_backend='scaled_mm' (hardware MX), got {bs}")
        if self.gemm_backend not in ("auto", "emulated", "scaled_mm"):
            raise ValueError(
                f"gemm_backend must be 'auto', 'emulated' or 'scaled_mm', got {self.gemm_backend!r}"
            )
        if self.cast_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"cast_backend must be 'auto', 'torch' or 'triton', got {self.cast_backend!r}")
        if isinstance(self.skip_modules, str) or not all(isinstance(p, str) for p in self.skip_modules):
            raise TypeError(f"skip_modules must be a tuple of strings, got {self.skip_modules!r}")

    def replace(self, **changes) -> MXRecipe:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


PAPER_RECIPE = MXRecipe()
OCP_FLOOR_RECIPE = MXRecipe(scale_mode="floor")
E5M2_GRADS_RECIPE = MXRecipe(grad_dtype=E5M2)
FORWARD_ONLY_RECIPE = MXRecipe(input_grad=False, weight_grad=False)  # both backward GEMMs in compute dtype
BACKWARD_ONLY_RECIPE = MXRecipe(forward=False)  # the forward GEMM in compute dtype

RECIPES: dict[str, MXRecipe] = {
    "mxfp8-rceil": PAPER_RECIPE,
    "mxfp8-floor": OCP_FLOOR_RECIPE,
    "mxfp8-rceil-e5m2-grads": E5M2_GRADS_RECIPE,
    "mxfp8-rceil-fwd-only": FORWARD_ONLY_RECIPE,
    "mxfp8-rceil-bwd-only": BACKWARD_ONLY_RECIPE,
    "mxfp8-floor-fwd-only": FORWARD_ONLY_RECIPE.replace(scale_mode="floor"),
    "mxfp8-floor-bwd-only": BACKWARD_ONLY_RECIPE.replace(scale_mode="floor"),
}


def recipe_from_name(name: str, **changes) -> MXRecipe:
    """A preset by name (a key of `RECIPES`), optionally changed."""
    if name not in RECIPES:
        raise ValueError(f"recipe name must be one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name].replace(**changes) if changes else RECIPES[name]
