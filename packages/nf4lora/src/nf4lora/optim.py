"""QLoRA's optimizers through bitsandbytes on every device: paged AdamW (state in CUDA unified memory, paged
to the host under memory pressure) on CUDA, bitsandbytes' non-paged AdamW with the same state precision
elsewhere (paging is a CUDA feature; bitsandbytes' 8-bit and 32-bit optimizers step on CPU too). Never a
silent change of state precision: 8-bit state stays 8-bit."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def paged_adamw(
    params: Iterable[torch.nn.Parameter],
    lr: float = 2e-4,
    *,
    optim_bits: int = 32,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    device: torch.device | str | None = None,
    min_8bit_size: int = 4096,
) -> torch.optim.Optimizer:
    """bitsandbytes `PagedAdamW` / `PagedAdamW8bit` on CUDA, `AdamW` / `AdamW8bit` (same state precision, not
    paged) on other devices.

    Args:
        params: the trainable parameters (e.g. the LoRA adapters).
        lr, betas, eps, weight_decay: AdamW hyper-parameters (QLoRA: lr 2e-4 for 7B/13B, 1e-4 above).
        optim_bits: 32 or 8 (the precision of both moment estimates).
        device: where the parameters live (default: the first parameter's device).
        min_8bit_size: bitsandbytes keeps 32-bit state for tensors with fewer elements (its default, 4096).
    Raises:
        ImportError: bitsandbytes is not installed (no fallback to a different optimizer).
    """
    if optim_bits not in (32, 8):
        raise ValueError(f"optim_bits must be 32 or 8, got {optim_bits!r}")
    params = list(params)
    if not params:
        raise ValueError("params is empty: no trainable parameters (did you call prepare_model?)")
    dev = torch.device(device) if device is not None else params[0].device
    try:
        from bitsandbytes import optim as bnb_optim
    except ImportError as exc:
        raise ImportError(
            "nf4lora.paged_adamw needs bitsandbytes (pip install bitsandbytes); use "
            "torch.optim.AdamW for a plain fp32 optimizer"
        ) from exc
    cls: type[torch.optim.Optimizer]
    if dev.type == "cuda":
        cls = bnb_optim.PagedAdamW if optim_bits == 32 else bnb_optim.PagedAdamW8bit
    else:
        cls = bnb_optim.AdamW if optim_bits == 32 else bnb_optim.AdamW8bit
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
