"""Evaluation-time RoPE rescalings of trained RoPE weights (no training of their own): NTK-aware RoPE and
YaRN, as baselines beside the variants the length studies train (`siattn.lengthgen`, `siattn.retrieval`).

    gains = q_gains(model)                          # the trained q-norm gains, before any rescaling
    rescale_rope(model, "rope+yarn", 16, gains)     # set the model up for 16 x its training length
    rescale_rope(model, "rope+yarn", 1, gains)      # identity: back to the trained model
"""

from __future__ import annotations

import math

import torch

from siattn.models import GPT, Block
from siattn.positional import rope_frequencies

RESCALED = ("rope+ntk", "rope+yarn")


def ntk_base(base: float, head_dim: int, factor: float) -> float:
    """NTK-aware RoPE: theta scaled by factor^(d / (d - 2)) (REFERENCE section 1)."""
    return base * factor ** (head_dim / (head_dim - 2))


def yarn_frequencies(
    inv_freq: torch.Tensor, train_length: int, factor: float, alpha: float = 1.0, beta: float = 32.0
) -> torch.Tensor:
    """YaRN (Peng et al. 2023) "NTK-by-parts": dimensions whose wavelength fits fewer than `alpha` times in
    the training length are interpolated by `factor`, those fitting more than `beta` times are kept, a linear
    ramp in between."""
    ratio = train_length * inv_freq / (2 * math.pi)  # training length / wavelength
    keep = ((ratio - alpha) / (beta - alpha)).clamp(0.0, 1.0)
    return (1 - keep) * inv_freq / factor + keep * inv_freq


def _q_gain(block: Block) -> torch.Tensor:
    """The learned gain of a block's q norm."""
    norm = block.attn.q_norm
    if not isinstance(norm, torch.nn.RMSNorm) or norm.weight is None:
        raise ValueError("YaRN's logit scaling needs models with QK-norm (qk_norm=True)")
    return norm.weight


def q_gains(model: GPT) -> list[torch.Tensor]:
    """Copies of every block's trained q-norm gain (`rescale_rope` scales these for YaRN)."""
    return [_q_gain(block).detach().clone() for block in model.layers]


@torch.no_grad()
def rescale_rope(model: GPT, variant: str, mult: int, gains: list[torch.Tensor]) -> None:
    """Set a RoPE model's frequencies (and YaRN's logit gain, via the q norm's weight) for `mult` x its
    training length; identity at mult = 1. gains: `q_gains(model)` taken before any rescaling."""
    if variant not in RESCALED:
        raise ValueError(f"variant must be one of {RESCALED}, got {variant!r}")
    if model.cfg.position != "rope":
        raise ValueError(f"{variant} rescales RoPE models, got position={model.cfg.position!r}")
    head_dim = model.cfg.d_model // model.cfg.n_head
    base = model.cfg.rope_base
    if mult == 1:  # exactly the trained model
        inv, gain = rope_frequencies(head_dim, base), 1.0
    elif variant == "rope+ntk":
        inv = rope_frequencies(head_dim, ntk_base(base, head_dim, float(mult)))
        gain = 1.0
    else:  # YaRN: frequencies by parts, logits x (0.1 ln s + 1)^2
        inv = yarn_frequencies(rope_frequencies(head_dim, base), model.cfg.train_length, float(mult))
        gain = (0.1 * math.log(mult) + 1.0) ** 2
    for block, w in zip(model.layers, gains, strict=True):
        block.attn.inv_freq = inv
        _q_gain(block).copy_(w * gain)
