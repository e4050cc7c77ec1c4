"""The fused scale-invariant attention kernel against its torch reference (interpreter on CPU, GPU when lent).

Interpreter tests stay small: every tile runs in Python."""

import pytest
import torch

from shared_kernels.backend import triton_available, triton_interpreting
from shared_kernels.testing import assert_error_ratio

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

from shared_kernels.si_attention import si_attention, si_attention_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreting(), reason="needs CUDA or TRITON_INTERPRET=1")


def _qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    make = lambda H, T: torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    return make(Hq, Tq), make(Hkv, Tk), make(Hkv, Tk)


def _check(q, k, v, **kw):
    out = si_attention(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    same = si_attention_ref(q, k, v, **kw)  # torch in q's precision (fp32 softmax)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref64 = si_attention_ref(q64, k64, v64, **kw)
    assert_error_ratio(out, same, ref64, atol=1e-5, what="out")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_same = torch.autograd.grad(same, (q, k, v), g)
    grads64 = torch.autograd.grad(ref64, (q64, k64, v64), g.double())
    for name, a, b, c in zip("qkv", grads, grads_same, grads64):
        assert_error_ratio(a, b, c, atol=1e-5, what=f"d{name}")


@needs_kernel
def test_odd_shape_t97_d72_gqa_forward_and_backward():
    _check(*_qkv(1, 2, 1, 97, 97, 72), tau=10.0)


@needs_kernel
def test_q_offset_documents_and_general_family():
    q, k, v = _qkv(2, 2, 2, 19, 45, 24, seed=1)
    doc_ids = torch.tensor([[0] * 30 + [1] * 15, [4] * 45], device=DEVICE)
    _check(q, k, v, tau=3.0, q_offset=26, doc_ids=doc_ids, alpha=1.5, beta=1.0)


@needs_kernel
def test_non_causal():
    _check(*_qkv(1, 4, 2, 21, 33, 16, seed=2), causal=False)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_forward(dtype):
    q, k, v = _qkv(1, 2, 1, 40, 40, 32, dtype=dtype, seed=3)
    with torch.no_grad():
        out = si_attention(q, k, v)
        same = si_attention_ref(q, k, v)
        ref64 = si_attention_ref(q.double(), k.double(), v.double())
    assert out.dtype == dtype
    assert_error_ratio(out, same, ref64, atol=1e-3, what=f"{dtype} out")


@needs_kernel
def test_custom_ops_pass_opcheck_and_compile_without_graph_break():
    # Registered as torch.library custom ops (forward, backward, fake implementations), so torch.compile
    # traces si_attention as one opaque op: fullgraph=True fails on any graph break.
    q, k, v = _qkv(1, 2, 1, 13, 29, 16, seed=4)
    doc = torch.tensor([[0] * 20 + [1] * 9], device=DEVICE, dtype=torch.int32)
    torch.library.opcheck(torch.ops.shared_kernels.si_attention_fwd.default,
                          (q, k, v, doc, 3.0, True, 16, 1.5, 1.0))
    plain = [x.detach() for x in (q, k, v)]  # the backward op has no autograd formula of its own
    out, lse = torch.ops.shared_kernels.si_attention_fwd(*plain, doc, 3.0, True, 16, 1.5, 1.0)
    torch.library.opcheck(torch.ops.shared_kernels.si_attention_bwd.default,
                          (*plain, doc, out, lse, torch.randn_like(out), 3.0, True, 16, 1.5, 1.0))

    def loss(q, k, v):
        return si_attention(q, k, v, tau=3.0, q_offset=16, doc_ids=doc, alpha=1.5, beta=1.0).pow(2).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_dtype_raises():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises((TypeError, ValueError)):
        si_attention(q, q, q)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,D", [(1025, 72), (2048, 128), (97, 64)])
def test_gpu_parity(dtype, T, D):
    q, k, v = _qkv(2, 8, 2, T, T, D, dtype=dtype, device="cuda")
    _check(q, k, v, tau=10.0)


@pytest.mark.gpu
def test_gpu_decode_step_equals_full_pass():
    q, k, v = _qkv(1, 4, 2, 300, 300, 64, device="cuda")
    with torch.no_grad():
        full = si_attention(q, k, v)
        step = si_attention(q[:, :, -1:], k, v, q_offset=299)
    torch.testing.assert_close(step, full[:, :, -1:], rtol=1e-5, atol=1e-5)
