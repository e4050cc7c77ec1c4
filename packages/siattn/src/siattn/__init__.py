"""Scale-invariant attention (arXiv 2505.17083): position-dependent affine logits a_t * score + m_t with
p-RoPE, several backends (reference, chunked torch, FlexAttention, fused Triton), KV-cache decoding and a
transformers integration (`siattn.hf`, needs the `hf` extra)."""

from siattn.attention import (
    BACKENDS,
    attention,
    attention_chunked,
    attention_flex,
    attention_ref,
    attention_weights,
    si_block_mask,
    si_mask_mod,
    si_score_mod,
)
from siattn.coefficients import coefficients
from siattn.positional import (
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    logn_scale,
    nope_frequencies,
    p_rope_frequencies,
    positions_in_documents,
    rope_frequencies,
)

__all__ = [
    "BACKENDS",
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "attention",
    "attention_chunked",
    "attention_flex",
    "attention_ref",
    "attention_weights",
    "coefficients",
    "logn_scale",
    "nope_frequencies",
    "p_rope_frequencies",
    "positions_in_documents",
    "rope_frequencies",
    "si_block_mask",
    "si_mask_mod",
    "si_score_mod",
]
