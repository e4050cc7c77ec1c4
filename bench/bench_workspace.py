"""Workspace smoke benchmark: torch SDPA (causal) against a naive materialising attention."""

from __future__ import annotations

import torch

from bench.harness import BenchContext, benchmark


def naive_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    t = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, H, T, T)
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


@benchmark("attention-naive-vs-sdpa", package="workspace", device="cpu")
def attention_naive_vs_sdpa(ctx: BenchContext) -> None:
    """Naive causal attention (ours here) vs torch SDPA, forward, fp32, B=1, H=8, D=64."""
    sizes = [256, 1024] if ctx.quick else [256, 1024, 2048]
    for t in sizes:
        q, k, v = (torch.randn(1, 8, t, 64) for _ in range(3))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(naive_causal_attention(q, k, v), ref, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            ctx.compare(
                f"T={t}",
                lambda q=q, k=k, v=v: naive_causal_attention(q, k, v),
                lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True
                ),
                ours_name="naive",
                anchor_name="sdpa",
            )
