"""Fused scale-invariant attention (arXiv 2505.17083) in Triton: forward and backward, causal, GQA, q_offset,
packed documents.

Math per (query i, key j), t = (q_offset + i) - j (|t| when not causal):
    S = q.k / sqrt(D);  a_t = sqrt(2 (log(1 + t/tau) + c)),  m_t = beta/alpha - a_t^2,  c = beta/alpha - log(alpha)
    (alpha = beta = e^0.5 gives a_t^2 = 1 + 2 log(1 + t/tau), m_t = 1 - a_t^2)
    L = a_t S + m_t;  P = softmax(L) over the visible keys;  O = P V.
The kernels follow FlashAttention-2: the forward keeps a running max and sum per row in base 2 (L * log2(e)),
with a_t and m_t computed in fp32 from the block's positions before the running max, and stores the row
log-sum-exp. The backward recomputes P from it: dV = P^T dO, dP = dO V^T, dL = P (dP - rowsum(dO O)),
dS = dL a_t / sqrt(D), dQ = dS K, dK = dS^T Q. dK/dV are accumulated per key block over the G query heads of
each KV head (no atomics); dQ per query block.

The launches are `torch.library` custom ops (`shared_kernels::si_attention_fwd` / `_bwd`, with fake
implementations and the backward registered as the forward's autograd formula), so torch.compile traces
`si_attention` as one op without a graph break.

Precision: scores and softmax in fp32 always; fp32 inputs use IEEE fp32 dots (no TF32); bf16/fp16 inputs feed
the tensor cores in their dtype on GPU. Under TRITON_INTERPRET=1 every dot runs in fp32 (the interpreter's
bf16 arithmetic is wrong).
"""

from __future__ import annotations

import math

import torch

from shared_kernels.backend import triton_available, triton_interpreting


def si_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tau: float = 10.0,
    causal: bool = True,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    alpha: float | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    """Pure torch specification. q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Hq, Tq, D) in q's dtype."""
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    alpha, beta = (math.exp(0.5), math.exp(0.5)) if alpha is None else (alpha, beta)
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    group = Hq // k.shape[1]
    k = k.repeat_interleave(group, 1).to(cdtype)
    v = v.repeat_interleave(group, 1).to(cdtype)
    scores = q.to(cdtype) @ k.transpose(-1, -2) / math.sqrt(D)
    t = torch.arange(q_offset, q_offset + Tq, device=q.device)[:, None] - torch.arange(Tk, device=q.device)
    dist = (t.clamp(min=0) if causal else t.abs()).to(cdtype)
    a_sq = 2.0 * (torch.log1p(dist / tau) + beta / alpha - math.log(alpha))
    logits = a_sq.sqrt() * scores + (beta / alpha - a_sq)
    visible = (t >= 0) if causal else torch.ones_like(t, dtype=torch.bool)
    visible = visible.expand(B, 1, Tq, Tk)
    if doc_ids is not None:
        visible = visible & (doc_ids[:, q_offset:q_offset + Tq, None] == doc_ids[:, None, :])[:, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return (probs @ v).to(q.dtype)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _logits_block(q, k, offs_m, offs_n, q_offset, Tk, doc_q, doc_k, sm_scale, inv_tau, c_ab, b_over_a,
                      CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr):
        """Masked logits (fp32, natural units) and a_t * sm_scale for one (BLOCK_M, BLOCK_N) tile."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        t = (q_offset + offs_m)[:, None] - offs_n[None, :]
        if CAUSAL:
            dist = tl.maximum(t, 0).to(tl.float32)
            visible = (t >= 0) & (offs_n[None, :] < Tk)
        else:
            dist = tl.abs(t).to(tl.float32)
            visible = offs_n[None, :] < Tk
        if HAS_DOC:
            visible = visible & (doc_q[:, None] == doc_k[None, :])
        a_sq = 2.0 * (tl.log(1.0 + dist * inv_tau) + c_ab)
        a_scaled = tl.sqrt(a_sq) * sm_scale
        logits = a_scaled * s + (b_over_a - a_sq)
        logits = tl.where(visible, logits, float("-inf"))
        return logits, a_scaled

    @triton.jit
    def _si_attn_fwd(Q, K, V, DOC, O, LSE, Tq, Tk, q_offset, sm_scale, inv_tau, c_ab, b_over_a,
                     HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                     IEEE: tl.constexpr, FP32_DOTS: tl.constexpr):
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HQ
        h = bh % HQ
        bkv = b * (HQ // GROUP) + h // GROUP  # flat (batch, kv head) index
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        m_mask = offs_m < Tq
        q = tl.load(Q + (bh * Tq + offs_m[:, None]) * D + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                    other=0.0)
        if FP32_DOTS:
            q = q.to(tl.float32)
        doc_q = offs_m
        if HAS_DOC:
            doc_q = tl.load(DOC + b * Tk + q_offset + offs_m, mask=m_mask, other=-1)
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        LOG2E: tl.constexpr = 1.4426950408889634
        n_end = Tk
        if CAUSAL:
            n_end = tl.minimum(Tk, q_offset + (start_m + 1) * BLOCK_M)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < Tk
            kv_off = (bkv * Tk + offs_n[:, None]) * D + offs_d[None, :]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
            if FP32_DOTS:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            doc_k = offs_n
            if HAS_DOC:
                doc_k = tl.load(DOC + b * Tk + offs_n, mask=n_mask, other=-2)
            logits, _ = _logits_block(q, k, offs_m, offs_n, q_offset, Tk, doc_q, doc_k, sm_scale, inv_tau, c_ab,
                                      b_over_a, CAUSAL, HAS_DOC, IEEE)
            logits = logits * LOG2E
            new_max = tl.maximum(row_max, tl.max(logits, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with nothing visible yet
            p = tl.exp2(logits - safe_max[:, None])
            corr = tl.exp2(row_max - safe_max)
            row_sum = row_sum * corr + tl.sum(p, 1)
            if IEEE:
                acc = acc * corr[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v)
            row_max = new_max
        empty = row_sum == 0.0
        out = acc / tl.where(empty, 1.0, row_sum)[:, None]
        lse2 = tl.where(empty, float("inf"), row_max + tl.log2(tl.where(empty, 1.0, row_sum)))
        tl.store(O + (bh * Tq + offs_m[:, None]) * D + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=m_mask[:, None] & d_mask[None, :])
        tl.store(LSE + bh * Tq + offs_m, lse2, mask=m_mask)

    @triton.jit
    def _si_attn_bwd_dkdv(Q, K, V, DOC, DO, LSE, DELTA, DK, DV, Tq, Tk, q_offset, sm_scale, inv_tau, c_ab,
                          b_over_a, HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr,
                          FP32_DOTS: tl.constexpr):
        start_n = tl.program_id(0)
        bkv = tl.program_id(1)
        HKV: tl.constexpr = HQ // GROUP
        b = bkv // HKV
        hkv = bkv % HKV
        offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        n_mask = offs_n < Tk
        kv_off = (bkv * Tk + offs_n[:, None]) * D + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        if FP32_DOTS:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        doc_k = offs_n
        if HAS_DOC:
            doc_k = tl.load(DOC + b * Tk + offs_n, mask=n_mask, other=-2)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        LOG2E: tl.constexpr = 1.4426950408889634
        m_begin = 0
        if CAUSAL:  # queries before this key block see none of it
            m_begin = tl.maximum(start_n * BLOCK_N - q_offset, 0) // BLOCK_M * BLOCK_M
        for g in range(GROUP):
            bh = b * HQ + hkv * GROUP + g
            for start_m in range(m_begin, Tq, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                m_mask = offs_m < Tq
                q_off = (bh * Tq + offs_m[:, None]) * D + offs_d[None, :]
                q_mask = m_mask[:, None] & d_mask[None, :]
                q = tl.load(Q + q_off, mask=q_mask, other=0.0)
                do = tl.load(DO + q_off, mask=q_mask, other=0.0)
                if FP32_DOTS:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse2 = tl.load(LSE + bh * Tq + offs_m, mask=m_mask, other=float("inf"))
                delta = tl.load(DELTA + bh * Tq + offs_m, mask=m_mask, other=0.0)
                doc_q = offs_m
                if HAS_DOC:
                    doc_q = tl.load(DOC + b * Tk + q_offset + offs_m, mask=m_mask, other=-1)
                logits, a_scaled = _logits_block(q, k, offs_m, offs_n, q_offset, Tk, doc_q, doc_k, sm_scale,
                                                 inv_tau, c_ab, b_over_a, CAUSAL, HAS_DOC, IEEE)
                p = tl.exp2(logits * LOG2E - lse2[:, None])  # (BLOCK_M, BLOCK_N), 0 where masked
                if IEEE:
                    dv += tl.dot(tl.trans(p), do, input_precision="ieee")
                    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                else:
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                    dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None]) * a_scaled
                if IEEE:
                    dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
                else:
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _si_attn_bwd_dq(Q, K, V, DOC, DO, LSE, DELTA, DQ, Tq, Tk, q_offset, sm_scale, inv_tau, c_ab, b_over_a,
                        HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_DOC: tl.constexpr, IEEE: tl.constexpr, FP32_DOTS: tl.constexpr):
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HQ
        h = bh % HQ
        bkv = b * (HQ // GROUP) + h // GROUP
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        m_mask = offs_m < Tq
        q_off = (bh * Tq + offs_m[:, None]) * D + offs_d[None, :]
        q_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0)
        if FP32_DOTS:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(LSE + bh * Tq + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(DELTA + bh * Tq + offs_m, mask=m_mask, other=0.0)
        doc_q = offs_m
        if HAS_DOC:
            doc_q = tl.load(DOC + b * Tk + q_offset + offs_m, mask=m_mask, other=-1)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        LOG2E: tl.constexpr = 1.4426950408889634
        n_end = Tk
        if CAUSAL:
            n_end = tl.minimum(Tk, q_offset + (start_m + 1) * BLOCK_M)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < Tk
            kv_off = (bkv * Tk + offs_n[:, None]) * D + offs_d[None, :]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
            if FP32_DOTS:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            doc_k = offs_n
            if HAS_DOC:
                doc_k = tl.load(DOC + b * Tk + offs_n, mask=n_mask, other=-2)
            logits, a_scaled = _logits_block(q, k, offs_m, offs_n, q_offset, Tk, doc_q, doc_k, sm_scale, inv_tau,
                                             c_ab, b_over_a, CAUSAL, HAS_DOC, IEEE)
            p = tl.exp2(logits * LOG2E - lse2[:, None])
            if IEEE:
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            else:
                dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None]) * a_scaled
            if IEEE:
                dq += tl.dot(ds, k, input_precision="ieee")
            else:
                dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=q_mask)


def _launch_config(q: torch.Tensor) -> dict:
    interpreting = triton_interpreting() or q.device.type != "cuda"
    D = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))
    if interpreting:
        block_m = block_n = 16
    else:
        block_m, block_n = (64, 64) if block_d <= 128 else (32, 32)
    return dict(D=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                IEEE=q.dtype == torch.float32, FP32_DOTS=interpreting)


def _scalars(q, tau, alpha, beta):
    alpha, beta = (math.exp(0.5), math.exp(0.5)) if alpha is None else (alpha, beta)
    return (1.0 / math.sqrt(q.shape[-1]), 1.0 / tau, beta / alpha - math.log(alpha), beta / alpha)


def _si_attention_fwd(q, k, v, doc, tau, causal, q_offset, alpha, beta):
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    cfg = _launch_config(q)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Tq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)
    _si_attn_fwd[grid](q, k, v, doc, out, lse, Tq, Tk, q_offset, *_scalars(q, tau, alpha, beta), HQ=Hq,
                       GROUP=Hq // k.shape[1], CAUSAL=causal, HAS_DOC=doc.numel() > 0, **cfg)
    return out, lse


def _si_attention_bwd(q, k, v, doc, out, lse, dout, tau, causal, q_offset, alpha, beta):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = _launch_config(q)
    delta = (dout.float() * out.float()).sum(-1)  # (B, Hq, Tq) = rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scalars = _scalars(q, tau, alpha, beta)
    common = dict(HQ=Hq, GROUP=Hq // Hkv, CAUSAL=causal, HAS_DOC=doc.numel() > 0, **cfg)
    _si_attn_bwd_dkdv[(triton.cdiv(Tk, cfg["BLOCK_N"]), B * Hkv)](
        q, k, v, doc, dout, lse, delta, dk, dv, Tq, Tk, q_offset, *scalars, **common)
    _si_attn_bwd_dq[(triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)](
        q, k, v, doc, dout, lse, delta, dq, Tq, Tk, q_offset, *scalars, **common)
    return dq, dk, dv


@torch.library.custom_op("shared_kernels::si_attention_fwd", mutates_args=())
def _si_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor, tau: float, causal: bool, q_offset: int,
    alpha: float | None, beta: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward launch as a torch custom op: (out (B, Hq, Tq, D), row log-sum-exp (B, Hq, Tq) fp32), so
    torch.compile sees one opaque op (no graph break) and traces it through the fake implementation."""
    return _si_attention_fwd(q, k, v, doc, tau, causal, q_offset, alpha, beta)


@_si_attention_fwd_op.register_fake
def _si_attention_fwd_fake(q, k, v, doc, tau, causal, q_offset, alpha, beta):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("shared_kernels::si_attention_bwd", mutates_args=())
def _si_attention_bwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dout: torch.Tensor, tau: float, causal: bool, q_offset: int, alpha: float | None, beta: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward launches (dK/dV, then dQ) as a custom op: (dq, dk, dv) shaped like q, k, v."""
    return _si_attention_bwd(q, k, v, doc, out, lse, dout.contiguous(), tau, causal, q_offset, alpha, beta)


@_si_attention_bwd_op.register_fake
def _si_attention_bwd_fake(q, k, v, doc, out, lse, dout, tau, causal, q_offset, alpha, beta):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _si_attention_setup_context(ctx, inputs, output):
    q, k, v, doc, tau, causal, q_offset, alpha, beta = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, doc, out, lse)
    ctx.args = (tau, causal, q_offset, alpha, beta)


def _si_attention_backward(ctx, dout, dlse):  # lse is an auxiliary output: its gradient is never used
    q, k, v, doc, out, lse = ctx.saved_tensors
    dq, dk, dv = _si_attention_bwd_op(q, k, v, doc, out, lse, dout, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_si_attention_fwd_op.register_autograd(_si_attention_backward, setup_context=_si_attention_setup_context)


def si_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tau: float = 10.0,
    causal: bool = True,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    alpha: float | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    """Fused scale-invariant attention (differentiable).

    Args:
        q: (B, Hq, Tq, D) fp16/bf16/fp32; k, v: (B, Hkv, Tk, D), same dtype, Hq % Hkv == 0.
        tau: > 0. causal: mask keys after the query (t = |i - j| otherwise). q_offset: position of query 0.
        doc_ids: optional (B, Tk) integer document ids (packed sequences).
        alpha, beta: general coefficient family, or None for the one-parameter form.
    Returns:
        (B, Hq, Tq, D) in q's dtype. Inputs are validated by `siattn.attention`; this checks the kernel's own
        limits only.
    """
    if not triton_available():
        raise ValueError("si_attention needs triton")
    if q.device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"si_attention needs CUDA tensors (got {q.device}) or TRITON_INTERPRET=1")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must be float16/bfloat16/float32 for the Triton kernel, got {q.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim must be <= 256 for the Triton kernel, got {q.shape[-1]}")
    doc = (doc_ids.to(torch.int32).contiguous() if doc_ids is not None
           else torch.empty(0, dtype=torch.int32, device=q.device))
    alpha, beta = (None, None) if alpha is None else (float(alpha), float(beta))
    out, _ = _si_attention_fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), doc, float(tau), bool(causal),
                                  int(q_offset), alpha, beta)
    return out
