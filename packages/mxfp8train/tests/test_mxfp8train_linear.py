"""MXLinear: the three GEMMs against an explicit-quantization reference, GEMM switches, autocast, stats,
convert (skips, shared parameters, transformers models), torch.compile, DDP, and a tiny model that trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mxfp8train
from mxfp8train import (
    E5M2_GRADS_RECIPE,
    OCP_FLOOR_RECIPE,
    PAPER_RECIPE,
    MXLinear,
    MXRecipe,
    convert,
    parity,
    to_mx,
)
from mxfp8train.gpt import GPT, GPTConfig
from mxfp8train.stats import MXStats
from shared_kernels.backend import triton_available, triton_interpreting
from shared_kernels.testing import assert_exact


def qdq(t: torch.Tensor, recipe: MXRecipe, elem: torch.dtype, dim: int) -> torch.Tensor:
    return to_mx(t, elem, recipe.block_size, recipe.scale_mode, dim).dequantize()


def reference_grads(x, w, dy, recipe):
    """Quantize every operand explicitly along its GEMM's reduction dim, from the fp32 tensors."""
    y = qdq(x, recipe, recipe.input_dtype, -1) @ qdq(w, recipe, recipe.weight_dtype, -1).t()
    dx = qdq(dy, recipe, recipe.grad_dtype, -1) @ qdq(w, recipe, recipe.weight_dtype, 0)
    dw = qdq(dy, recipe, recipe.grad_dtype, 0).t() @ qdq(x, recipe, recipe.input_dtype, 0)
    return y, dx, dw


def run_layer(x, w, dy, recipe):
    x = x.clone().requires_grad_()
    w = nn.Parameter(w.clone())
    y = mxfp8train.mx_linear(x, w, None, recipe)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize(
    "recipe", [PAPER_RECIPE, OCP_FLOOR_RECIPE, E5M2_GRADS_RECIPE], ids=["rceil", "floor", "e5m2"]
)
def test_three_gemms_equal_explicit_quantization(recipe):
    g = torch.Generator().manual_seed(0)
    m, k, n = 97, 72, 80  # partial blocks along every reduction dim
    # per-token magnitudes spread over 2^+-10: blocks along tokens (weight grad) then hold small elements
    # that FP8 represents only as subnormals or zero, so the blocking axis matters
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-10, 10, (m, 1), generator=g).float())
    w = torch.randn(n, k, generator=g) * 0.05
    dy = (
        torch.randn(m, n, generator=g)
        * 1e-4
        * torch.exp2(torch.randint(-10, 10, (m, 1), generator=g).float())
    )
    y, dx, dw = run_layer(x, w, dy, recipe)
    y_ref, dx_ref, dw_ref = reference_grads(x, w, dy, recipe)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-6, atol=0)
    # quantizing once and transposing the quantized tensor (blocks along the wrong axis) is different
    wrong_dw = qdq(dy, recipe, recipe.grad_dtype, -1).t() @ qdq(x, recipe, recipe.input_dtype, -1)
    assert not torch.allclose(wrong_dw, dw_ref, rtol=1e-4, atol=0)


def test_each_gemm_can_be_switched_off():
    g = torch.Generator().manual_seed(1)
    x, w, dy = (
        torch.randn(64, 96, generator=g),
        torch.randn(48, 96, generator=g),
        torch.randn(64, 48, generator=g),
    )
    y_ref, dx_ref, dw_ref = reference_grads(x, w, dy, PAPER_RECIPE)
    for fwd, ig, wg in [(False, True, True), (True, False, True), (True, True, False), (False, False, False)]:
        recipe = PAPER_RECIPE.replace(forward=fwd, input_grad=ig, weight_grad=wg)
        y, dx, dw = run_layer(x, w, dy, recipe)
        torch.testing.assert_close(y, y_ref if fwd else x @ w.t(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dx, dx_ref if ig else dy @ w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dw, dw_ref if wg else dy.t() @ x, rtol=1e-6, atol=1e-6)
        if not (fwd or ig or wg):
            assert_exact(y, x @ w.t(), "all GEMMs off = plain linear")


def test_mxlinear_module_bias_leading_dims_and_autocast():
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(64, 40)
    mx = MXLinear.from_linear(lin)
    assert mx.weight is lin.weight and mx.bias is lin.bias
    x = torch.randn(3, 5, 64, generator=g)
    y = mx(x)
    ref = (
        qdq(x.reshape(15, 64), PAPER_RECIPE, torch.float8_e4m3fn, -1)
        @ qdq(lin.weight.detach(), PAPER_RECIPE, torch.float8_e4m3fn, -1).t()
    ).reshape(3, 5, 40) + lin.bias
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = mx(x)
    assert yb.dtype == torch.bfloat16
    yb.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and lin.bias.grad.dtype == torch.float32
    torch.testing.assert_close(yb.float(), ref, rtol=2e-2, atol=2e-2)
    assert "rceil" in repr(mx) and "gemms=FIW" in repr(mx)


def test_stats_rceil_never_clips_floor_does():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 128, generator=g).requires_grad_()
    w = torch.randn(64, 128, generator=g)
    for recipe, clips in [(PAPER_RECIPE, False), (OCP_FLOOR_RECIPE, True)]:
        layer = MXLinear(128, 64, bias=False, recipe=recipe.replace(track_stats=True))
        with torch.no_grad():
            layer.weight.copy_(w)
        layer(x).square().mean().backward()
        s = layer.mx_stats.summary()
        assert set(s) == {"input", "weight", "grad"}
        for role in s.values():
            assert role["casts"] == 2  # each role cast twice (two directions)
            if clips:
                # gaussian blocks: ~19% of blocks have amax mantissa > 1.75; ~1% of elements saturate
                assert 0.08 < role["clipped_block_fraction"] < 0.35 and 0.001 < role["clip_fraction"] < 0.03
            else:
                assert role["clipped"] == 0
        assert s["input"]["amax_max"] == x.detach().abs().max().item()


def test_stats_count_flush_to_zero():
    x = torch.ones(32, 32)
    x[:, 1] = 2.0**-12  # 2^-12 / 2^(0-8) ... amax 1 -> E = -8: 2^-12 * 2^8 = 2^-4, kept
    x[:, 2] = 2.0**-20  # 2^-20 * 2^8 = 2^-12 < half the smallest E4M3 subnormal 2^-9: flushed
    layer = MXLinear(32, 8, bias=False, recipe=PAPER_RECIPE.replace(track_stats=True))
    layer(x)
    s = layer.mx_stats.summary()["input"]
    # the weight needs a gradient, so forward casts X along rows (flushes column 2) and along columns
    # (column 2 is its own block there: nothing flushed) at once
    assert s["casts"] == 2 and s["flushed"] == 32 and s["flush_fraction"] == pytest.approx(1 / 64)
    with torch.no_grad():  # no backward coming: only the row cast
        layer.mx_stats.reset()
        layer(x)
    s = layer.mx_stats.summary()["input"]
    assert s["casts"] == 1 and s["flushed"] == 32 and s["flush_fraction"] == pytest.approx(1 / 32)


def test_convert_skips_head_embeddings_norms_and_subclasses():
    class Custom(nn.Linear):
        pass

    model = GPT(GPTConfig(n_layers=2, width=64, n_heads=2, context=16))
    model.extra = Custom(4, 4)
    weights = {n: p for n, p in model.named_parameters()}
    convert(model)
    converted = mxfp8train.mx_layers(model)
    assert sorted(converted) == sorted(
        f"blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    )
    assert type(model.lm_head) is nn.Linear and type(model.extra) is Custom
    assert all(p is weights[n] for n, p in model.named_parameters())
    model2 = GPT(GPTConfig(n_layers=1, width=64, n_heads=2, context=16))
    convert(model2, PAPER_RECIPE, filter_fn=lambda name, m: "mlp" in name)
    assert sorted(mxfp8train.mx_layers(model2)) == ["blocks.0.mlp.fc", "blocks.0.mlp.proj"]
    assert isinstance(convert(nn.Linear(8, 8)), MXLinear)
    with pytest.raises(TypeError, match="recipe"):
        convert(model2, "mxfp8-rceil")
    with pytest.raises(ValueError, match="grad_dtype"):
        MXRecipe(grad_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="block_size"):
        MXRecipe(block_size=16, gemm_backend="scaled_mm")
    with pytest.raises(ValueError, match="recipe name"):
        mxfp8train.recipe_from_name("fp8")


def test_ablation_presets_name_their_rule_and_gemms():
    # (scale rule, forward GEMM, both backward GEMMs); every other field is the paper's
    want = {
        "mxfp8-rceil": ("rceil", True, True),
        "mxfp8-floor": ("floor", True, True),
        "mxfp8-rceil-fwd-only": ("rceil", True, False),
        "mxfp8-rceil-bwd-only": ("rceil", False, True),
        "mxfp8-floor-fwd-only": ("floor", True, False),
        "mxfp8-floor-bwd-only": ("floor", False, True),
    }
    for name, (mode, fwd, bwd) in want.items():
        r = mxfp8train.RECIPES[name]
        assert (r.scale_mode, r.forward, r.input_grad, r.weight_grad) == (mode, fwd, bwd, bwd), name
        assert r.replace(scale_mode="rceil", forward=True, input_grad=True, weight_grad=True) == PAPER_RECIPE
    assert set(parity.VARIANTS) - {"bf16", "fp32"} == set(mxfp8train.RECIPES)


def test_convert_transformers_model(tiny_lm_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    ref = model(ids).logits
    convert(model)
    names = sorted(mxfp8train.mx_layers(model))
    assert names and not any("lm_head" in n or "embed" in n for n in names)
    assert any(n.endswith("q_proj") for n in names) and any(n.endswith("down_proj") for n in names)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and (out.logits - ref).abs().max() < 0.1 * ref.abs().max()


def test_torch_compile_traces_mxlinear():
    torch.manual_seed(4)
    layer = MXLinear(64, 32)
    x = torch.randn(16, 64)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y_eager = layer(x)
    y_eager.sum().backward()
    g_eager = layer.weight.grad.clone()
    layer.weight.grad = None
    y_comp = compiled(x)
    y_comp.sum().backward()
    assert_exact(y_comp, y_eager, "compiled forward")
    assert_exact(layer.weight.grad, g_eager, "compiled weight grad")


def test_ddp_wraps_converted_model(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(5)
        model = convert(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)))
        ddp = DistributedDataParallel(model)
        x = torch.randn(8, 64)
        ddp(x).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        model(x).sum().backward()
        for g, p in zip(grads, model.parameters(), strict=True):
            assert_exact(g, p.grad, "DDP grad")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("recipe", [PAPER_RECIPE, E5M2_GRADS_RECIPE], ids=["rceil", "e5m2"])
def test_tiny_gpt_trains_under_convert(recipe):
    torch.manual_seed(6)
    cfg = GPTConfig(n_layers=1, width=64, n_heads=2, context=32)
    model = convert(GPT(cfg), recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = torch.tensor(list(b"to be or not to be, that is the question. " * 40))
    g = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(25):
        starts = torch.randint(0, len(text) - 33, (8,), generator=g)
        batch = torch.stack([text[s : s + 33] for s in starts])
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln 256 at init
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_converted_gpt_matches_eager(backend):
    """A converted model under torch.compile: same loss and gradients as eager. aot_eager runs the same
    kernels (bit for bit); inductor fuses the norms, GELU and casts into generated C++, so the high-precision
    activations round differently and an MX element near a rounding boundary may round the other way."""
    torch.manual_seed(8)
    model = convert(GPT(GPTConfig(n_layers=1, width=64, n_heads=2, context=32)))
    idx = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(9))

    def loss_and_grads(loss_fn):
        for p in model.parameters():
            p.grad = None
        loss = loss_fn(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads(model.loss)
    loss_c, grads_c = loss_and_grads(torch.compile(model.loss, backend=backend, fullgraph=True))
    if backend == "aot_eager":
        assert_exact(loss_c, loss, "compiled loss")
        for name in grads:
            assert_exact(grads_c[name], grads[name], name)
    else:
        torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=0)
        for name in grads:
            rel = (grads_c[name] - grads[name]).norm() / grads[name].norm()
            assert rel < 2e-2, f"{name}: relative gradient error {rel:.2e}"


@pytest.mark.parametrize(
    "recipe", [PAPER_RECIPE, OCP_FLOOR_RECIPE, E5M2_GRADS_RECIPE], ids=["rceil", "floor", "e5m2"]
)
def test_fused_round_trip_path_equals_cast_and_gemm_path(recipe):
    """Without stats, emulated GEMMs take mx_quantize_dequantize's fp32 operands; with stats, the codes and
    scales go through mx_gemm. Same operands, same matmul layouts: the same bits."""
    g = torch.Generator().manual_seed(10)
    x, w, dy = (
        torch.randn(97, 72, generator=g),
        torch.randn(80, 72, generator=g) * 0.05,
        torch.randn(97, 80, generator=g),
    )
    fused = run_layer(x, w, dy, recipe)
    xs, ws = x.clone().requires_grad_(), nn.Parameter(w.clone())
    stats = MXStats()
    y = mxfp8train.mx_linear(xs, ws, None, recipe, stats=stats)
    y.backward(dy)
    assert stats.summary()["grad"]["casts"] == 2  # the cast path ran
    cast = (y.detach(), xs.grad, ws.grad)
    for a, b, name in zip(fused, cast, ("y", "dx", "dw"), strict=True):
        assert_exact(a, b, name)


@pytest.mark.parametrize("recipe", [PAPER_RECIPE, OCP_FLOOR_RECIPE], ids=["rceil", "floor"])
def test_cast_path_casts_each_tensor_both_ways_once(recipe, monkeypatch):
    """On the cast path (here: stats on) X, W and dY are cast rows + columns together (the one-read cast on
    Triton); the layer's outputs equal the explicit reference, and each role is cast exactly twice."""
    import mxfp8train.linear as linear_mod

    calls = []
    real = linear_mod.mx_cast_rows_cols
    monkeypatch.setattr(linear_mod, "mx_cast_rows_cols", lambda t, *a: calls.append(t.shape) or real(t, *a))
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(97, 72, generator=g), torch.randn(80, 72, generator=g) * 0.05
    dy = torch.randn(97, 80, generator=g)
    xs, ws = x.clone().requires_grad_(), nn.Parameter(w.clone())
    stats = MXStats()
    y = mxfp8train.mx_linear(xs, ws, None, recipe, stats=stats)
    y.backward(dy)
    assert sorted(calls) == sorted([(97, 72), (80, 72), (97, 80)])
    summary = stats.summary()
    assert [summary[r]["casts"] for r in ("input", "weight", "grad")] == [2, 2, 2]
    y_ref, dx_ref, dw_ref = reference_grads(x, w, dy, recipe)
    for got, want, name in [(y, y_ref, "y"), (xs.grad, dx_ref, "dx"), (ws.grad, dw_ref, "dw")]:
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=0, msg=name)
    # without input gradients only X needs both casts
    calls.clear()
    ws2 = nn.Parameter(w.clone())
    mxfp8train.mx_linear(x, ws2, None, recipe, stats=MXStats()).backward(dy)
    assert calls == [(97, 72)]
    torch.testing.assert_close(ws2.grad, dw_ref, rtol=1e-6, atol=0)


@pytest.mark.skipif(
    not (triton_available() and (torch.cuda.is_available() or triton_interpreting())),
    reason="needs triton with a GPU or TRITON_INTERPRET=1",
)
def test_triton_cast_backend_equals_torch_backend():
    """MXLinear on the Triton cast (one-read row + column casts) gives the torch cast's bits."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(12)
    x, w = torch.randn(97, 72, generator=g), torch.randn(80, 72, generator=g) * 0.05
    dy = torch.randn(97, 80, generator=g)
    outs = []
    for backend in ("torch", "triton"):
        recipe = PAPER_RECIPE.replace(cast_backend=backend, gemm_backend="emulated")
        xs, ws = x.to(dev).requires_grad_(), nn.Parameter(w.to(dev))
        y = mxfp8train.mx_linear(xs, ws, None, recipe, stats=MXStats())  # stats: the cast path on CPU too
        y.backward(dy.to(dev))
        outs.append((y.detach().cpu(), xs.grad.cpu(), ws.grad.cpu()))
    for a, b, name in zip(*outs, ("y", "dx", "dw"), strict=True):
        assert_exact(a, b, name)


def test_floor_vs_rceil_clip_statistics_pinned_on_constructed_tensor():
    """Regression pin: eight blocks with chosen amax mantissas. FLOOR saturates exactly the elements above
    1.75 x 2^floor(log2 amax) (38 elements in 4 blocks, negatives included), RCEIL none; RCEIL's scale byte
    is FLOOR's + 1 exactly in those 4 blocks."""
    ulp = 2.0**-23
    blocks = torch.zeros(8, 32)
    blocks[0, :] = 0.5
    blocks[0, 0] = 1.0  # mantissa 1: no clip
    blocks[1, :2] = torch.tensor([1.75, 1.0]) * 4  # exactly 1.75: 448, no clip
    blocks[2, :2] = torch.tensor([1.75 + ulp, 1.5]) * 4  # one ulp above: 1 clip
    blocks[3, :6] = torch.tensor([1.9, 1.8, 1.76, 1.7, 1.0, -1.75]) * 32  # 3 clips
    blocks[4, :] = 1.99 * 2.0**-3  # every element clips: 32
    # block 5 all zero
    blocks[6, :2] = torch.tensor([1.5, -1.5]) * 2.0**10  # no clip
    blocks[7, :3] = torch.tensor([-1.8, 1.8, 0.3]) * 2.0**-20  # 2 clips, one negative
    x = blocks.reshape(2, 128)
    pinned = {"floor": (38, 4), "rceil": (0, 0)}
    scales = {}
    for mode, (clipped, clipped_blocks) in pinned.items():
        stats = MXStats()
        mx = to_mx(x, scale_mode=mode)
        stats.update("input", x, mx.data, mx.scale, 32, -1)
        s = stats.summary()["input"]
        assert (s["clipped"], s["clipped_blocks"], s["blocks"], s["elements"]) == (
            clipped,
            clipped_blocks,
            8,
            256,
        )
        assert s["clip_fraction"] == clipped / 256 and s["clipped_block_fraction"] == clipped_blocks / 8
        scales[mode] = mx.scale.flatten().long()
    assert (scales["rceil"] - scales["floor"]).tolist() == [0, 0, 1, 1, 1, 0, 0, 1]
