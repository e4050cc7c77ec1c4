"""The scale-invariant attention op: every backend against the fp64 reference (GQA, causal, offsets,
documents, padding, odd shapes), input validation at every entry point, the custom-op registrations.

The Triton kernel runs under TRITON_INTERPRET=1 on CPU (small sizes: every tile runs in Python) and on a GPU
when one is lent."""

import math

import pytest
import torch

from shared_kernels.backend import triton_available, triton_interpreting
from shared_kernels.si_attention import (
    si_attention,
    si_attention_ref,
    si_attention_weights,
    si_coefficients,
)
from shared_kernels.testing import assert_error_ratio

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernel_runs = triton_available() and (DEVICE == "cuda" or triton_interpreting())
BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(not kernel_runs, reason="needs triton with CUDA or TRITON_INTERPRET=1"),
    ),
]


def _qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    make = lambda H, T: torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    return make(Hq, Tq), make(Hkv, Tk), make(Hkv, Tk)


def _check(backend, q, k, v, **kw):
    """Forward and all gradients within the error-ratio bound of the same-precision reference against fp64."""
    out = si_attention(q, k, v, backend=backend, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    same = si_attention_ref(q, k, v, **kw)  # torch in q's precision (fp32 softmax)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref64 = si_attention_ref(q64, k64, v64, **kw)
    assert_error_ratio(out, same, ref64, atol=1e-5, what=f"{backend} out")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_same = torch.autograd.grad(same, (q, k, v), g)
    grads64 = torch.autograd.grad(ref64, (q64, k64, v64), g.double())
    for name, a, b, c in zip("qkv", grads, grads_same, grads64):
        assert_error_ratio(a, b, c, atol=1e-5, what=f"{backend} d{name}")


def test_reference_is_the_formula_by_hand():
    # One query row by hand in fp64: S = q.k / sqrt(D), a_t S + m_t, softmax over the visible keys, @ v.
    q, k, v = _qkv(1, 1, 1, 5, 5, 3, dtype=torch.float64, device="cpu")
    i, tau = 4, 2.0
    logits = []
    for j in range(i + 1):
        a_sq = 1 + 2 * math.log(1 + (i - j) / tau)
        logits.append(math.sqrt(a_sq) * (q[0, 0, i] @ k[0, 0, j]).item() / math.sqrt(3) + 1 - a_sq)
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
    want = (p[:, None] * v[0, 0, :5].detach()).sum(0)
    torch.testing.assert_close(si_attention_ref(q, k, v, tau=tau)[0, 0, i].detach(), want, rtol=0, atol=1e-12)
    a, m = si_coefficients(torch.tensor([0.0, 7.0], dtype=torch.float64), tau, math.exp(0.5), math.exp(0.5))
    torch.testing.assert_close(a, torch.tensor([1.0, math.sqrt(1 + 2 * math.log(4.5))], dtype=torch.float64))
    torch.testing.assert_close(m, 1 - a * a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shape_gqa_forward_and_backward(backend):
    _check(backend, *_qkv(1, 2, 1, 97, 97, 72), tau=10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_offset_documents_and_general_family(backend):
    q, k, v = _qkv(2, 2, 2, 19, 45, 24, seed=1)
    doc_ids = torch.tensor([[0] * 30 + [1] * 15, [4] * 45], device=DEVICE)
    _check(backend, q, k, v, tau=3.0, q_offset=26, doc_ids=doc_ids, alpha=1.5, beta=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_causal_with_offset(backend):
    _check(backend, *_qkv(1, 4, 2, 21, 33, 16, seed=2), causal=False, q_offset=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding(backend):
    # Left padding of row 0: the torch path takes attn_mask; the kernel expresses it as a document of its own.
    q, k, v = _qkv(2, 2, 1, 23, 23, 16, seed=5)
    pad = torch.zeros(2, 23, dtype=torch.bool, device=DEVICE)
    pad[0, :6] = True
    if backend == "torch":
        mask = (~pad[:, None, None, :]) | torch.eye(
            23, dtype=torch.bool, device=DEVICE
        )  # pads see themselves
        _check(backend, q, k, v, attn_mask=mask)
        with torch.no_grad():
            v2 = v.detach().clone()
            v2[0, :, :6] = 1e30
            out = si_attention(q, k, v2, attn_mask=mask, backend=backend)
        assert torch.isfinite(out[0, :, 6:]).all()
    else:
        _check(backend, q, k, v, doc_ids=pad.long())
        with pytest.raises(ValueError, match="attn_mask"):
            si_attention(
                q, k, v, backend="triton", attn_mask=torch.ones(2, 1, 23, 23, dtype=torch.bool, device=DEVICE)
            )


def test_torch_path_fp64_and_chunk_sizes():
    q, k, v = _qkv(2, 6, 2, 45, 97, 72, dtype=torch.float64, seed=6, device="cpu")
    doc_ids = torch.tensor([[0] * 60 + [1] * 37, [2] * 97])
    ref = si_attention_ref(q, k, v, q_offset=52, doc_ids=doc_ids)
    for chunk in (3, 16, 500):
        out = si_attention(q, k, v, q_offset=52, doc_ids=doc_ids, backend="torch", chunk=chunk)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not kernel_runs, reason="needs triton with CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_forward(dtype):
    q, k, v = _qkv(1, 2, 1, 40, 40, 32, dtype=dtype, seed=3)
    with torch.no_grad():
        out = si_attention(q, k, v, backend="triton")
        same = si_attention_ref(q, k, v)
        ref64 = si_attention_ref(q.double(), k.double(), v.double())
    assert out.dtype == dtype
    assert_error_ratio(out, same, ref64, atol=1e-3, what=f"{dtype} out")


def test_auto_picks_the_torch_path_on_cpu_and_for_fp64():
    q, k, v = _qkv(1, 2, 1, 9, 9, 8, dtype=torch.float64, device="cpu")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        si_attention(q, k, v)
    assert max(saved) == q.numel()  # the chunked op saves q, k, v only


def test_chunked_ops_pass_opcheck():
    q, k, v = _qkv(1, 2, 1, 13, 29, 16, seed=4, device="cpu")
    doc = torch.tensor([[0] * 20 + [1] * 9])
    plain = [x.detach() for x in (q, k, v)]
    torch.library.opcheck(
        torch.ops.shared_kernels.si_attention_chunked_fwd.default,
        (*plain, doc, None, 3.0, True, 16, 1.5, 1.0, 5),
    )
    torch.library.opcheck(
        torch.ops.shared_kernels.si_attention_chunked_bwd.default,
        (*plain, doc, None, torch.randn_like(plain[0]), 3.0, True, 16, 1.5, 1.0, 5),
    )


@pytest.mark.skipif(not kernel_runs, reason="needs triton with CUDA or TRITON_INTERPRET=1")
def test_custom_ops_pass_opcheck_and_compile_without_graph_break():
    # Registered as torch.library custom ops (forward, backward, fake implementations), so torch.compile
    # traces si_attention as one opaque op: fullgraph=True fails on any graph break.
    q, k, v = _qkv(1, 2, 1, 13, 29, 16, seed=4)
    doc = torch.tensor([[0] * 20 + [1] * 9], device=DEVICE, dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.shared_kernels.si_attention_fwd.default, (q, k, v, doc, 3.0, True, 16, 1.5, 1.0)
    )
    plain = [x.detach() for x in (q, k, v)]  # the backward op has no autograd formula of its own
    out, lse = torch.ops.shared_kernels.si_attention_fwd(*plain, doc, 3.0, True, 16, 1.5, 1.0)
    torch.library.opcheck(
        torch.ops.shared_kernels.si_attention_bwd.default,
        (*plain, doc, out, lse, torch.randn_like(out), 3.0, True, 16, 1.5, 1.0),
    )

    def loss(q, k, v):
        return (
            si_attention(q, k, v, tau=3.0, q_offset=16, doc_ids=doc, alpha=1.5, beta=1.0, backend="triton")
            .pow(2)
            .sum()
        )

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _bad(q, k, v):
    B, Tk = q.shape[0], k.shape[2]
    return [
        ("q 3-D", (q[0], k, v), {}, ValueError, "4-D"),
        ("q not a tensor", (q.tolist(), k, v), {}, TypeError, "torch.Tensor"),
        ("int q", (q.int(), k.int(), v.int()), {}, TypeError, "float16"),
        ("dtypes differ", (q.double(), k, v), {}, TypeError, "share a dtype"),
        ("k/v head dim != q's", (q, k[..., :4], v[..., :4]), {}, ValueError, "head dims"),
        ("k and v shapes differ", (q, k, v[:, :, :5]), {}, ValueError, "same shape"),
        ("batch differs", (q, k[:1], v[:1]), {}, ValueError, "batch"),
        ("heads not a multiple", (q[:, :3], k[:, :2], v[:, :2]), {}, ValueError, "multiple"),
        (
            "q_offset + Tq > Tk with doc_ids",
            (q, k, v),
            dict(causal=False, q_offset=1, doc_ids=torch.zeros(B, Tk, dtype=torch.long)),
            ValueError,
            "q_offset",
        ),
        ("q_offset + Tq > Tk causal", (q, k, v), dict(q_offset=1), ValueError, "q_offset"),
        ("negative q_offset", (q, k, v), dict(q_offset=-1), ValueError, "q_offset"),
        ("float q_offset", (q, k, v), dict(q_offset=0.0), ValueError, "q_offset"),
        (
            "doc_ids short",
            (q, k, v),
            dict(doc_ids=torch.zeros(B, Tk - 1, dtype=torch.long)),
            ValueError,
            "doc_ids",
        ),
        ("doc_ids float", (q, k, v), dict(doc_ids=torch.zeros(B, Tk)), ValueError, "doc_ids"),
        (
            "doc_ids bool",
            (q, k, v),
            dict(doc_ids=torch.zeros(B, Tk, dtype=torch.bool)),
            ValueError,
            "doc_ids",
        ),
        ("doc_ids a list", (q, k, v), dict(doc_ids=[[0] * Tk] * B), TypeError, "doc_ids"),
        ("attn_mask float", (q, k, v), dict(attn_mask=torch.ones(B, 1, 8, Tk)), ValueError, "attn_mask"),
        (
            "attn_mask shape",
            (q, k, v),
            dict(attn_mask=torch.ones(B, 1, 8, 3, dtype=torch.bool)),
            ValueError,
            "attn_mask",
        ),
        ("tau 0", (q, k, v), dict(tau=0.0), ValueError, "tau"),
        ("tau nan", (q, k, v), dict(tau=float("nan")), ValueError, "tau"),
        ("alpha without beta", (q, k, v), dict(alpha=1.5), ValueError, "together"),
        ("beta too small", (q, k, v), dict(alpha=2.0, beta=0.1), ValueError, "beta"),
        ("causal not a bool", (q, k, v), dict(causal="yes"), TypeError, "causal"),
    ]


_CASES = _bad(*_qkv(2, 4, 2, 8, 8, 8, device="cpu"))


@pytest.mark.parametrize("entry", ["torch", "triton", "auto", "ref", "weights"])
@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_bad_inputs_raise_on_every_entry_point(entry, case):
    # Validation comes first on every path (the kernel would read out of bounds on most of these).
    name, args, kw, error, match = case
    if entry == "weights" and name == "k and v shapes differ":
        pytest.skip("si_attention_weights takes no v")
    with pytest.raises(error, match=match):
        if entry == "ref":
            si_attention_ref(*args, **kw)
        elif entry == "weights":
            si_attention_weights(*args[:2], **kw)
        else:
            si_attention(*args, backend=entry, **kw)


def test_bad_backend_and_chunk_raise():
    q, k, v = _qkv(1, 1, 1, 4, 4, 8, device="cpu")
    with pytest.raises(ValueError, match="backend"):
        si_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="chunk"):
        si_attention(q, k, v, backend="torch", chunk=0)
    if not triton_interpreting():
        with pytest.raises(ValueError, match="triton|CUDA"):
            si_attention(q.double(), k.double(), v.double(), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,D", [(1025, 72), (2048, 128), (97, 64)])
def test_gpu_parity(dtype, T, D):
    q, k, v = _qkv(2, 8, 2, T, T, D, dtype=dtype, device="cuda")
    _check("triton", q, k, v, tau=10.0)


@pytest.mark.gpu
def test_gpu_decode_step_equals_full_pass():
    q, k, v = _qkv(1, 4, 2, 300, 300, 64, device="cuda")
    with torch.no_grad():
        full = si_attention(q, k, v)
        step = si_attention(q[:, :, -1:], k, v, q_offset=299)
    torch.testing.assert_close(step, full[:, :, -1:], rtol=1e-5, atol=1e-5)
