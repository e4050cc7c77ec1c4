"""Positional encodings, each a separate function: RoPE, p-RoPE, NoPE, and the baselines ALiBi and LogN.

Rotations use the half-split layout of transformers' Llama (`rotate_half`): pair k is (x[k], x[k + D/2]).

p-RoPE (the paper's setup, from modded-nanogpt) keeps rotation on a fraction of the D/2 pairs, with
frequencies `(1/base) ** linspace(0, 1, n_kept)`, and sets the rest to frequency 0, so those dimensions carry
pure content (a NoPE channel). RoPE uses `base ** (-2k/D)`.
"""

from __future__ import annotations

import math

import torch


def rope_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Standard RoPE inverse frequencies `base ** (-2k / head_dim)`, k < head_dim/2.
    Returns (head_dim/2,) fp32."""
    _check_head_dim(head_dim)
    if not base > 1:
        raise ValueError(f"base must be > 1, got {base!r}")
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim).float()


def p_rope_frequencies(head_dim: int, fraction: float = 0.5, base: float = 1024.0) -> torch.Tensor:
    """p-RoPE inverse frequencies: `(1/base) ** linspace(0, 1, n_kept)` then zeros.
    Returns (head_dim/2,) fp32.

    Args:
        head_dim: D, even.
        fraction: share of the D/2 pairs that rotate (0 gives NoPE, the paper uses 0.5);
            n_kept = round(fraction*D/2).
        base: the slowest kept pair turns once every 2*pi*base positions.
    """
    _check_head_dim(head_dim)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    if not base > 1:
        raise ValueError(f"base must be > 1, got {base!r}")
    pairs = head_dim // 2
    kept = round(fraction * pairs)
    freqs = torch.zeros(pairs, dtype=torch.float64)
    if kept:
        freqs[:kept] = (1.0 / base) ** torch.linspace(0.0, 1.0, kept, dtype=torch.float64)
    return freqs.float()


def nope_frequencies(head_dim: int) -> torch.Tensor:
    """NoPE as a rotation with every frequency 0 (the identity). Returns (head_dim/2,) zeros."""
    _check_head_dim(head_dim)
    return torch.zeros(head_dim // 2)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate q or k by their positions.

    Args:
        x: (B, H, T, D).
        positions: (T,) or (B, T) integer positions (e.g. from `positions_in_documents`).
        inv_freq: (D/2,) inverse frequencies.
    Returns:
        (B, H, T, D) in x's dtype; angles and the rotation are computed in fp32.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, T, D), got shape {tuple(x.shape)}")
    if inv_freq.shape != (x.shape[-1] // 2,) or x.shape[-1] % 2:
        raise ValueError(f"inv_freq must have shape ({x.shape[-1] // 2},) for head dim {x.shape[-1]}")
    if positions.shape[-1] != x.shape[2] or positions.dim() not in (1, 2):
        raise ValueError(
            f"positions must be (T,) or (B, T) with T={x.shape[2]}, got {tuple(positions.shape)}"
        )
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(x.device, torch.float32)  # (.., T, D/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, D/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def positions_in_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document, for packed sequences.

    Args:
        doc_ids: (B, T) integer document ids; a document is a run of equal ids.
    Returns:
        (B, T) int64 positions, restarting at 0 where the id changes.
    """
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be (B, T), got shape {tuple(doc_ids.shape)}")
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes m_h = 2^(-8h/H), h = 1..H. Returns (H,) fp32."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    return torch.tensor([2.0 ** (-8.0 * h / num_heads) for h in range(1, num_heads + 1)])


def alibi_bias(num_heads: int, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """Additive ALiBi bias -m_h * (i - j). Returns (H, Tq, Tk) fp32 (future keys get a positive bias:
    mask them)."""
    dist = (q_positions[:, None] - k_positions[None, :]).float()
    return -alibi_slopes(num_heads).to(dist.device)[:, None, None] * dist


def logn_scale(q_positions: torch.Tensor, train_length: int) -> torch.Tensor:
    """LogN scaling (Su 2021; Scalable-Softmax with a fixed s): multiply the logits of the query at position i
    by max(1, log(n) / log(train_length)), n = i + 1 visible keys. Returns (Tq,) fp32; 1 inside the training
    length."""
    if train_length < 2:
        raise ValueError(f"train_length must be >= 2, got {train_length}")
    n = (q_positions.float() + 1.0).clamp(min=1.0)
    return (n.log() / math.log(train_length)).clamp(min=1.0)


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even and >= 2, got {head_dim}")
