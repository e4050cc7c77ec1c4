"""MXFP8 training: E8M0 block scales with the RCEIL rule, E4M3 elements, all three GEMMs of a linear layer
quantized along their reduction axis (arXiv 2506.08027, OCP Microscaling v1.0).

    import mxfp8train
    mxfp8train.convert(model, mxfp8train.PAPER_RECIPE)      # or OCP_FLOOR_RECIPE, E5M2_GRADS_RECIPE
"""

from mxfp8train.convert import collect_stats, convert, mx_layers, reset_stats, set_track_stats
from mxfp8train.linear import MXLinear, mx_linear
from mxfp8train.mx_tensor import MXTensor, to_mx
from mxfp8train.recipe import (
    BACKWARD_ONLY_RECIPE,
    E5M2_GRADS_RECIPE,
    FORWARD_ONLY_RECIPE,
    OCP_FLOOR_RECIPE,
    PAPER_RECIPE,
    RECIPES,
    MXRecipe,
    recipe_from_name,
)
from mxfp8train.stats import MXStats

__all__ = [
    "BACKWARD_ONLY_RECIPE",
    "E5M2_GRADS_RECIPE",
    "FORWARD_ONLY_RECIPE",
    "MXLinear",
    "MXRecipe",
    "MXStats",
    "MXTensor",
    "OCP_FLOOR_RECIPE",
    "PAPER_RECIPE",
    "RECIPES",
    "collect_stats",
    "convert",
    "mx_layers",
    "mx_linear",
    "recipe_from_name",
    "reset_stats",
    "set_track_stats",
    "to_mx",
]
