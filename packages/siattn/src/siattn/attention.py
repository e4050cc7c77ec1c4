"""Scale-invariant attention `attention(q, k, v, ...)` and its torch backends.

Per head (REFERENCE section 1): S = q.k / sqrt(D); L = a_t * S + m_t with t = (q_offset + i) - j; keys after
the query masked when causal; softmax in fp32 (fp64 for fp64 inputs). Without `causal`, t = |i - j|.

Backends:
- "reference": materialises the (Tq, Tk) logits; the specification every other backend is tested against.
- "chunked" (alias "torch"), the CPU fast path: queries in chunks of `chunk` rows against the visible keys,
  so memory is O(chunk x Tk); a `torch.autograd.Function` saves only q, k, v and the backward recomputes each
  chunk's probabilities (FlashAttention's recomputation, with whole rows per chunk). a_t and m_t are computed
  once per call on the vector of distances and read as column slices of two Toeplitz matrices, with the
  causal mask folded in (a = 0, m = -inf), so a chunk costs two matmuls, one `addcmul` and one softmax
  forward, and five matmuls, `addcmul`, softmax, softmax-backward and one multiply backward. Eager on
  purpose: torch.compile of this path unrolls the chunk loop, so each new sequence length recompiles (4-6
  minutes on a shared 2-core CPU) for a 1.6-2.2x gain (packages/siattn/README.md, Benchmarks); it traces
  without graph breaks, so a fixed-length training loop can still compile it.
- "flex": `torch.nn.attention.flex_attention` with a `score_mod`; eager on CPU (forward only there), fused
  when compiled on GPU.
- "triton": the fused kernel in `shared_kernels.si_attention` (CUDA, or CPU under TRITON_INTERPRET=1).
- "auto": triton for CUDA tensors (when no `attn_mask` is given), chunked otherwise.
"""

from __future__ import annotations

import math

import torch

from siattn.coefficients import _check_family, _coefficients, coefficients

BACKENDS = ("auto", "reference", "chunked", "torch", "flex", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def validate_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tau: float,
    causal: bool,
    q_offset: int,
    doc_ids: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
) -> None:
    """Raise a ValueError/TypeError naming the argument for anything `attention` cannot take."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, T, D), got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"batch sizes differ: q has {B}, k has {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"head dims differ: q has {D}, k and v have {k.shape[3]}")
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for GQA")
    _check_family(tau, None, None)
    if not isinstance(q_offset, int) or isinstance(q_offset, bool) or q_offset < 0:
        raise ValueError(f"q_offset must be an int >= 0 (absolute position of the first query), got {q_offset!r}")
    if (causal or doc_ids is not None) and q_offset + Tq > Tk:
        raise ValueError(
            f"q_offset + Tq = {q_offset} + {Tq} exceeds the number of keys Tk = {Tk}: with causal or doc_ids, "
            "query i sits at key position q_offset + i, which must be among the keys (pass the whole cache)"
        )
    if doc_ids is not None:
        if doc_ids.shape != (B, Tk) or doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must be an integer (B, Tk) = ({B}, {Tk}) tensor, got "
                             f"{doc_ids.dtype} {tuple(doc_ids.shape)}")
        if doc_ids.device != q.device:
            raise ValueError(f"doc_ids must be on {q.device}, got {doc_ids.device}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[1] != 1:
            raise ValueError(f"attn_mask must be a bool (B or 1, 1, Tq, Tk) tensor (True = may attend), got "
                             f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
        if attn_mask.shape[0] not in (1, B) or attn_mask.shape[2:] != (Tq, Tk):
            raise ValueError(f"attn_mask must broadcast to ({B}, 1, {Tq}, {Tk}), got {tuple(attn_mask.shape)}")


def _block_logit_terms(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    tau: float,
    causal: bool,
    alpha: float | None,
    beta: float | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a_t, m_t and the causal mask for query positions (C,) against key positions (K,): each (C, K)."""
    t = q_pos[:, None] - k_pos[None, :]
    if causal:
        allowed = t >= 0
        dist = t.clamp(min=0)
    else:
        allowed = torch.ones_like(t, dtype=torch.bool)
        dist = t.abs()
    a, m = coefficients(dist, tau, alpha, beta, dtype=dtype)
    return a, m, allowed


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    tau: float = 10.0,
    causal: bool = True,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    alpha: float | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    """The reference attention probabilities. q (B, Hq, Tq, D), k (B, Hkv, Tk, D) -> (B, Hq, Tq, Tk) in fp32
    (fp64 for fp64 inputs). Rows with no visible key are all zeros."""
    validate_inputs(q, k, k, tau, causal, q_offset, doc_ids, attn_mask)
    _check_family(tau, alpha, beta)
    cdtype = _compute_dtype(q.dtype)
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)  # (B, Hq, Tk, D): query head h reads kv head h // G
    scores = (q.to(cdtype) @ k.to(cdtype).transpose(-1, -2)) / math.sqrt(D)  # (B, Hq, Tq, Tk)
    q_pos = torch.arange(q_offset, q_offset + Tq, device=q.device)
    k_pos = torch.arange(Tk, device=q.device)
    a, m, allowed = _block_logit_terms(q_pos, k_pos, tau, causal, alpha, beta, cdtype)
    logits = a * scores + m
    allowed = allowed.expand(B, 1, Tq, Tk)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, q_offset:q_offset + Tq, None] == doc_ids[:, None, :])[:, None]
    if attn_mask is not None:
        allowed = allowed & attn_mask
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # a row with nothing visible: 0/0 -> 0


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tau: float = 10.0,
    causal: bool = True,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    alpha: float | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    """Materialising reference (the spec). Shapes as `attention`; returns (B, Hq, Tq, D) in q's dtype."""
    probs = attention_weights(q, k, tau=tau, causal=causal, q_offset=q_offset, doc_ids=doc_ids,
                              attn_mask=attn_mask, alpha=alpha, beta=beta)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return (probs @ v.to(probs.dtype)).to(q.dtype)


def _toeplitz_terms(
    tau: float,
    causal: bool,
    alpha: float | None,
    beta: float | None,
    rows: int,
    cols: int,
    shift: int,
    scale: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """a_t * scale and m_t as (rows, cols) matrices with t = i + shift - x at row i, column x.

    The transform depends on t alone, so each query chunk's (C, K) terms are a column slice of these two
    Toeplitz matrices: a_t, m_t are computed once per call on the vector of distances, then laid out with
    `as_strided` (no per-chunk log1p/sqrt). Causal: a_t = 0 and m_t = -inf for t < 0, so a_t * S + m_t is
    the masked logit (S is finite) and no separate mask pass is needed."""
    t = torch.arange(shift + rows - 1, shift - cols, -1, device=device)  # t[y] = shift + rows - 1 - y
    a, m = _coefficients((t.clamp(min=0) if causal else t.abs()).to(dtype), tau, alpha, beta)
    a = a * scale
    if causal:
        a = a.masked_fill(t < 0, 0.0)
        m = m.masked_fill(t < 0, float("-inf"))
    # Row r of the view is rows - 1 - i: entry (r, x) = vec[r + x] has t = i + shift - x; flip the rows back
    # into row-major storage (flip alone keeps the view's column-major strides: 15x slower addcmul reads).
    return tuple(torch.empty(rows, cols, dtype=dtype, device=device).copy_(x.as_strided((rows, cols), (1, 1)).flip(0))
                 for x in (a, m))


def _chunk_plan(Tq: int, Tk: int, q_offset: int, causal: bool, chunk: int):
    """(start, end, visible keys, first Toeplitz column) per query chunk, and the Toeplitz (rows, cols, shift).

    Column x of the Toeplitz matrices is key x - shift + q_offset + s for the chunk starting at s, with shift =
    q_offset + s_last so every chunk's columns start at s_last - s >= 0."""
    s_last = (Tq - 1) // chunk * chunk
    plan = []
    for s in range(0, Tq, chunk):
        e = min(s + chunk, Tq)
        kend = min(Tk, q_offset + e) if causal else Tk
        plan.append((s, e, kend, s_last - s))
    return plan, (min(chunk, Tq), Tk + s_last, q_offset + s_last)


class _ChunkedSIAttention(torch.autograd.Function):
    """Chunked forward (whole visible rows per query chunk) with a recomputing backward that saves only q, k,
    v: per chunk, one matmul for q.k, one fused `addcmul` for a_t * S + m_t (causal mask included), one
    softmax, one matmul with v. The backward recomputes the same probabilities bit for bit and uses the fused
    softmax backward P * (dP - rowsum(P dP)). GQA without copies of k, v: the G query heads of a kv head are
    stacked as G * C rows of one matmul, so the (N, G*C, K) blocks are (B*Hkv) batched matmuls."""

    @staticmethod
    def forward(ctx, q, k, v, doc_ids, attn_mask, tau, causal, q_offset, alpha, beta, chunk):
        B, Hq, Tq, D = q.shape
        Hkv = k.shape[1]
        outs = [(probs @ vc).view(B, Hkv, Hq // Hkv, e - s, D)  # one cat at the end: fewer (parallel) ops
                for s, e, _, _, vc, _, probs in _chunk_blocks(q, k, v, doc_ids, attn_mask, tau, causal, q_offset,
                                                              alpha, beta, chunk)]
        ctx.save_for_backward(q, k, v, doc_ids, attn_mask)
        ctx.args = (tau, causal, q_offset, alpha, beta, chunk)
        return torch.cat(outs, dim=3).view(B, Hq, Tq, D).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, doc_ids, attn_mask = ctx.saved_tensors
        cdtype = _compute_dtype(q.dtype)
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G, N = Hq // Hkv, B * Hkv
        dout = grad_out.to(cdtype).reshape(B, Hkv, G, Tq, D)
        dqs = []
        dk = torch.zeros(N, Tk, D, dtype=cdtype, device=q.device)
        dv = torch.zeros(N, Tk, D, dtype=cdtype, device=q.device)
        for s, e, qc, kc, vc, a, probs in _chunk_blocks(q, k, v, doc_ids, attn_mask, *ctx.args):
            C, kend = e - s, kc.shape[1]
            do = dout[:, :, :, s:e].reshape(N, G * C, D)
            dv[:, :kend].baddbmm_(probs.transpose(1, 2), do)  # sums the G query heads of each kv head
            dprobs = do @ vc.transpose(1, 2)  # (N, G*C, K)
            # P * (dP - rowsum(P dP)), in place over dP like the forward softmax
            dscores = torch.ops.aten._softmax_backward_data.out(dprobs, probs, -1, cdtype, grad_input=dprobs)
            dscores = dscores.view(B, Hkv, G, C, kend).mul_(a).view(N, G * C, kend)  # dL * a_t / sqrt(D)
            dqs.append((dscores @ kc).view(B, Hkv, G, C, D))
            dk[:, :kend].baddbmm_(dscores.transpose(1, 2), qc)
        dq = torch.cat(dqs, dim=3).view(B, Hq, Tq, D)
        return (dq.to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype),
                None, None, None, None, None, None, None, None)


def _chunk_blocks(q, k, v, doc_ids, attn_mask, tau, causal, q_offset, alpha, beta, chunk):
    """Per query chunk [s, e) with K visible keys: (s, e, qc (N, G*C, D), kc and vc (N, K, D), a_t / sqrt(D)
    (C, K), probabilities (N, G*C, K)) in the compute dtype, N = B * Hkv, G = Hq / Hkv."""
    cdtype = _compute_dtype(q.dtype)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G, N = Hq // Hkv, B * Hkv
    plan, (rows, cols, shift) = _chunk_plan(Tq, Tk, q_offset, causal, chunk)
    a_all, m_all = _toeplitz_terms(tau, causal, alpha, beta, rows, cols, shift, 1.0 / math.sqrt(D), cdtype, q.device)
    qg = q.to(cdtype).view(B, Hkv, G, Tq, D)
    k3, v3 = k.to(cdtype).reshape(N, Tk, D), v.to(cdtype).reshape(N, Tk, D)
    for s, e, kend, c0 in plan:
        C = e - s
        qc = qg[:, :, :, s:e].reshape(N, G * C, D)
        a = a_all[:C, c0:c0 + kend]
        probs = _chunk_probs(qc, k3[:, :kend], a, m_all[:C, c0:c0 + kend],
                             _chunk_hidden(doc_ids, attn_mask, q_offset, s, e, kend), (B, Hkv, G, C, kend),
                             attn_mask is not None)
        yield s, e, qc, k3[:, :kend], v3[:, :kend], a, probs


def _chunk_hidden(doc_ids, attn_mask, q_offset, s, e, kend):
    """Keys a chunk's queries may not see beyond the causal ones: (B, 1, 1, C, K) bool, or None."""
    hidden = None
    if doc_ids is not None:
        same = doc_ids[:, q_offset + s:q_offset + e, None] == doc_ids[:, None, :kend]  # (B, C, K)
        hidden = ~same[:, None, None]
    if attn_mask is not None:
        masked = ~attn_mask[:, None, :, s:e, :kend]
        hidden = masked if hidden is None else hidden | masked
    return hidden


def _chunk_probs(qc, kc, a, m, hidden, shape5, empty_rows):
    """Softmax over the visible keys of a_t * (q.k) / sqrt(D) + m_t: qc (N, G*C, D), kc (N, K, D), a and m
    (C, K) -> (N, G*C, K). Rows with no visible key (possible only with attn_mask: `empty_rows`) are zeros."""
    logits = (qc @ kc.transpose(1, 2)).view(shape5)  # (B, Hkv, G, C, K)
    torch.addcmul(m, logits, a, out=logits)  # in place: one (G*C, K) buffer per kv head
    if hidden is not None:
        logits.masked_fill_(hidden, float("-inf"))
    # In place (the CPU kernel finishes each row's max and sum before writing it): one buffer per chunk.
    probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
    if empty_rows:
        probs.nan_to_num_(nan=0.0)
    return probs.view(qc.shape[0], qc.shape[1], -1)


def attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tau: float = 10.0,
    causal: bool = True,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    chunk: int = 128,
) -> torch.Tensor:
    """Chunked torch path: memory O(chunk x Tk) in forward and backward. Shapes as `attention`."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    _check_family(tau, alpha, beta)
    if q.shape[2] == 0:  # no queries: nothing to chunk (the reference returns the empty, differentiable result)
        return attention_ref(q, k, v, tau=tau, causal=causal, q_offset=q_offset, doc_ids=doc_ids,
                             attn_mask=attn_mask, alpha=alpha, beta=beta)
    return _ChunkedSIAttention.apply(q, k, v, doc_ids, attn_mask, tau, causal, q_offset, alpha, beta, chunk)


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
    compiled: bool = False,
) -> torch.Tensor:
    """FlexAttention with the transform as a `score_mod`. On CPU, forward only (torch has no CPU flex backward);
    eager flex materialises the scores, `compiled=True` wraps it in `torch.compile`. Shapes as `attention`."""
    from torch.nn.attention.flex_attention import flex_attention

    _check_family(tau, alpha, beta)
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("backend='flex' has no backward on CPU; use backend='chunked' for training on CPU")
    if q.device.type == "cpu":  # flex refuses CPU tensors that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    if alpha is None:
        alpha, beta = math.exp(0.5), math.exp(0.5)
    offset_ab = beta / alpha - math.log(alpha)  # a_t^2 = 2 (log1p(t/tau) + offset_ab)
    offset = torch.tensor(q_offset, device=q.device)  # a tensor, so a new q_offset is not a recompile

    def score_mod(score, b, h, q_idx, kv_idx):
        t = (q_idx + offset - kv_idx).to(torch.float32)
        dist = t.clamp(min=0) if causal else t.abs()
        a_sq = 2.0 * (torch.log1p(dist / tau) + offset_ab)
        logit = torch.sqrt(a_sq) * score + (beta / alpha - a_sq)
        keep = t >= 0 if causal else t == t
        if doc_ids is not None:
            keep = keep & (doc_ids[b, q_idx + offset] == doc_ids[b, kv_idx])
        return torch.where(keep, logit, -float("inf"))

    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = fn(q, k, v, score_mod=score_mod, enable_gqa=q.shape[1] != k.shape[1], scale=1.0 / math.sqrt(q.shape[-1]))
    return out


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
) -> torch.Tensor:
    """Scale-invariant attention.

    Args:
        q: (B, Hq, Tq, D) queries, already position-encoded (e.g. p-RoPE); query i sits at q_offset + i.
        k, v: (B, Hkv, Tk, D), Hq a multiple of Hkv (GQA: query head h reads kv head h // (Hq/Hkv)); key j at j.
        tau: scale of the transform (> 0).
        causal: mask keys after each query (t < 0). Without it, t = |i - j|.
        q_offset: absolute position of the first query (KV-cache decoding: Tk - Tq).
        doc_ids: optional (B, Tk) integer ids of packed documents; attention never crosses documents.
        backend: "auto" | "reference" | "chunked" ("torch") | "flex" | "triton".
        attn_mask: optional bool (B or 1, 1, Tq, Tk), True = may attend (padding masks); torch backends only.
        alpha, beta: the general coefficient family (both or neither).
        chunk: query rows per chunk of the chunked backend (128: fastest of 64/128/256 at T=1024..4096 on
            CPU; the score buffers are Hq x chunk x Tk).
    Returns:
        (B, Hq, Tq, D) in q's dtype. Softmax and a_t, m_t in fp32 (fp64 for fp64 inputs).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    validate_inputs(q, k, v, tau, causal, q_offset, doc_ids, attn_mask)
    if backend == "auto":
        from shared_kernels.backend import resolve_backend

        use_triton = attn_mask is None and resolve_backend("auto", q.device) == "triton"
        backend = "triton" if use_triton else "chunked"
    kwargs = dict(tau=tau, causal=causal, q_offset=q_offset, doc_ids=doc_ids, alpha=alpha, beta=beta)
    if backend == "reference":
        return attention_ref(q, k, v, attn_mask=attn_mask, **kwargs)
    if backend in ("chunked", "torch"):
        return attention_chunked(q, k, v, attn_mask=attn_mask, chunk=chunk, **kwargs)
    if attn_mask is not None:
        raise ValueError(f"attn_mask is supported by the torch backends only, not backend={backend!r}")
    if backend == "flex":
        return attention_flex(q, k, v, **kwargs)
    from shared_kernels.backend import resolve_backend
    from shared_kernels.si_attention import si_attention

    resolve_backend("triton", q.device)  # raises with a clear message off CUDA without the interpreter
    return si_attention(q, k, v, tau=tau, causal=causal, q_offset=q_offset, doc_ids=doc_ids, alpha=alpha,
                        beta=beta)
