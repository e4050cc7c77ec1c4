"""attention(): the reference pinned by hand, masking, GQA, translation invariance, decoding, backends,
errors."""

import math

import pytest
import torch

from shared_kernels.testing import assert_error_ratio, assert_exact
from siattn import (
    apply_rotary,
    attention,
    attention_ref,
    attention_weights,
    p_rope_frequencies,
    positions_in_documents,
)


def _qkv(B=2, Hq=4, Hkv=2, Tq=97, Tk=97, D=72, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64).to(dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def test_hand_computed_three_tokens_pin_the_order_of_operations():
    # S = q.k / sqrt(D), L = a_t * S + m_t (m_t NOT scaled by 1/sqrt(D)), causal mask, softmax, @ v.
    q = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 1.0, 1.0], [2.0, 1.0, 0.0, -1.0]])
    k = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0], [1.0, 0.0, 0.0, 3.0]])
    v = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 100.0, 0.0]])
    tau = 1.0
    expected = []
    for i in range(3):
        logits = []
        for j in range(i + 1):
            s = sum(q[i, d].item() * k[j, d].item() for d in range(4)) / math.sqrt(4)
            t = i - j
            a = math.sqrt(1 + 2 * math.log(1 + t / tau))
            m = -2 * math.log(1 + t / tau)
            logits.append(a * s + m)
        z = sum(math.exp(x) for x in logits)
        probs = [math.exp(x) / z for x in logits]
        expected.append([sum(probs[j] * v[j, d].item() for j in range(i + 1)) for d in range(4)])
    expected = torch.tensor(expected, dtype=torch.float64)
    for backend in ("reference", "chunked"):
        out = attention(
            q[None, None].double(), k[None, None].double(), v[None, None].double(), tau=tau, backend=backend
        )[0, 0]
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # Row 2 by hand: S = (1, 0, -1)... the values are distinct enough that a wrong order would show:
    wrong = torch.softmax(torch.tensor([0.5 * 3, 0.5 * 1 - 2 * math.log(2) / 2]), 0)  # m_t / sqrt(D): not us
    assert not torch.allclose(expected[1, :2].float(), wrong * torch.tensor([1.0, 10.0]))


def test_masked_keys_and_other_documents_get_exactly_zero_weight():
    q, k, v = _qkv(B=2, Tq=33, Tk=33, D=8)
    doc_ids = torch.tensor([[0] * 10 + [1] * 15 + [2] * 8, [5] * 33])
    w = attention_weights(q, k, doc_ids=doc_ids)
    i = torch.arange(33)
    future = i[None, :] > i[:, None]
    assert (w[:, :, future] == 0).all()
    other_doc = doc_ids[:, :, None] != doc_ids[:, None, :]  # (B, T, T)
    assert (w.permute(0, 2, 3, 1)[other_doc] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 33))
    # Poisoning invisible values changes nothing, bit for bit, on every torch backend.
    for backend in ("reference", "chunked"):
        out = attention(q, k, v, doc_ids=doc_ids, backend=backend, chunk=7)
        v2 = v.clone()
        v2[0, :, 25:] = 1e30  # document 2 of row 0: invisible to documents 0 and 1
        out2 = attention(q, k, v2, doc_ids=doc_ids, backend=backend, chunk=7)
        assert_exact(out2[0, :, :25], out[0, :, :25], f"{backend} other documents")
        v3 = v.clone()
        v3[:, :, -1] = 1e30  # the last key is in every other query's future
        out3 = attention(q, k, v3, doc_ids=doc_ids, backend=backend, chunk=7)
        assert_exact(out3[:, :, :-1], out[:, :, :-1], f"{backend} future keys")


def test_attn_mask_excludes_keys_exactly():
    q, k, v = _qkv(B=2, Tq=20, Tk=20, D=8)
    mask = torch.ones(2, 1, 20, 20, dtype=torch.bool)
    mask[0, :, :, :3] = False  # left padding of row 0
    mask[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # padded queries still see themselves
    w = attention_weights(q, k, attn_mask=mask)
    assert (w[0, :, 3:, :3] == 0).all()
    v2 = v.clone()
    v2[0, :, :3] = 1e30
    for backend in ("reference", "chunked"):
        out = attention(q, k, v, attn_mask=mask, backend=backend, chunk=6)
        out2 = attention(q, k, v2, attn_mask=mask, backend=backend, chunk=6)
        assert_exact(out2[0, :, 3:], out[0, :, 3:], backend)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_gqa_equals_repeated_kv_heads(backend):
    q, k, v = _qkv(Hq=6, Hkv=2, Tq=29, Tk=29, D=16)
    out = attention(q, k, v, backend=backend, chunk=8)
    rep = attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), backend=backend, chunk=8)
    if backend == "reference":
        assert_exact(out, rep, "gqa")
    else:
        torch.testing.assert_close(out, rep, rtol=1e-6, atol=1e-6)


def test_translation_invariance_with_p_rope():
    q, k, v = _qkv(B=1, Tq=40, Tk=40, D=16, dtype=torch.float64)
    inv_freq = p_rope_frequencies(16, 0.5, 16.0)
    outs = []
    for shift in (0, 13, 1000):
        pos = torch.arange(shift, shift + 40)
        outs.append(
            attention(
                apply_rotary(q, pos, inv_freq.double()),
                apply_rotary(k, pos, inv_freq.double()),
                v,
                backend="reference",
            )
        )
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=1e-5, atol=1e-5)  # rotation angles are fp32


def test_a_document_packed_after_others_equals_the_document_alone():
    q, k, v = _qkv(B=1, Tq=30, Tk=30, D=16, dtype=torch.float64)
    inv_freq = p_rope_frequencies(16, 0.5, 16.0)
    doc_ids = torch.tensor([[0] * 12 + [1] * 18])
    pos = positions_in_documents(doc_ids)
    assert pos[0, 12].item() == 0 and pos[0, -1].item() == 17
    packed = attention(
        apply_rotary(q, pos, inv_freq),
        apply_rotary(k, pos, inv_freq),
        v,
        doc_ids=doc_ids,
        backend="chunked",
        chunk=8,
    )
    p1 = torch.arange(18)
    alone = attention(
        apply_rotary(q[:, :, 12:], p1, inv_freq),
        apply_rotary(k[:, :, 12:], p1, inv_freq),
        v[:, :, 12:],
        backend="reference",
    )
    torch.testing.assert_close(packed[:, :, 12:], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_incremental_decoding_equals_the_full_pass(backend):
    q, k, v = _qkv(Tq=23, Tk=23, D=8, dtype=torch.float64)
    full = attention(q, k, v, backend=backend, chunk=5)
    prefill = attention(q[:, :, :9], k[:, :, :9], v[:, :, :9], backend=backend)
    torch.testing.assert_close(prefill, full[:, :, :9], rtol=1e-13, atol=1e-13)
    for i in range(9, 23):
        step = attention(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], q_offset=i, backend=backend)
        torch.testing.assert_close(step, full[:, :, i : i + 1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_offset,Tq", [(0, 97), (40, 57)])
def test_chunked_matches_reference_forward_and_backward(causal, q_offset, Tq):
    q, k, v = _qkv(Tq=Tq, Tk=97, D=72, requires_grad=True)
    doc_ids = torch.tensor([[0] * 50 + [1] * 47, [3] * 97])
    _assert_chunked_matches_reference(q, k, v, 32, dict(causal=causal, q_offset=q_offset, doc_ids=doc_ids))


def _assert_chunked_matches_reference(q, k, v, chunk, kw):
    """Forward and all gradients of the chunked fp32 path within the error-ratio bound of the fp32 reference
    against fp64 (atol: fp32 matmuls of other shapes round differently; 1e-5 is ~10 fp32 ulps here)."""
    ref64 = attention_ref(*[x.double() for x in (q, k, v)], **kw)
    ref = attention(q, k, v, backend="reference", **kw)
    out = attention(q, k, v, backend="chunked", chunk=chunk, **kw)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert_error_ratio(out, ref, ref64, atol=1e-5, what=f"chunk {chunk} forward")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    grads64 = torch.autograd.grad(attention_ref(q64, k64, v64, **kw), (q64, k64, v64), g.double())
    for name, a, b, c in zip("qkv", grads, grads_ref, grads64):
        assert_error_ratio(a, b, c, atol=1e-5, what=f"chunk {chunk} d{name}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "Tq,Tk,q_offset,chunk", [(97, 97, 0, 32), (57, 97, 40, 16), (1, 33, 32, 128), (5, 40, 0, 3)]
)
def test_toeplitz_terms_equal_the_per_block_coefficients(causal, Tq, Tk, q_offset, chunk):
    # The fast path reads each chunk's a_t / sqrt(D) and m_t as a column slice of two Toeplitz matrices built
    # once per call; every chunk's slice must equal the spec's per-block terms (masked: a = 0, m = -inf).
    from shared_kernels.si_attention import _chunk_plan, _toeplitz_terms
    from siattn import coefficients

    plan, (rows, cols, shift) = _chunk_plan(Tq, Tk, q_offset, causal, chunk)
    a_all, m_all = _toeplitz_terms(
        3.0, causal, 1.5, 1.0, rows, cols, shift, 0.125, torch.float64, torch.device("cpu")
    )
    for s, e, kend, c0 in plan:
        t = torch.arange(q_offset + s, q_offset + e)[:, None] - torch.arange(kend)[None, :]
        allowed = t >= 0 if causal else torch.ones_like(t, dtype=torch.bool)
        a, m = coefficients(t.clamp(min=0) if causal else t.abs(), 3.0, 1.5, 1.0, dtype=torch.float64)
        got_a, got_m = a_all[: e - s, c0 : c0 + kend], m_all[: e - s, c0 : c0 + kend]
        assert_exact(got_a[allowed], (a * 0.125)[allowed], "a_t")
        assert_exact(got_m[allowed], m[allowed], "m_t")
        assert (got_a[~allowed] == 0).all() and (got_m[~allowed] == float("-inf")).all()


@pytest.mark.parametrize("chunk", [3, 16, 40, 500])  # 45 rows: exact, partial, one chunk
def test_chunked_any_chunk_size_matches_reference(chunk):
    # Odd shapes for the fast path: T=97 (partial last chunk), D=72, GQA 6/2, documents and a q_offset.
    q, k, v = _qkv(B=2, Hq=6, Hkv=2, Tq=45, Tk=97, D=72, requires_grad=True)
    doc_ids = torch.tensor([[0] * 60 + [1] * 37, [2] * 97])
    _assert_chunked_matches_reference(q, k, v, chunk, dict(q_offset=52, doc_ids=doc_ids, alpha=1.5, beta=1.0))


def test_chunked_no_queries_or_no_keys():
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Tq=0, Tk=5, D=8, requires_grad=True)
    out = attention(q, k, v, backend="chunked")
    assert out.shape == (1, 2, 0, 8)
    out.sum().backward()
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Tq=3, Tk=0, D=8)
    assert_exact(attention(q, k, v, causal=False, backend="chunked"), torch.zeros(1, 2, 3, 8), "no keys")


def test_chunked_fully_masked_rows_give_zeros_and_finite_gradients():
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Tq=9, Tk=9, D=8, requires_grad=True)
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    mask[0, 0, 4] = False  # query 4 sees nothing
    out = attention(q, k, v, attn_mask=mask, backend="chunked", chunk=4)
    ref = attention(q, k, v, attn_mask=mask, backend="reference")
    assert (out[0, :, 4] == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    grads_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_saves_no_score_sized_tensor_for_backward():
    # Memory linear in T: the backward recomputes the probabilities, so only q, k, v (and masks) are saved.
    q, k, v = _qkv(B=1, Hq=2, Hkv=2, Tq=64, Tk=64, D=8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        attention(q, k, v, backend="auto")  # CPU: auto is the chunked path
    assert saved and max(saved) == q.numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_low_precision_inputs(dtype):
    q, k, v = _qkv(Tq=97, Tk=97, D=72, dtype=dtype, requires_grad=True)
    out = attention(q, k, v, backend="chunked", chunk=40)
    assert out.dtype == dtype
    ref = attention(q, k, v, backend="reference")
    ref64 = attention_ref(*[x.double() for x in (q, k, v)])
    assert_error_ratio(out, ref, ref64, what=f"{dtype} forward")
    out.float().pow(2).sum().backward()
    assert all(x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all() for x in (q, k, v))


def test_fp64_gradcheck_of_reference_and_chunked():
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Tq=7, Tk=7, D=4, dtype=torch.float64, requires_grad=True)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    for backend in ("reference", "chunked"):

        def fn(q, k, v, backend=backend):
            return attention(q, k, v, tau=2.0, doc_ids=doc_ids, backend=backend, chunk=3)

        assert torch.autograd.gradcheck(fn, (q, k, v))
    fn = lambda q, k, v: attention(q, k, v, causal=False, alpha=1.5, beta=1.0, backend="chunked", chunk=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_flex_refuses_cpu_training():
    q, k, v = _qkv(Tq=8, Tk=8, D=8, requires_grad=True)
    with pytest.raises(ValueError, match="no backward on CPU"):
        attention(q, k, v, backend="flex")


def test_alpha_beta_family_through_attention():
    q, k, v = _qkv(Tq=17, Tk=17, D=8, dtype=torch.float64)
    e = math.exp(0.5)
    torch.testing.assert_close(
        attention(q, k, v, alpha=e, beta=e, backend="reference"),
        attention(q, k, v, backend="reference"),
        rtol=1e-13,
        atol=1e-13,
    )


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda q, k, v: (q[..., :6], k, v), ValueError, "head dims"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "batch"),
        (lambda q, k, v: (q[0], k, v), ValueError, "4-D"),
        (lambda q, k, v: (q.double(), k, v), TypeError, "share a dtype"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "float16"),
        (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, "same shape"),
        (lambda q, k, v: (q.tolist(), k, v), TypeError, "torch.Tensor"),
    ],
)
def test_bad_tensors_raise(change, error, match):
    q, k, v = _qkv(Tq=8, Tk=8, D=8)
    with pytest.raises(error, match=match):
        attention(*change(q, k, v))


def test_bad_options_raise():
    q, k, v = _qkv(Tq=8, Tk=8, D=8)
    with pytest.raises(ValueError, match="tau"):
        attention(q, k, v, tau=0.0)
    with pytest.raises(ValueError, match="q_offset"):
        attention(q, k, v, q_offset=-1)
    with pytest.raises(ValueError, match="q_offset"):
        attention(q, k, v, q_offset=1)  # queries 1..8 but only keys 0..7: the cache is incomplete
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="doc_ids"):
        attention(q, k, v, doc_ids=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="attn_mask"):
        attention(q, k, v, attn_mask=torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="chunk"):
        attention(q, k, v, backend="chunked", chunk=0)
    with pytest.raises(ValueError, match="beta"):
        attention(q, k, v, alpha=2.0, beta=0.1)


def test_triton_backend_through_attention_matches_reference():
    pytest.importorskip("triton")
    from shared_kernels.backend import triton_interpreting

    if not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = [x.to(device) for x in _qkv(B=1, Hq=2, Hkv=1, Tq=13, Tk=29, D=24)]
    doc_ids = torch.tensor([[0] * 20 + [1] * 9], device=device)
    out = attention(q, k, v, q_offset=16, doc_ids=doc_ids, backend="triton")
    ref = attention(q, k, v, q_offset=16, doc_ids=doc_ids, backend="reference")
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="attn_mask"):
        attention(
            q,
            k,
            v,
            backend="triton",
            attn_mask=torch.ones(1, 1, 13, 29, dtype=torch.bool, device=device),
            q_offset=16,
        )
