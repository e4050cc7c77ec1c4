"""Scale-invariant attention `attention(q, k, v, ...)`: the paper-level layer over the op in
`shared_kernels.si_attention` (coefficients, input checks, reference, chunked torch path, Triton kernel live
there), adding the materialising reference and FlexAttention as backends.

Per head (REFERENCE section 1): S = q.k / sqrt(D); L = a_t * S + m_t with t = (q_offset + i) - j; keys after
the query masked when causal; softmax in fp32 (fp64 for fp64 inputs). Without `causal`, t = |i - j|.

Backends:
- "reference": materialises the (Tq, Tk) logits; the specification every other backend is tested against.
- "chunked" (alias "torch"): the op's torch path, memory O(chunk x Tk), recomputing backward.
- "triton": the op's fused kernel (CUDA, or CPU under TRITON_INTERPRET=1).
- "flex": `torch.nn.attention.flex_attention` with `si_score_mod` (the transform alone) and a block mask
  built from `si_mask_mod` (causal and document masks), so fully masked blocks are skipped; compiled with
  torch.compile on CUDA (or with `compile_flex=True`), eager on CPU (forward only there: torch has no CPU
  flex backward).
- "auto": the op's choice (Triton for CUDA tensors without `attn_mask`, the chunked path otherwise).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from shared_kernels.si_attention import (
    check_si_inputs,
    si_attention,
    si_attention_ref,
    si_attention_weights,
    si_coefficients,
)

BACKENDS = ("auto", "reference", "chunked", "torch", "flex", "triton")

attention_ref = si_attention_ref
attention_weights = si_attention_weights


def attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """The chunked torch path: `attention(..., backend="chunked")`."""
    return si_attention(q, k, v, backend="torch", **kwargs)


def si_score_mod(
    tau: float,
    causal: bool,
    q_offset: int | torch.Tensor,
    alpha: float | None = None,
    beta: float | None = None,
) -> Callable:
    """A flex `score_mod` applying L = a_t * S + m_t (flex passes S already scaled by 1/sqrt(D)); masking is
    left to the block mask. `q_offset` may be a 0-d tensor, so a new offset is not a recompile."""

    def score_mod(score, b, h, q_idx, kv_idx):
        t = q_idx + q_offset - kv_idx
        dist = (t.clamp(min=0) if causal else t.abs()).to(torch.float32)
        a, m = si_coefficients(dist, tau, alpha, beta)
        return a * score + m

    return score_mod


def si_mask_mod(causal: bool, q_offset: int | torch.Tensor, doc_ids: torch.Tensor | None) -> Callable | None:
    """A flex `mask_mod` (True = may attend) for the causal and document masks, or None when nothing is
    masked. doc_ids: (B, Tk) integer ids; query i sits at key position q_offset + i."""
    if not causal and doc_ids is None:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (q_idx + q_offset >= kv_idx) if causal else (kv_idx >= 0)
        if doc_ids is not None:
            keep = keep & (doc_ids[b, q_idx + q_offset] == doc_ids[b, kv_idx])
        return keep

    return mask_mod


def si_block_mask(
    B: int,
    Tq: int,
    Tk: int,
    *,
    causal: bool = True,
    q_offset: int | torch.Tensor = 0,
    doc_ids: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    block_size: int = 128,
):
    """The flex `BlockMask` of the causal / document masks (None when nothing is masked): blocks of
    (block_size x block_size) with no visible key are skipped, partly visible ones apply `si_mask_mod`."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = si_mask_mod(causal, q_offset, doc_ids)
    if mask_mod is None:
        return None
    return create_block_mask(
        mask_mod, B if doc_ids is not None else None, None, Tq, Tk, device=device, BLOCK_SIZE=block_size
    )


_COMPILED_FLEX: Callable | None = None


def _flex_function(compiled: bool) -> Callable:
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tau: float = 10.0,
    causal: bool = True,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    compiled: bool | None = None,
    block_size: int = 128,
) -> torch.Tensor:
    """FlexAttention with `si_score_mod` and `si_block_mask`. Shapes as `attention`.

    compiled: torch.compile the flex call (the fused kernel; None = on CUDA only). On CPU flex runs forward
    only, and eager flex materialises the scores."""
    check_si_inputs(
        q, k, v, tau=tau, causal=causal, q_offset=q_offset, doc_ids=doc_ids, alpha=alpha, beta=beta
    )
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("backend='flex' has no backward on CPU; use backend='chunked' for training on CPU")
    if q.device.type == "cpu":  # flex refuses CPU tensors that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    compiled = q.device.type == "cuda" if compiled is None else compiled
    offset = torch.tensor(q_offset, device=q.device)  # a tensor, so a new q_offset is not a recompile
    block_mask = si_block_mask(
        q.shape[0],
        q.shape[2],
        k.shape[2],
        causal=causal,
        q_offset=offset,
        doc_ids=doc_ids,
        device=q.device,
        block_size=block_size,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex_function(compiled)(
            q,
            k,
            v,
            score_mod=si_score_mod(tau, causal, offset, alpha, beta),
            block_mask=block_mask,
            enable_gqa=q.shape[1] != k.shape[1],
            scale=1.0 / math.sqrt(q.shape[-1]),
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tau: float = 10.0,
    causal: bool = True,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    backend: str = "auto",
    attn_mask: torch.Tensor | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    chunk: int = 128,
    compile_flex: bool | None = None,
) -> torch.Tensor:
    """Scale-invariant attention.

    Args:
        q: (B, Hq, Tq, D) queries, already position-encoded (e.g. p-RoPE); query i sits at q_offset + i.
        k, v: (B, Hkv, Tk, D), Hq a multiple of Hkv (GQA: query head h reads kv head h // (Hq/Hkv));
            key j at j.
        tau: scale of the transform (> 0).
        causal: mask keys after each query (t < 0). Without it, t = |i - j|.
        q_offset: absolute position of the first query (KV-cache decoding: Tk - Tq).
        doc_ids: optional (B, Tk) integer ids of packed documents; attention never crosses documents.
        backend: "auto" | "reference" | "chunked" ("torch") | "flex" | "triton".
        attn_mask: optional bool (B or 1, 1, Tq, Tk), True = may attend (padding masks); reference and
            chunked.
        alpha, beta: the general coefficient family (both or neither).
        chunk: query rows per chunk of the chunked backend.
        compile_flex: torch.compile the flex backend (None: on CUDA only).
    Returns:
        (B, Hq, Tq, D) in q's dtype. Softmax and a_t, m_t in fp32 (fp64 for fp64 inputs).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kwargs: dict[str, Any] = dict(
        tau=tau, causal=causal, q_offset=q_offset, doc_ids=doc_ids, alpha=alpha, beta=beta
    )
    if backend == "reference":
        return si_attention_ref(q, k, v, attn_mask=attn_mask, **kwargs)
    if backend == "flex":
        if attn_mask is not None:
            raise ValueError(
                "attn_mask is supported by the reference, chunked and auto backends, not 'flex' "
                "(use doc_ids for packed documents)"
            )
        return attention_flex(q, k, v, compiled=compile_flex, **kwargs)
    op_backend = {"chunked": "torch"}.get(backend, backend)
    return si_attention(q, k, v, attn_mask=attn_mask, backend=op_backend, chunk=chunk, **kwargs)
