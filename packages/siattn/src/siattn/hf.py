"""transformers integration: switch a Llama / Qwen2 / Qwen3 family causal LM to scale-invariant p-RoPE
attention with one call. The only module of siattn that imports transformers (the `hf` extra).

    import siattn.hf
    model = AutoModelForCausalLM.from_pretrained(path)           # any Llama-like model, 4-bit ones too
    siattn.hf.apply(model, tau=10.0, rope="p-rope", fraction=0.5, base=1024.0)
    model.generate(...)                                          # DynamicCache decoding: same logits as full
    model.save_pretrained(out)                                   # config.json records the settings
    model = siattn.hf.from_pretrained(out)                       # loads and re-applies them

How: an attention function registered with transformers' `AttentionInterface` as "siattn" (and the sdpa mask
builder under the same name), selected with `set_attn_implementation`; the model's rotary embedding keeps its
layout but its inverse frequencies are replaced (p-RoPE / RoPE / NoPE) and its attention scaling set to 1.
The query of a cached step sits at q_offset = (keys in cache) - (new queries), which is exact for the
default DynamicCache; static / sliding caches are not supported. Padding masks are honoured (torch backends).

Packed sequences (training with packing): pass `position_ids` restarting at 0 for each document (as
DataCollatorWithFlattening does), or `doc_ids=` (B, T) document ids to the model's forward; attention never
crosses a document, so each document's logits equal the document run alone, KV-cache decoding included:

    out = model(input_ids, position_ids=positions_within_documents, labels=labels)
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM
from transformers.masking_utils import sdpa_mask

from shared_kernels.si_attention import check_si_family
from siattn.attention import attention
from siattn.positional import nope_frequencies, p_rope_frequencies, rope_frequencies

ATTN_IMPLEMENTATION = "siattn"
ROPES = ("p-rope", "rope", "nope", "keep")
CONFIG_KEY = "siattn"


def siattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function. query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D) with the cache
    included; returns ((B, Tq, Hq, D), None) like transformers' sdpa function."""
    settings = getattr(module.config, CONFIG_KEY, None) or {}
    if dropout and module.training:
        raise ValueError("siattn attention has no attention dropout; set the model's attention_dropout to 0")
    D = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, D**-0.5, rel_tol=1e-6):
        query = query * (scaling * math.sqrt(D))  # the kernel divides by sqrt(D) itself
    mask = None
    if attention_mask is not None:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        mask = mask[:, :, :, : key.shape[2]]
    q_offset = key.shape[2] - query.shape[2]
    doc_ids, mask = _document_masks(
        query.shape[0],
        query.shape[2],
        key.shape[2],
        kwargs.get("position_ids"),
        kwargs.get("doc_ids"),
        mask,
        query.device,
    )
    out = attention(
        query,
        key,
        value,
        tau=settings.get("tau", 10.0),
        causal=True,
        q_offset=q_offset,
        doc_ids=doc_ids,
        attn_mask=mask,
        backend=settings.get("backend", "auto"),
    )
    return out.transpose(1, 2).contiguous(), None


def _document_masks(
    B: int,
    Tq: int,
    Tk: int,
    position_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(doc_ids (B, Tk) or None, attn_mask (B, 1, Tq, Tk) or None) that keep packed documents apart.

    Explicit `doc_ids` (B, Tk) cover the cached and the new tokens. Otherwise documents come from
    `position_ids` (B or 1, Tq), the query positions inside their document: query i (absolute index
    q_offset + i) starts its document at start_i = q_offset + i - position_ids[i], and sees keys start_i ..
    q_offset + i. Unpacked inputs (positions counting from 0 or continuing the cache) have start_i <= 0 and
    change nothing. In a full pass (Tq == Tk) start is a document id for keys too, which keeps the Triton
    path; a cached step needs only the queries' starts, so decoding a packed row needs no memory of the
    prefix."""
    if doc_ids is not None:
        if not isinstance(doc_ids, torch.Tensor) or doc_ids.shape != (B, Tk):
            raise ValueError(
                f"doc_ids must be a (batch, keys) = ({B}, {Tk}) integer tensor covering the cached "
                f"and new tokens, got {getattr(doc_ids, 'shape', type(doc_ids).__name__)}"
            )
        return doc_ids.to(device), mask
    if position_ids is None:
        return None, mask
    q_offset = Tk - Tq
    start = torch.arange(q_offset, Tk, device=device) - position_ids.to(device).expand(B, Tq)  # (B, Tq)
    if not bool((start > 0).any()):
        return None, mask
    if Tq == Tk:
        return start, mask
    visible = (
        torch.arange(Tk, device=device)[None, None, None, :] >= start[:, None, :, None]
    )  # (B, 1, Tq, Tk)
    return None, visible if mask is None else mask & visible


AttentionInterface.register(ATTN_IMPLEMENTATION, siattn_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


def apply(
    model: torch.nn.Module,
    tau: float = 10.0,
    rope: str = "p-rope",
    fraction: float = 0.5,
    base: float = 1024.0,
    backend: str = "auto",
) -> torch.nn.Module:
    """Switch `model` (in place) to scale-invariant attention with the given positional encoding.

    Args:
        model: a transformers causal LM of the Llama / Qwen2 / Qwen3 families (quantized ones included).
        tau: scale-invariant attention's tau (> 0).
        rope: "p-rope" (frequencies `(1/base)**linspace(0,1,n)` on `fraction` of the pairs, 0 on the rest),
            "rope" (standard RoPE with theta = `base`), "nope" (no rotation) or "keep" (the model's own RoPE).
        fraction: p-RoPE's share of rotating pairs.
        base: p-RoPE base, or RoPE theta with rope="rope".
        backend: passed to `siattn.attention` ("auto": the Triton kernel on CUDA without padding masks).
    Returns:
        the same model; `model.config.siattn` records the settings so `from_pretrained` can restore them.
    """
    check_si_family(tau, None, None)
    if rope not in ROPES:
        raise ValueError(f"rope must be one of {ROPES}, got {rope!r}")
    rotaries = _rotary_modules(model)
    if not rotaries or not hasattr(model, "config"):
        raise ValueError(
            f"model must be a transformers model with a rotary embedding, got {type(model).__name__}"
        )
    for rotary in rotaries:
        current = cast(torch.Tensor, rotary.inv_freq)  # a transformers rotary embedding's buffer
        dim = 2 * current.numel()
        if rope == "keep":
            continue
        if rope == "p-rope":
            inv_freq = p_rope_frequencies(dim, fraction, base)
        elif rope == "rope":
            inv_freq = rope_frequencies(dim, base)
        else:
            inv_freq = nope_frequencies(dim)
        inv_freq = inv_freq.to(current.device)
        rotary.inv_freq = inv_freq  # assigning to a registered buffer keeps it a (non-persistent) buffer
        if hasattr(rotary, "original_inv_freq"):
            rotary.original_inv_freq = inv_freq.clone()
        plain = cast(Any, rotary)  # attention_scaling, rope_type: plain attributes of transformers' rotaries
        plain.attention_scaling = 1.0
        if hasattr(rotary, "rope_type"):
            plain.rope_type = "default"  # no dynamic rescaling of our frequencies
    settings = {
        "tau": float(tau),
        "rope": rope,
        "fraction": float(fraction),
        "base": float(base),
        "backend": backend,
    }
    setattr(model.config, CONFIG_KEY, settings)
    cast(Any, model).set_attn_implementation(ATTN_IMPLEMENTATION)  # a transformers PreTrainedModel
    return model


def from_pretrained(path: str, **kwargs: Any) -> torch.nn.Module:
    """Load a model saved after `apply` and re-apply its recorded settings (kwargs go to
    `AutoModelForCausalLM.from_pretrained`; settings can be overridden by passing them to `apply` again)."""
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    settings = getattr(model.config, CONFIG_KEY, None)
    if not settings:
        raise ValueError(
            f"{path} has no '{CONFIG_KEY}' entry in its config: it was not saved after siattn.hf.apply"
        )
    return apply(model, **settings)
