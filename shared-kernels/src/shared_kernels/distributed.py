"""Whole-tensor state dicts of models and optimizers sharded with FSDP2
(`torch.distributed.fsdp.fully_shard`).

Under FSDP2 every parameter is a DTensor holding this rank's dim-0 shard, and so is each optimizer state
shaped like its parameter: `model.state_dict()` and `optimizer.state_dict()` hold shards. These functions
give whole CPU tensors in the layout of an unsharded model and optimizer (same names, same parameter
indices), so a checkpoint written by a sharded run loads into an unsharded one and the other way round:

    full_state_dict(model)                            gathers: a collective, every rank calls it; rank 0 gets
    full_optimizer_state_dict(optimizer)              the whole tensors, the other ranks an empty dict
    load_full_state_dict(model, tensors)              every rank passes the whole tensors and keeps its own
    load_full_optimizer_state_dict(optimizer, state)  shard of them (no communication)

On a model without DTensors (one process, DDP) nothing is communicated: they return, on the calling rank, what
`state_dict()` returns (weights as CPU copies) and load as `copy_` / `load_state_dict` do.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "full_optimizer_state_dict",
    "full_state_dict",
    "is_sharded",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
]

# Wrapper modules whose name `state_dict()` leaves out (activation checkpointing, torch.compile).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _is_dtensor(t: Any) -> TypeGuard[DTensor]:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _any_dtensor(tensors: Iterable[Any]) -> bool:
    return any(_is_dtensor(t) for t in tensors)


def is_sharded(model: nn.Module) -> bool:
    """True when `model` or a submodule went through FSDP2 `fully_shard`, or a parameter is a DTensor: its
    state is sharded across ranks and must be gathered (by every rank) to be saved."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules()) or _any_dtensor(model.parameters())


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _trainable_names(model: nn.Module, sharded: bool) -> list[str]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("trainable_only=True but the model has no parameter with requires_grad")
    if sharded:  # named as in state_dict(), which is where sharded tensors are taken from
        for prefix in _WRAPPER_PREFIXES:
            names = [n.replace(prefix, "") for n in names]
    return names


def _own_tensors(model: nn.Module, trainable_only: bool) -> tuple[Mapping[str, torch.Tensor], list[str]]:
    """The model's tensors by name, and the names a (trainable_only) state dict holds.

    Sharded models are read through `state_dict()`, for which FSDP2 registers every parameter as its DTensor
    shard (between forward and backward some may be registered unsharded); the others through
    `named_parameters()` (trainable_only) or `state_dict()`.
    """
    sharded = is_sharded(model)
    own = model.state_dict() if sharded or not trainable_only else dict(model.named_parameters())
    names = _trainable_names(model, sharded) if trainable_only else list(own)
    return own, names


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict as whole, contiguous CPU tensors that share no storage (what safetensors takes).

    Sharded model (`is_sharded`): a collective; every rank must call it at the same point. Each DTensor is
    gathered in turn and moved to the CPU of rank 0, which gets the dict; the other ranks get `{}`.
    Otherwise: copies of `model.state_dict()` on the calling rank, with no communication.

    Args:
        trainable_only: only the parameters with requires_grad (e.g. LoRA adapters on a frozen base).
    """
    own, names = _own_tensors(model, trainable_only)
    missing = [n for n in names if n not in own]
    if missing:
        raise ValueError(f"trainable parameters not found in the state dict: {missing[:5]}")
    keep = _rank0() or not is_sharded(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name in names:
        t = own[name].detach()
        if _is_dtensor(t):
            t = t.full_tensor()  # all-gather: every rank, same order
        if not keep:
            continue
        t = t.cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # tied weights and views would share storage, which safetensors refuses
        seen.add(key)
        out[name] = t
    return out


def load_full_state_dict(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], trainable_only: bool = False
) -> None:
    """Copy whole tensors (as `full_state_dict` returns them) into `model`, in place.

    Every rank passes the same `tensors`; a DTensor parameter keeps this rank's shard of its tensor (sliced
    locally, no communication). With `trainable_only`, exactly the trainable parameters must be given.

    Raises:
        ValueError: when the names or shapes do not match the model's.
    """
    own, names = _own_tensors(model, trainable_only)
    expected = set(names)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, t in tensors.items():
        if tuple(own[name].shape) != tuple(t.shape):
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, model has {tuple(own[name].shape)}"
            )
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(_shard_like(t, own[name]))


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of the whole tensor `full`, placed as the DTensor `like` (`full` when `like` is
    not one)."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    local = full.detach().to(device=like.device, dtype=like.dtype)
    return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in `optimizer.state_dict()`'s index order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with whole tensors, in the unsharded format (state keyed by parameter index).

    Sharded parameters (DTensors): a collective; every rank must call it at the same point. Each DTensor state
    is gathered in turn; rank 0 gets the dict with CPU tensors, the other ranks `{}`. Otherwise this is
    `optimizer.state_dict()` itself, with no communication.
    """
    state = optimizer.state_dict()
    if not _any_dtensor(_optimizer_params(optimizer)):
        return state
    keep = _rank0()
    gathered: dict[int, dict[str, Any]] = {}
    for index, entry in state["state"].items():  # the same order on every rank: all take the same steps
        whole = {}
        for key, value in entry.items():
            if _is_dtensor(value):
                value = value.full_tensor()  # all-gather
            elif torch.is_tensor(value):
                value = value.clone()
            if keep:
                whole[key] = value.detach().cpu() if torch.is_tensor(value) else copy.deepcopy(value)
        if keep:
            gathered[index] = whole
    return {"state": gathered, "param_groups": copy.deepcopy(state["param_groups"])} if keep else {}


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """`optimizer.load_state_dict` from what `full_optimizer_state_dict` (or an unsharded optimizer) returned.

    Every rank passes the same `state`; a state tensor shaped like its DTensor parameter keeps this rank's
    shard of it (no communication); the others (e.g. Adam's step count) are loaded whole.
    """
    params = _optimizer_params(optimizer)
    if _any_dtensor(params):
        state = {
            "state": {
                index: {
                    key: _shard_like(value, params[index])
                    if torch.is_tensor(value) and tuple(value.shape) == tuple(params[index].shape)
                    else value
                    for key, value in entry.items()
                }
                for index, entry in state["state"].items()
            },
            "param_groups": state["param_groups"],
        }
    optimizer.load_state_dict(dict(state))
