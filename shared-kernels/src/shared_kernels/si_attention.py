"""Scale-invariant attention (arXiv 2505.17083) as one op: coefficients, input checks, the torch reference,
the chunked torch path and the fused Triton kernel, behind
`si_attention(..., backend="auto"|"torch"|"triton")`.

Math per (query i, key j), t = (q_offset + i) - j (|t| when not causal):
    S = q.k / sqrt(D);  a_t = sqrt(2 (log(1 + t/tau) + c)),  m_t = beta/alpha - a_t^2,
    c = beta/alpha - log(alpha)
    (alpha = beta = e^0.5 gives a_t^2 = 1 + 2 log(1 + t/tau), m_t = 1 - a_t^2)
    L = a_t S + m_t;  P = softmax(L) over the visible keys;  O = P V.
The coefficients are written once (`si_coefficients`); every path reads them from it: the reference per
(i, j), the chunked path as two Toeplitz matrices, the Triton kernel as two fp32 tables indexed by t.

Paths:
- `si_attention_ref`: materialises the (Tq, Tk) logits; the specification (fp64 for fp64 inputs).
- torch ("chunked"): queries in chunks of `chunk` rows against the visible keys, memory O(chunk x Tk); the
  backward recomputes each chunk's probabilities (FlashAttention's recomputation, whole rows per chunk), so
  only q, k, v and the masks are saved. a_t / sqrt(D) and m_t are column slices of two Toeplitz matrices
  built once per call, with the causal mask folded in (a = 0, m = -inf).
- Triton: FlashAttention-2 forward with a running max and sum per row in base 2 (L * log2(e)), a_t and m_t
  applied before the running max, the row log-sum-exp stored; the backward recomputes P from it: dV = P^T dO,
  dP = dO V^T, dL = P (dP - rowsum(dO O)), dS = dL a_t / sqrt(D), dQ = dS K, dK = dS^T Q. dK/dV accumulate
  per key block over the G query heads of each KV head (no atomics); dQ per query block.

Both paths are `torch.library` custom ops (`shared_kernels::si_attention_chunked_fwd/_bwd`,
`shared_kernels::si_attention_fwd/_bwd`) with fake implementations and registered autograd, so torch.compile
traces `si_attention` as one op without graph breaks (and the chunk loop is not unrolled per length).

Precision: scores, coefficients and softmax in fp32 (fp64 for fp64 inputs on the torch paths); Triton fp32
inputs use IEEE fp32 dots (no TF32); bf16/fp16 feed the tensor cores in their dtype on GPU; under
TRITON_INTERPRET=1 every dot runs in fp32 (the interpreter's bf16 arithmetic is wrong).
"""

from __future__ import annotations

import math

import torch

from shared_kernels.backend import BACKENDS, resolve_backend, triton_available, triton_interpreting

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256


def check_si_family(tau: float, alpha: float | None, beta: float | None) -> None:
    """Raise a ValueError naming the argument unless tau > 0 and (alpha, beta) is None or a valid pair."""
    if isinstance(tau, bool) or not (isinstance(tau, int | float) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    if (alpha is None) != (beta is None):
        raise ValueError(f"alpha and beta must be given together, got alpha={alpha!r}, beta={beta!r}")
    if alpha is None or beta is None:
        return
    for name, x in (("alpha", alpha), ("beta", beta)):
        if isinstance(x, bool) or not (isinstance(x, int | float) and math.isfinite(x)):
            raise ValueError(f"{name} must be a finite number, got {x!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if beta < alpha * math.log(alpha):
        raise ValueError(
            f"beta must be >= alpha*log(alpha) = {alpha * math.log(alpha):.6g} (else a_0^2 < 0), "
            f"got beta={beta!r}"
        )


def si_coefficients(
    t: torch.Tensor, tau: float, alpha: float | None = None, beta: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """a_t and m_t for distances t >= 0 (float tensor, any shape), in t's dtype. The one implementation of the
    formula; unchecked (callers validate tau/alpha/beta with `check_si_family` and build t >= 0), so it has no
    host sync and traces inside torch.compile and flex score_mods."""
    log_growth = torch.log1p(t / tau)
    if alpha is None or beta is None:
        a_sq = 1.0 + 2.0 * log_growth
        return a_sq.sqrt(), -2.0 * log_growth
    a_sq = 2.0 * (log_growth - math.log(alpha) + beta / alpha)
    return a_sq.sqrt(), beta / alpha - a_sq


def check_si_inputs(
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
) -> None:
    """Raise a ValueError/TypeError naming the argument for anything `si_attention` cannot take."""
    _check_qkv_tensors(q, k, v)
    _check_qkv_shapes(q, k)
    check_si_family(tau, alpha, beta)
    _check_causal_and_offset(causal, q_offset, q.shape[2], k.shape[2], doc_ids is not None)
    if doc_ids is not None:
        _check_doc_ids(doc_ids, q, k.shape[2])
    if attn_mask is not None:
        _check_attn_mask(attn_mask, q, k.shape[2])


def _check_qkv_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v are 4-D float tensors of one dtype on one device."""
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
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")


def _check_qkv_shapes(q: torch.Tensor, k: torch.Tensor) -> None:
    """Batch and head dim shared by q and k; query heads a multiple of key/value heads (GQA)."""
    B, Hq, _, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"batch sizes differ: q has {B}, k has {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"head dims differ: q has {D}, k and v have {k.shape[3]}")
    if D < 1 or Hq < 1 or k.shape[1] < 1:
        raise ValueError(f"head dim and head counts must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]}) for GQA")


def _check_causal_and_offset(causal: bool, q_offset: int, Tq: int, Tk: int, has_docs: bool) -> None:
    """causal is a bool; q_offset an int >= 0 that keeps every query among the keys when it must."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not isinstance(q_offset, int) or isinstance(q_offset, bool) or q_offset < 0:
        raise ValueError(
            f"q_offset must be an int >= 0 (absolute position of the first query), got {q_offset!r}"
        )
    if (causal or has_docs) and q_offset + Tq > Tk:
        raise ValueError(
            f"q_offset + Tq = {q_offset} + {Tq} exceeds the number of keys Tk = {Tk}: with causal or "
            "doc_ids, query i sits at key position q_offset + i, which must be among the keys (pass the "
            "whole cache)"
        )


def _check_doc_ids(doc_ids: torch.Tensor, q: torch.Tensor, Tk: int) -> None:
    """doc_ids: an integer (B, Tk) tensor on q's device."""
    if not isinstance(doc_ids, torch.Tensor):
        raise TypeError(f"doc_ids must be a torch.Tensor, got {type(doc_ids).__name__}")
    B = q.shape[0]
    if (
        doc_ids.shape != (B, Tk)
        or doc_ids.dtype.is_floating_point
        or doc_ids.dtype.is_complex
        or doc_ids.dtype == torch.bool
    ):
        raise ValueError(
            f"doc_ids must be an integer (B, Tk) = ({B}, {Tk}) tensor, got "
            f"{doc_ids.dtype} {tuple(doc_ids.shape)}"
        )
    if doc_ids.device != q.device:
        raise ValueError(f"doc_ids must be on {q.device}, got {doc_ids.device}")


def _check_attn_mask(attn_mask: torch.Tensor, q: torch.Tensor, Tk: int) -> None:
    """attn_mask: bool (B or 1, 1, Tq, Tk) on q's device."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[1] != 1:
        raise ValueError(
            f"attn_mask must be a bool (B or 1, 1, Tq, Tk) tensor (True = may attend), got "
            f"{attn_mask.dtype} {tuple(attn_mask.shape)}"
        )
    B, _, Tq, _ = q.shape
    if attn_mask.shape[0] not in (1, B) or attn_mask.shape[2:] != (Tq, Tk):
        raise ValueError(f"attn_mask must broadcast to ({B}, 1, {Tq}, {Tk}), got {tuple(attn_mask.shape)}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on {q.device}, got {attn_mask.device}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _distances(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance |t| or max(t, 0), causally visible) for t = q_pos - k_pos, broadcast."""
    t = q_pos - k_pos
    if causal:
        return t.clamp(min=0), t >= 0
    return t.abs(), torch.ones_like(t, dtype=torch.bool)


def si_attention_weights(
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
    check_si_inputs(
        q,
        k,
        k,
        tau=tau,
        causal=causal,
        q_offset=q_offset,
        doc_ids=doc_ids,
        attn_mask=attn_mask,
        alpha=alpha,
        beta=beta,
    )
    cdtype = _compute_dtype(q.dtype)
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)  # (B, Hq, Tk, D): query head h reads kv head h // G
    scores = (q.to(cdtype) @ k.to(cdtype).transpose(-1, -2)) / math.sqrt(D)  # (B, Hq, Tq, Tk)
    q_pos = torch.arange(q_offset, q_offset + Tq, device=q.device)
    dist, visible = _distances(q_pos[:, None], torch.arange(Tk, device=q.device)[None, :], causal)
    a, m = si_coefficients(dist.to(cdtype), tau, alpha, beta)  # (Tq, Tk)
    logits = a * scores + m
    visible = visible.expand(B, 1, Tq, Tk)
    if doc_ids is not None:
        visible = visible & (doc_ids[:, q_offset : q_offset + Tq, None] == doc_ids[:, None, :])[:, None]
    if attn_mask is not None:
        visible = visible & attn_mask
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # a row with nothing visible: 0/0 -> 0


def si_attention_ref(
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
    """Pure torch specification (materialises the scores). Shapes as `si_attention`; (B, Hq, Tq, D) in q's
    dtype, computed in fp32 (fp64 for fp64 inputs)."""
    check_si_inputs(
        q,
        k,
        v,
        tau=tau,
        causal=causal,
        q_offset=q_offset,
        doc_ids=doc_ids,
        attn_mask=attn_mask,
        alpha=alpha,
        beta=beta,
    )
    probs = si_attention_weights(
        q,
        k,
        tau=tau,
        causal=causal,
        q_offset=q_offset,
        doc_ids=doc_ids,
        attn_mask=attn_mask,
        alpha=alpha,
        beta=beta,
    )
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return (probs @ v.to(probs.dtype)).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------
# Chunked torch path
# ---------------------------------------------------------------------------------------------------------


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
    dist, visible = _distances(t, torch.zeros((), dtype=t.dtype, device=device), causal)
    a, m = si_coefficients(dist.to(dtype), tau, alpha, beta)
    a = a * scale
    if causal:
        a = a.masked_fill(~visible, 0.0)
        m = m.masked_fill(~visible, float("-inf"))

    # Row r of the view is rows - 1 - i: entry (r, x) = vec[r + x] has t = i + shift - x; flip the rows back
    # into row-major storage (flip alone keeps the view's column-major strides: 15x slower addcmul reads).
    def row_major(x: torch.Tensor) -> torch.Tensor:
        return torch.empty(rows, cols, dtype=dtype, device=device).copy_(
            x.as_strided((rows, cols), (1, 1)).flip(0)
        )

    return row_major(a), row_major(m)


def _chunk_plan(Tq: int, Tk: int, q_offset: int, causal: bool, chunk: int):
    """(start, end, visible keys, first Toeplitz column) per query chunk, and the Toeplitz
    (rows, cols, shift).

    Column x of the Toeplitz matrices is key x - shift + q_offset + s for the chunk starting at s, with
    shift = q_offset + s_last so every chunk's columns start at s_last - s >= 0."""
    s_last = (Tq - 1) // chunk * chunk
    plan = []
    for s in range(0, Tq, chunk):
        e = min(s + chunk, Tq)
        kend = min(Tk, q_offset + e) if causal else Tk
        plan.append((s, e, kend, s_last - s))
    return plan, (min(chunk, Tq), Tk + s_last, q_offset + s_last)


def _chunk_blocks(q, k, v, doc_ids, attn_mask, tau, causal, q_offset, alpha, beta, chunk):
    """Per query chunk [s, e) with K visible keys: (s, e, qc (N, G*C, D), kc and vc (N, K, D), a_t / sqrt(D)
    (C, K), probabilities (N, G*C, K)) in the compute dtype, N = B * Hkv, G = Hq / Hkv. GQA without copies of
    k, v: the G query heads of a kv head are stacked as G * C rows of one batched matmul."""
    cdtype = _compute_dtype(q.dtype)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G, N = Hq // Hkv, B * Hkv
    plan, (rows, cols, shift) = _chunk_plan(Tq, Tk, q_offset, causal, chunk)
    a_all, m_all = _toeplitz_terms(
        tau, causal, alpha, beta, rows, cols, shift, 1.0 / math.sqrt(D), cdtype, q.device
    )
    qg = q.to(cdtype).view(B, Hkv, G, Tq, D)
    k3, v3 = k.to(cdtype).reshape(N, Tk, D), v.to(cdtype).reshape(N, Tk, D)
    for s, e, kend, c0 in plan:
        C = e - s
        qc = qg[:, :, :, s:e].reshape(N, G * C, D)
        a = a_all[:C, c0 : c0 + kend]
        probs = _chunk_probs(
            qc,
            k3[:, :kend],
            a,
            m_all[:C, c0 : c0 + kend],
            _chunk_hidden(doc_ids, attn_mask, q_offset, s, e, kend),
            (B, Hkv, G, C, kend),
            attn_mask is not None,
        )
        yield s, e, qc, k3[:, :kend], v3[:, :kend], a, probs


def _chunk_hidden(doc_ids, attn_mask, q_offset, s, e, kend):
    """Keys a chunk's queries may not see beyond the causal ones: (B, 1, 1, C, K) bool, or None."""
    hidden = None
    if doc_ids is not None:
        same = doc_ids[:, q_offset + s : q_offset + e, None] == doc_ids[:, None, :kend]  # (B, C, K)
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


@torch.library.custom_op("shared_kernels::si_attention_chunked_fwd", mutates_args=())
def _chunked_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    tau: float,
    causal: bool,
    q_offset: int,
    alpha: float | None,
    beta: float | None,
    chunk: int,
) -> torch.Tensor:
    """Chunked forward, (B, Hq, Tq, D) in q's dtype: per chunk one matmul for q.k, one fused `addcmul` for
    a_t * S + m_t (causal mask included), one in-place softmax, one matmul with v."""
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    outs = [
        (probs @ vc).view(B, Hkv, Hq // Hkv, e - s, D)  # one cat at the end: fewer (parallel) ops
        for s, e, _, _, vc, _, probs in _chunk_blocks(
            q, k, v, doc_ids, attn_mask, tau, causal, q_offset, alpha, beta, chunk
        )
    ]
    return torch.cat(outs, dim=3).view(B, Hq, Tq, D).to(q.dtype)


@_chunked_fwd_op.register_fake
def _chunked_fwd_fake(q, k, v, doc_ids, attn_mask, tau, causal, q_offset, alpha, beta, chunk):
    return torch.empty_like(q)


@torch.library.custom_op("shared_kernels::si_attention_chunked_bwd", mutates_args=())
def _chunked_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    dout: torch.Tensor,
    tau: float,
    causal: bool,
    q_offset: int,
    alpha: float | None,
    beta: float | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recomputing backward (dq, dk, dv): the same probabilities bit for bit, then the fused softmax backward
    P * (dP - rowsum(P dP)) and five matmuls per chunk."""
    cdtype = _compute_dtype(q.dtype)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G, N = Hq // Hkv, B * Hkv
    dout = dout.to(cdtype).reshape(B, Hkv, G, Tq, D)
    dqs = []
    dk = torch.zeros(N, Tk, D, dtype=cdtype, device=q.device)
    dv = torch.zeros(N, Tk, D, dtype=cdtype, device=q.device)
    for s, e, qc, kc, vc, a, probs in _chunk_blocks(
        q, k, v, doc_ids, attn_mask, tau, causal, q_offset, alpha, beta, chunk
    ):
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
    return dq.to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype)


@_chunked_bwd_op.register_fake
def _chunked_bwd_fake(q, k, v, doc_ids, attn_mask, dout, tau, causal, q_offset, alpha, beta, chunk):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _chunked_setup_context(ctx, inputs, output):
    q, k, v, doc_ids, attn_mask, *args = inputs
    ctx.save_for_backward(q, k, v, doc_ids, attn_mask)  # no score-sized tensor: the backward recomputes
    ctx.args = tuple(args)


def _chunked_backward(ctx, dout):
    q, k, v, doc_ids, attn_mask = ctx.saved_tensors
    dq, dk, dv = _chunked_bwd_op(q, k, v, doc_ids, attn_mask, dout.contiguous(), *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_chunked_fwd_op.register_autograd(_chunked_backward, setup_context=_chunked_setup_context)


def si_attention_torch(q, k, v, doc_ids, attn_mask, tau, causal, q_offset, alpha, beta, chunk):
    """The chunked torch path on validated inputs (see `si_attention`)."""
    if q.shape[2] == 0 or k.shape[2] == 0:  # nothing to chunk: the reference gives the empty / zero result
        return si_attention_ref(
            q,
            k,
            v,
            tau=tau,
            causal=causal,
            q_offset=q_offset,
            doc_ids=doc_ids,
            attn_mask=attn_mask,
            alpha=alpha,
            beta=beta,
        )
    return _chunked_fwd_op(
        q,
        k,
        v,
        doc_ids,
        attn_mask,
        float(tau),
        causal,
        q_offset,
        None if alpha is None else float(alpha),
        None if beta is None else float(beta),
        chunk,
    )


# ---------------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _load_rows(PTR, row_base, offs, T, offs_d, D: tl.constexpr, FP32_DOTS: tl.constexpr):
        """Rows `offs` (< T) of the (T, D) matrix number `row_base` of a contiguous (..., T, D) tensor, as a
        (len(offs), BLOCK_D) tile (zeros outside), cast to fp32 when FP32_DOTS; and the element offsets/mask
        for storing a tile of the same place."""
        off = (row_base * T + offs[:, None]) * D + offs_d[None, :]
        mask = (offs[:, None] < T) & (offs_d[None, :] < D)
        x = tl.load(PTR + off, mask=mask, other=0.0)
        if FP32_DOTS:
            x = x.to(tl.float32)
        return x, off, mask

    @triton.jit
    def _load_docs(DOC, b, Tk, pos, valid, other, HAS_DOC: tl.constexpr):
        """Document ids of key positions `pos` of batch row b ((B, Tk) int32), or `pos` itself without
        docs."""
        if HAS_DOC:
            return tl.load(DOC + b * Tk + pos, mask=valid, other=other)
        return pos

    @triton.jit
    def _logits_block(
        q,
        k,
        offs_m,
        offs_n,
        q_offset,
        Tk,
        doc_q,
        doc_k,
        A_TAB,
        M_TAB,
        NT,
        CAUSAL: tl.constexpr,
        HAS_DOC: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """Masked logits (fp32, natural units) and a_t / sqrt(D) for one (BLOCK_M, BLOCK_N) tile;
        a_t / sqrt(D) and m_t are read from the (NT,) fp32 tables that `si_coefficients` filled, indexed by
        the distance."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        t = (q_offset + offs_m)[:, None] - offs_n[None, :]
        if CAUSAL:
            dist = tl.maximum(t, 0)
            visible = (t >= 0) & (offs_n[None, :] < Tk)
        else:
            dist = tl.abs(t)
            visible = offs_n[None, :] < Tk
        if HAS_DOC:
            visible = visible & (doc_q[:, None] == doc_k[None, :])
        dist = tl.minimum(dist, NT - 1)  # padded rows and columns: any in-range entry, masked below
        a_scaled = tl.load(A_TAB + dist)
        logits = a_scaled * s + tl.load(M_TAB + dist)
        logits = tl.where(visible, logits, float("-inf"))
        return logits, a_scaled

    @triton.jit
    def _si_attn_fwd(
        Q,
        K,
        V,
        DOC,
        A_TAB,
        M_TAB,
        O,
        LSE,
        Tq,
        Tk,
        NT,
        q_offset,
        HQ: tl.constexpr,
        GROUP: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOC: tl.constexpr,
        IEEE: tl.constexpr,
        FP32_DOTS: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HQ
        bkv = b * (HQ // GROUP) + (bh % HQ) // GROUP  # flat (batch, kv head) index
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q, q_off, q_mask = _load_rows(Q, bh, offs_m, Tq, offs_d, D, FP32_DOTS)
        doc_q = _load_docs(DOC, b, Tk, q_offset + offs_m, offs_m < Tq, -1, HAS_DOC)
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        LOG2E: tl.constexpr = 1.4426950408889634
        n_end = Tk
        if CAUSAL:
            n_end = tl.minimum(Tk, q_offset + (start_m + 1) * BLOCK_M)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, _, _ = _load_rows(K, bkv, offs_n, Tk, offs_d, D, FP32_DOTS)
            v, _, _ = _load_rows(V, bkv, offs_n, Tk, offs_d, D, FP32_DOTS)
            doc_k = _load_docs(DOC, b, Tk, offs_n, offs_n < Tk, -2, HAS_DOC)
            logits, _ = _logits_block(
                q, k, offs_m, offs_n, q_offset, Tk, doc_q, doc_k, A_TAB, M_TAB, NT, CAUSAL, HAS_DOC, IEEE
            )
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
        tl.store(O + q_off, out.to(O.dtype.element_ty), mask=q_mask)
        tl.store(LSE + bh * Tq + offs_m, lse2, mask=offs_m < Tq)

    @triton.jit
    def _si_attn_bwd_dkdv(
        Q,
        K,
        V,
        DOC,
        A_TAB,
        M_TAB,
        DO,
        LSE,
        DELTA,
        DK,
        DV,
        Tq,
        Tk,
        NT,
        q_offset,
        HQ: tl.constexpr,
        GROUP: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOC: tl.constexpr,
        IEEE: tl.constexpr,
        FP32_DOTS: tl.constexpr,
    ):
        start_n = tl.program_id(0)
        bkv = tl.program_id(1)
        HKV: tl.constexpr = HQ // GROUP
        b = bkv // HKV
        hkv = bkv % HKV
        offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k, kv_off, kv_mask = _load_rows(K, bkv, offs_n, Tk, offs_d, D, FP32_DOTS)
        v, _, _ = _load_rows(V, bkv, offs_n, Tk, offs_d, D, FP32_DOTS)
        doc_k = _load_docs(DOC, b, Tk, offs_n, offs_n < Tk, -2, HAS_DOC)
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
                q, _, _ = _load_rows(Q, bh, offs_m, Tq, offs_d, D, FP32_DOTS)
                do, _, _ = _load_rows(DO, bh, offs_m, Tq, offs_d, D, FP32_DOTS)
                lse2 = tl.load(LSE + bh * Tq + offs_m, mask=m_mask, other=float("inf"))
                delta = tl.load(DELTA + bh * Tq + offs_m, mask=m_mask, other=0.0)
                doc_q = _load_docs(DOC, b, Tk, q_offset + offs_m, m_mask, -1, HAS_DOC)
                logits, a_scaled = _logits_block(
                    q, k, offs_m, offs_n, q_offset, Tk, doc_q, doc_k, A_TAB, M_TAB, NT, CAUSAL, HAS_DOC, IEEE
                )
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
    def _si_attn_bwd_dq(
        Q,
        K,
        V,
        DOC,
        A_TAB,
        M_TAB,
        DO,
        LSE,
        DELTA,
        DQ,
        Tq,
        Tk,
        NT,
        q_offset,
        HQ: tl.constexpr,
        GROUP: tl.constexpr,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_DOC: tl.constexpr,
        IEEE: tl.constexpr,
        FP32_DOTS: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HQ
        bkv = b * (HQ // GROUP) + (bh % HQ) // GROUP
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < Tq
        q, q_off, q_mask = _load_rows(Q, bh, offs_m, Tq, offs_d, D, FP32_DOTS)
        do, _, _ = _load_rows(DO, bh, offs_m, Tq, offs_d, D, FP32_DOTS)
        lse2 = tl.load(LSE + bh * Tq + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(DELTA + bh * Tq + offs_m, mask=m_mask, other=0.0)
        doc_q = _load_docs(DOC, b, Tk, q_offset + offs_m, m_mask, -1, HAS_DOC)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        LOG2E: tl.constexpr = 1.4426950408889634
        n_end = Tk
        if CAUSAL:
            n_end = tl.minimum(Tk, q_offset + (start_m + 1) * BLOCK_M)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, _, _ = _load_rows(K, bkv, offs_n, Tk, offs_d, D, FP32_DOTS)
            v, _, _ = _load_rows(V, bkv, offs_n, Tk, offs_d, D, FP32_DOTS)
            doc_k = _load_docs(DOC, b, Tk, offs_n, offs_n < Tk, -2, HAS_DOC)
            logits, a_scaled = _logits_block(
                q, k, offs_m, offs_n, q_offset, Tk, doc_q, doc_k, A_TAB, M_TAB, NT, CAUSAL, HAS_DOC, IEEE
            )
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
    return dict(
        D=D,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32,
        FP32_DOTS=interpreting,
    )


def _coefficient_tables(q, Tk, tau, q_offset, alpha, beta):
    """(a_t / sqrt(D), m_t, NT) for t = 0 .. NT-1 in fp32, NT covering every distance the kernels can see."""
    n = max(q_offset + q.shape[2], Tk, 1)
    a, m = si_coefficients(torch.arange(n, device=q.device, dtype=torch.float32), tau, alpha, beta)
    return (a / math.sqrt(q.shape[-1])).contiguous(), m.contiguous(), n


def _si_attention_fwd(q, k, v, doc, tau, causal, q_offset, alpha, beta):
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    cfg = _launch_config(q)
    a_tab, m_tab, nt = _coefficient_tables(q, Tk, tau, q_offset, alpha, beta)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Tq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)
    _si_attn_fwd[grid](
        q,
        k,
        v,
        doc,
        a_tab,
        m_tab,
        out,
        lse,
        Tq,
        Tk,
        nt,
        q_offset,
        HQ=Hq,
        GROUP=Hq // k.shape[1],
        CAUSAL=causal,
        HAS_DOC=doc.numel() > 0,
        **cfg,
    )
    return out, lse


def _si_attention_bwd(q, k, v, doc, out, lse, dout, tau, causal, q_offset, alpha, beta):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = _launch_config(q)
    a_tab, m_tab, nt = _coefficient_tables(q, Tk, tau, q_offset, alpha, beta)
    delta = (dout.float() * out.float()).sum(-1)  # (B, Hq, Tq) = rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(HQ=Hq, GROUP=Hq // Hkv, CAUSAL=causal, HAS_DOC=doc.numel() > 0, **cfg)
    _si_attn_bwd_dkdv[(triton.cdiv(Tk, cfg["BLOCK_N"]), B * Hkv)](
        q, k, v, doc, a_tab, m_tab, dout, lse, delta, dk, dv, Tq, Tk, nt, q_offset, **common
    )
    _si_attn_bwd_dq[(triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)](
        q, k, v, doc, a_tab, m_tab, dout, lse, delta, dq, Tq, Tk, nt, q_offset, **common
    )
    return dq, dk, dv


@torch.library.custom_op("shared_kernels::si_attention_fwd", mutates_args=())
def _si_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc: torch.Tensor,
    tau: float,
    causal: bool,
    q_offset: int,
    alpha: float | None,
    beta: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward launch as a torch custom op: (out (B, Hq, Tq, D), row log-sum-exp (B, Hq, Tq) fp32,
    base 2). `doc` is (B, Tk) int32, or empty for no documents."""
    if not triton_available():
        raise ValueError("the Triton path of si_attention needs triton")
    return _si_attention_fwd(q, k, v, doc, tau, causal, q_offset, alpha, beta)


@_si_attention_fwd_op.register_fake
def _si_attention_fwd_fake(q, k, v, doc, tau, causal, q_offset, alpha, beta):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("shared_kernels::si_attention_bwd", mutates_args=())
def _si_attention_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    tau: float,
    causal: bool,
    q_offset: int,
    alpha: float | None,
    beta: float | None,
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


def si_attention_triton(q, k, v, doc_ids, tau, causal, q_offset, alpha, beta):
    """The fused kernel on validated inputs (see `si_attention`)."""
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"q, k, v must be float16/bfloat16/float32 for the Triton kernel, got {q.dtype}")
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        raise ValueError(
            f"head dim must be <= {TRITON_MAX_HEAD_DIM} for the Triton kernel, got {q.shape[-1]}"
        )
    if (
        doc_ids is not None
        and doc_ids.numel()
        and doc_ids.dtype == torch.int64
        and not bool(((doc_ids >= -(2**31)) & (doc_ids < 2**31)).all())
    ):
        raise ValueError("doc_ids must fit in int32 for the Triton kernel")
    doc = (
        doc_ids.to(torch.int32).contiguous()
        if doc_ids is not None
        else torch.empty(0, dtype=torch.int32, device=q.device)
    )
    out, _ = _si_attention_fwd_op(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        doc,
        float(tau),
        causal,
        q_offset,
        None if alpha is None else float(alpha),
        None if beta is None else float(beta),
    )
    return out


def si_attention(
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
    backend: str = "auto",
    chunk: int = 128,
) -> torch.Tensor:
    """Scale-invariant attention (differentiable).

    Args:
        q: (B, Hq, Tq, D) queries, already position-encoded (e.g. p-RoPE); query i sits at q_offset + i.
        k, v: (B, Hkv, Tk, D), same dtype and head dim as q, Hq a multiple of Hkv (GQA: query head h reads kv
            head h // (Hq/Hkv)); key j sits at position j.
        tau: scale of the transform (> 0; the paper's best is 10).
        causal: mask keys after each query (t < 0). Without it, t = |i - j|.
        q_offset: absolute position of the first query (KV-cache decoding: Tk - Tq); with causal or doc_ids,
            q_offset + Tq <= Tk.
        doc_ids: optional (B, Tk) integer ids of packed documents; attention never crosses documents.
        attn_mask: optional bool (B or 1, 1, Tq, Tk), True = may attend (padding masks); torch path only.
        alpha, beta: the general coefficient family (both or neither); None = the one-parameter form.
        backend: "auto" (Triton for CUDA tensors in fp16/bf16/fp32 with D <= 256 and no attn_mask, torch
            otherwise), "torch" (the chunked path) or "triton" (CUDA, or CPU under TRITON_INTERPRET=1).
        chunk: query rows per chunk of the torch path (128: fastest of 64/128/256 at T=1024..4096 on CPU).
    Returns:
        (B, Hq, Tq, D) in q's dtype; rows with no visible key are zeros.
    """
    check_si_inputs(
        q,
        k,
        v,
        tau=tau,
        causal=causal,
        q_offset=q_offset,
        doc_ids=doc_ids,
        attn_mask=attn_mask,
        alpha=alpha,
        beta=beta,
    )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if backend == "auto":
        fits = attn_mask is None and q.dtype in _TRITON_DTYPES and q.shape[-1] <= TRITON_MAX_HEAD_DIM
        backend = "triton" if fits and resolve_backend("auto", q.device) == "triton" else "torch"
    elif backend == "triton":
        resolve_backend("triton", q.device)  # raises with a clear message off CUDA without the interpreter
        if attn_mask is not None:
            raise ValueError(
                "attn_mask is supported by the torch path only, not backend='triton' (use doc_ids "
                "for packed documents)"
            )
    if backend == "triton" and q.shape[2] and k.shape[2]:  # an empty grid is not launched
        return si_attention_triton(q, k, v, doc_ids, tau, causal, q_offset, alpha, beta)
    return si_attention_torch(q, k, v, doc_ids, attn_mask, tau, causal, q_offset, alpha, beta, chunk)
