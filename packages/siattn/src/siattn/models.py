"""A small GPT with a pluggable positional encoding and attention variant, for length-generalisation studies
(`siattn.lengthgen`) and apps that pretrain small LMs.

    from siattn.models import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=256, position="p-rope", attention="si", tau=10.0, p_rope_base=8.0))
    logits = model(tokens)                          # tokens (B, T) int64 -> (B, T, vocab_size)
    cache = model.new_cache()                       # incremental decoding
    logits = model(tokens[:, :10], cache=cache)     # then model(tokens[:, 10:11], cache=cache), ...

Variants (orthogonal): `position` in "rope" | "p-rope" | "nope" | "alibi" and `attention` in
"softmax" (standard, via SDPA) | "si" (scale-invariant, `siattn.attention`) | "logn" (softmax with LogN
scaling of the logits beyond `train_length`). The paper's "SI p-RoPE" is position="p-rope", attention="si";
"LogN+p-RoPE" is position="p-rope", attention="logn". Blocks are pre-norm with QK-norm (RMSNorm on q and k per
head, before the rotation), as in the paper's modded-nanogpt setup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from siattn.attention import attention as si_attention
from siattn.positional import (
    alibi_bias,
    apply_rotary,
    logn_scale,
    nope_frequencies,
    p_rope_frequencies,
    rope_frequencies,
)

POSITIONS = ("rope", "p-rope", "nope", "alibi")
ATTENTIONS = ("softmax", "si", "logn", "logn-learned")


@dataclass
class GPTConfig:
    """Args:
    vocab_size: tokens (256 for bytes).
    n_layer, d_model, n_head: depth, width, query heads (head dim = d_model / n_head, even).
    n_kv_head: key/value heads (GQA); None = n_head.
    mlp_ratio: hidden width of the MLP over d_model.
    position: "rope" | "p-rope" | "nope" | "alibi".
    attention: "softmax" | "si" | "logn" (fixed LogN scale at evaluation) | "logn-learned" (Scalable-Softmax:
        logits x s_h log(n) at every position, s_h a learned per-head scale initialised to
        1 / log(train_length)).
    rope_base: RoPE theta. p_rope_fraction, p_rope_base: p-RoPE's kept share of pairs and base.
    tau: scale-invariant attention's tau. train_length: LogN's reference length (the training context).
    qk_norm: RMSNorm on q and k per head. si_backend: backend passed to `siattn.attention`.
    """

    vocab_size: int = 256
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    n_kv_head: int | None = None
    mlp_ratio: int = 4
    position: str = "p-rope"
    attention: str = "si"
    rope_base: float = 10000.0
    p_rope_fraction: float = 0.5
    p_rope_base: float = 1024.0
    tau: float = 10.0
    train_length: int = 128
    qk_norm: bool = True
    si_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model ({self.d_model}) / n_head ({self.n_head}) must be an even integer")
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({kv})")
        if self.position == "alibi" and self.attention == "si":
            raise ValueError("attention='si' with position='alibi' is not a studied combination")


class KVCache:
    """Per-layer keys and values (B, Hkv, T, D) after the rotation, appended as decoding proceeds."""

    def __init__(self, n_layer: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def length(self, layer: int = 0) -> int:
        """Tokens already cached for `layer`."""
        keys = self.keys[layer]
        return 0 if keys is None else keys.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prev_k, prev_v = self.keys[layer], self.values[layer]
        if prev_k is not None and prev_v is not None:
            k = torch.cat([prev_k, k], dim=2)
            v = torch.cat([prev_v, v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    inv_freq: torch.Tensor  # a non-persistent buffer (the rotation's inverse frequencies)

    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_head, self.n_kv = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(cfg.d_model, 2 * self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        if cfg.position == "rope":
            inv_freq = rope_frequencies(self.head_dim, cfg.rope_base)
        elif cfg.position == "p-rope":
            inv_freq = p_rope_frequencies(self.head_dim, cfg.p_rope_fraction, cfg.p_rope_base)
        else:
            inv_freq = nope_frequencies(self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if cfg.attention == "logn-learned":
            self.logn_s = nn.Parameter(torch.full((self.n_head,), 1.0 / math.log(cfg.train_length)))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        offset = 0 if cache is None else cache.length(self.layer)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        pos = torch.arange(offset, offset + T, device=x.device)
        if self.cfg.position in ("rope", "p-rope"):
            q, k = apply_rotary(q, pos, self.inv_freq), apply_rotary(k, pos, self.inv_freq)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = self._attend(q, k, v, pos)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q, k, v, q_pos):
        cfg = self.cfg
        Tq, Tk = q.shape[2], k.shape[2]
        offset = Tk - Tq
        if cfg.attention == "si":
            return si_attention(q, k, v, tau=cfg.tau, causal=True, q_offset=offset, backend=cfg.si_backend)
        if cfg.attention == "logn":
            q = q * logn_scale(q_pos, cfg.train_length).to(q.dtype)[:, None]
        if cfg.attention == "logn-learned":  # n = q_pos + 1 visible keys; log(1) = 0 only where n = 1
            q = q * (self.logn_s[:, None, None] * torch.log(q_pos.float() + 1.0).clamp(min=1e-6)[:, None]).to(
                q.dtype
            )
        gqa = self.n_head != self.n_kv
        if cfg.position == "alibi":
            bias = alibi_bias(self.n_head, q_pos, torch.arange(Tk, device=q.device)).to(q.dtype)
            bias = bias.masked_fill(q_pos[:, None] < torch.arange(Tk, device=q.device), float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)
        if offset == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = q_pos[:, None] >= torch.arange(Tk, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, layer)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False),
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only LM. forward(tokens (B, T) int64, cache=None) -> logits (B, T, vocab_size) fp32."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for block in self.layers:  # GPT-2's scaled init of the residual projections
            for proj in (block.attn.o_proj, cast(nn.Linear, block.mlp[2])):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @property
    def layers(self) -> list[Block]:
        """The blocks, typed (iterating an nn.ModuleList gives plain Modules)."""
        return [cast(Block, block) for block in self.blocks]

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be (B, T) int64, got {tokens.dtype} {tuple(tokens.shape)}")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cache)
        return self.head(self.norm(x)).float()
