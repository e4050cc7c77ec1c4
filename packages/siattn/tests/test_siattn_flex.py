"""Flex backend: the block mask skips fully masked blocks and equals the dense mask; score_mod + block mask
match the reference; the compiled path traces without graph breaks."""

import pytest
import torch

from siattn import attention
from siattn.attention import si_block_mask, si_mask_mod

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def _dense(B, Tq, Tk, causal, q_offset, doc_ids):
    """The reference semantics of the mask: (B, Tq, Tk) bool, True = may attend."""
    i = torch.arange(q_offset, q_offset + Tq)[:, None]
    j = torch.arange(Tk)[None, :]
    keep = (i >= j) if causal else torch.ones(Tq, Tk, dtype=torch.bool)
    keep = keep.expand(B, Tq, Tk)
    if doc_ids is not None:
        keep = keep & (doc_ids[:, q_offset : q_offset + Tq, None] == doc_ids[:, None, :])
    return keep


def _visited_blocks(block_mask):
    """Blocks the kernel computes (partial + full) per batch row, summed over query blocks."""
    n = block_mask.kv_num_blocks.sum((1, 2))
    if block_mask.full_kv_num_blocks is not None:
        n = n + block_mask.full_kv_num_blocks.sum((1, 2))
    return n.tolist()


@pytest.mark.parametrize(
    "causal,q_offset,Tq,docs,visited",
    [
        (True, 0, 256, None, [10]),  # 4x4 blocks of 64: the lower triangle with its diagonal
        (True, 0, 256, [128, 128], [6, 10]),  # two documents: 3 + 3 blocks; row 1 is one document
        (True, 128, 128, [192, 64], [4, 7]),  # queries 128..255 against 256 keys: 3 + 1 blocks
        (False, 0, 256, [64, 192], [10, 16]),  # non-causal documents: 1 + 9 blocks
    ],
)
def test_block_mask_skips_blocks_and_equals_the_dense_mask(causal, q_offset, Tq, docs, visited):
    Tk = 256
    doc_ids = None
    if docs is not None:
        doc_ids = torch.stack(
            [torch.cat([torch.full((n,), d) for d, n in enumerate(docs)]), torch.zeros(Tk).long()]
        )
    B = 2 if doc_ids is not None else 1
    bm = si_block_mask(B, Tq, Tk, causal=causal, q_offset=q_offset, doc_ids=doc_ids, block_size=64)
    assert _visited_blocks(bm) == visited[:B]
    total = (Tq // 64) * (Tk // 64)
    assert all(n < total for n in _visited_blocks(bm)[:1])  # row 0 always skips blocks
    dense = flex.create_mask(si_mask_mod(causal, q_offset, doc_ids), B, 1, Tq, Tk, device="cpu")[:, 0]
    assert torch.equal(dense, _dense(B, Tq, Tk, causal, q_offset, doc_ids))
    # Block level: a block is visited exactly when some entry of the dense mask in it is True.
    want_blocks = dense.view(B, Tq // 64, 64, Tk // 64, 64).any(4).any(2)
    assert torch.equal(bm.to_dense()[:, 0].bool(), want_blocks)


def test_flex_with_block_mask_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 57, 24, generator=g),
        torch.randn(2, 2, 97, 24, generator=g),
        torch.randn(2, 2, 97, 24, generator=g),
    )
    doc_ids = torch.tensor([[0] * 50 + [1] * 47, [3] * 97])
    for kw in (
        dict(q_offset=40, doc_ids=doc_ids),
        dict(causal=False, doc_ids=doc_ids),
    ):  # ~10 s each (dynamo)
        ref = attention(q, k, v, backend="reference", **kw)
        out = attention(q, k, v, backend="flex", **kw)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_compiled_flex_path_traces_without_graph_breaks(monkeypatch):
    # The compiled path as attention(backend="flex", compile_flex=True) takes it, with inductor swapped for
    # aot_eager (inductor's CPU flex template costs ~1 min of C++ compilation): fullgraph fails on a break.
    import importlib

    mod = importlib.import_module(
        "siattn.attention"
    )  # the module (siattn.attention the name is the function)
    monkeypatch.setattr(
        mod,
        "_COMPILED_FLEX",
        torch.compile(flex.flex_attention, backend="aot_eager", fullgraph=True, dynamic=False),
    )
    g = torch.Generator().manual_seed(1)
    q, k, v = [torch.randn(1, 2, 40, 16, generator=g) for _ in range(3)]
    doc_ids = torch.tensor([[0] * 25 + [1] * 15])
    with torch.no_grad():
        out = attention(q, k, v, backend="flex", compile_flex=True, doc_ids=doc_ids)
    torch.testing.assert_close(
        out, attention(q, k, v, backend="reference", doc_ids=doc_ids), rtol=2e-5, atol=2e-5
    )


@pytest.mark.gpu
def test_gpu_compiled_flex_matches_the_reference():
    g = torch.Generator().manual_seed(2)
    q, k, v = [torch.randn(1, 4, 1025, 64, generator=g).cuda() for _ in range(3)]
    doc_ids = torch.tensor([[0] * 600 + [1] * 425], device="cuda")
    out = attention(q, k, v, backend="flex", doc_ids=doc_ids)  # compiled by default on CUDA
    torch.testing.assert_close(
        out, attention(q, k, v, backend="reference", doc_ids=doc_ids), rtol=1e-4, atol=1e-4
    )
