"""Module surgery shared by the quantization packages: the one loop that swaps a model's layers for runtime
replacements (nf4lora's 4-bit layers, mxfp8train's MX and bf16-operand linears), in place.

The loop lists `named_modules()` before replacing anything, so a replacement's own children are never
visited, and a module is addressed by its qualified name (`"model.layers.0.mlp.up_proj"`), as torch's
`get_submodule` resolves it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the qualified `name` of `model` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def set_plain_attribute(model: nn.Module, name: str, value: object) -> None:
    """Set an attribute that is neither a tensor nor a module (a setting, a list of names DDP reads):
    `nn.Module.__setattr__` is typed for tensors and modules only, and stores other values as this does."""
    object.__setattr__(model, name, value)


def output_embedding(model: nn.Module) -> nn.Module | None:
    """The LM head of a transformers model (`get_output_embeddings()`), or None where the model has none."""
    get = getattr(model, "get_output_embeddings", None)
    found = get() if callable(get) else None
    return found if isinstance(found, nn.Module) else None


def swap_modules(
    model: nn.Module,
    build: Callable[[str, nn.Module], nn.Module | None],
    select: Callable[[str, nn.Module], bool],
) -> list[str]:
    """Replace, in place, every submodule of `model` that `select(name, module)` accepts by
    `build(name, module)` (None leaves that one as it is).

    Args:
        model: the root module (itself never replaced: a caller that converts a bare layer does it itself).
        build: (qualified name, module) -> the replacement, or None to keep the module.
        select: (qualified name, module) -> whether to offer the module to `build`.
    Returns:
        the qualified names replaced, in `named_modules()` order.
    """
    swapped: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or not select(name, module):
            continue
        new = build(name, module)
        if new is not None:
            set_module(model, name, new)
            swapped.append(name)
    return swapped
