"""Paged optimizers: bitsandbytes' paged AdamW (32-bit or 8-bit state in CUDA unified memory, paged to the host
under memory pressure) on CUDA; elsewhere the plain torch AdamW, with one warning per process."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

_warned = False


def paged_adamw(params: Iterable[torch.nn.Parameter], lr: float = 2e-4, *, optim_bits: int = 32,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                device: torch.device | str | None = None) -> torch.optim.Optimizer:
    """bitsandbytes `PagedAdamW` (optim_bits=32) / `PagedAdamW8bit` (8) when the parameters live on CUDA;
    otherwise `torch.optim.AdamW` (no paging exists off-GPU) after a single warning.

    Args:
        params: the trainable parameters (e.g. the LoRA adapters).
        lr, betas, eps, weight_decay: AdamW hyper-parameters (QLoRA: lr 2e-4 for 7B/13B, 1e-4 above).
        optim_bits: 32 or 8 (the state precision of the bitsandbytes optimizer).
        device: where the parameters live (default: the first parameter's device).
    """
    global _warned
    if optim_bits not in (32, 8):
        raise ValueError(f"optim_bits must be 32 or 8, got {optim_bits!r}")
    params = list(params)
    if not params:
        raise ValueError("params is empty: no trainable parameters (did you call prepare_model?)")
    dev = torch.device(device) if device is not None else params[0].device
    if dev.type == "cuda":
        from bitsandbytes.optim import PagedAdamW, PagedAdamW8bit

        cls = PagedAdamW if optim_bits == 32 else PagedAdamW8bit
        return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if not _warned:
        warnings.warn(f"paged AdamW needs CUDA (parameters are on {dev}); using torch.optim.AdamW with fp32 "
                      "state instead", RuntimeWarning, stacklevel=2)
        _warned = True
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
