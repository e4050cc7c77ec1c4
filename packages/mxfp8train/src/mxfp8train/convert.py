"""Swap a model's nn.Linear layers for MXLinear in place, and read back their diagnostics.

Only modules whose type is exactly nn.Linear are swapped: subclasses (bitsandbytes' 4-bit layers, other
quantized linears) carry weights that are not plain floats. The new modules share the old Parameters, so
convert before building the optimizer or wrapping in DDP / FSDP2 (`fully_shard`), and tied weights stay
tied. The layers hold no tensor subclasses, so torch.compile traces them like any autograd.Function.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

from mxfp8train.linear import MXLinear
from mxfp8train.recipe import PAPER_RECIPE, MXRecipe
from mxfp8train.stats import merge_summaries
from shared_kernels.modules import swap_modules


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def convert(
    model: nn.Module,
    recipe: MXRecipe = PAPER_RECIPE,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
) -> nn.Module:
    """Replace every nn.Linear of `model` (except those the recipe skips) by an MXLinear, in place.

    Args:
        model: any torch / transformers module (or a bare nn.Linear, which is returned converted).
        recipe: the `MXRecipe`; its `skip_modules` patterns keep e.g. the LM head in high precision.
        filter_fn: optional `(qualified_name, linear) -> bool`; False keeps that layer unconverted.
    Returns:
        the model (the same object unless `model` itself is an nn.Linear).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(recipe, MXRecipe):
        raise TypeError(f"recipe must be an MXRecipe, got {type(recipe).__name__}")
    if type(model) is nn.Linear:
        return MXLinear.from_linear(model, recipe)

    def select(name: str, module: nn.Module) -> bool:
        return (
            type(module) is nn.Linear
            and not _skipped(name, recipe.skip_modules)
            and (filter_fn is None or filter_fn(name, module))
        )

    def mx_linear(name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, nn.Linear)  # select accepted only exact nn.Linear
        return MXLinear.from_linear(module, recipe)

    swap_modules(model, mx_linear, select)
    return model


def mx_layers(model: nn.Module) -> dict[str, MXLinear]:
    """The MXLinear modules of `model` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MXLinear)}


def set_track_stats(model: nn.Module, enabled: bool) -> None:
    """Turn diagnostics on or off for every MXLinear (e.g. on for one logged step in N)."""
    for m in mx_layers(model).values():
        m.recipe = m.recipe.replace(track_stats=enabled)


def reset_stats(model: nn.Module) -> None:
    for m in mx_layers(model).values():
        m.mx_stats.reset()


def collect_stats(model: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
    """Per-layer `MXStats.summary()` plus "__all__", the counts pooled over every layer."""
    per_layer = {name: m.mx_stats.summary() for name, m in mx_layers(model).items()}
    per_layer["__all__"] = merge_summaries(list(per_layer.values()))
    return per_layer
