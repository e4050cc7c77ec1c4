"""MXLinear: a linear layer whose three GEMMs run on MX operands (arXiv 2506.08027, section 3).

For X (M, K) (tokens x in_features), W (N, K) and dY (M, N):

    forward        Y  = X  Wᵀ   reduction over K: X blocked along K (dim -1), W along K (dim -1)
    input grad     dX = dY W    reduction over N: dY along N (dim -1), W along N (dim 0)
    weight grad    dW = dYᵀ X   reduction over M: dY along M (dim 0),  X along M (dim 0)

so X, W and dY are each cast twice, always from the high-precision tensor (never by transposing an
already-quantized one: its blocks would run along the wrong axis). Master weights stay in their own dtype;
any GEMM switched off in the recipe runs in the compute dtype instead (the autocast dtype when autocast is
on, else the input's), as nn.Linear would. Bias is added in high precision.
"""

from __future__ import annotations

import torch
from torch import nn

from mxfp8train.recipe import PAPER_RECIPE, MXRecipe
from mxfp8train.stats import MXStats
from shared_kernels.backend import resolve_backend
from shared_kernels.mx_cast import mx_cast, mx_cast_rows_cols, mx_quantize_dequantize
from shared_kernels.mx_gemm import hardware_mx_available, mx_gemm


def _cast(
    t: torch.Tensor, elem: torch.dtype, dim: int, role: str, recipe: MXRecipe, stats: MXStats | None
) -> tuple[torch.Tensor, torch.Tensor]:
    data, scale = mx_cast(t, elem, recipe.block_size, recipe.scale_mode, dim, recipe.cast_backend)
    if stats is not None:
        stats.update(role, t, data, scale, recipe.block_size, dim)
    return data, scale


def _qdq_path(t: torch.Tensor, recipe: MXRecipe, stats: MXStats | None) -> bool:
    """True when a GEMM can take the fp32 MX round trip of its operands (`mx_quantize_dequantize`, the same
    values `mx_gemm`'s emulation dequantizes, faster on CPU): emulated GEMM, no stats to collect (they need
    the codes and scales), and the torch cast (the Triton cast is the faster path where it runs)."""
    emulated = recipe.gemm_backend == "emulated" or (
        recipe.gemm_backend == "auto" and not (hardware_mx_available(t.device) and recipe.block_size == 32)
    )
    return emulated and stats is None and resolve_backend(recipe.cast_backend, t.device) == "torch"


def _qdq(t: torch.Tensor, elem: torch.dtype, dim: int, recipe: MXRecipe) -> torch.Tensor:
    return mx_quantize_dequantize(t, elem, recipe.block_size, recipe.scale_mode, dim)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _cast_both(
    t: torch.Tensor, elem: torch.dtype, role: str, recipe: MXRecipe, stats: MXStats | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row (dim -1) and column (dim 0) casts of a 2-D tensor that feeds two MX GEMMs, from one read on the
    Triton backend (`mx_cast_rows_cols`); bit for bit the two separate casts."""
    rd, rs, cd, cs = mx_cast_rows_cols(t, elem, recipe.block_size, recipe.scale_mode, recipe.cast_backend)
    if stats is not None:
        stats.update(role, t, rd, rs, recipe.block_size, -1)
        stats.update(role, t, cd, cs, recipe.block_size, 0)
    return rd, rs, cd, cs


# an MX-cast operand: (codes, E8M0 scales), or (None, None) where it was not cast ahead
_Cast = tuple[torch.Tensor | None, torch.Tensor | None]


def _forward_casts(
    ctx, x: torch.Tensor, weight: torch.Tensor, recipe: MXRecipe, stats: MXStats | None, grad_enabled: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], _Cast, _Cast]:
    """Row casts of X and W for the forward GEMM, plus their column casts where a backward GEMM will need
    them (dW = dYᵀ X needs X blocked along M, dX = dY W needs W blocked along N): cast both ways at once.
    Returns (x_row, w_row, x_col, w_col)."""
    x_col: _Cast = (None, None)
    w_col: _Cast = (None, None)
    if grad_enabled and recipe.weight_grad and ctx.needs_input_grad[1]:
        xd, xs, xcd, xcs = _cast_both(x, recipe.input_dtype, "input", recipe, stats)
        x_row, x_col = (xd, xs), (xcd, xcs)
    else:
        x_row = _cast(x, recipe.input_dtype, -1, "input", recipe, stats)
    if grad_enabled and recipe.input_grad and ctx.needs_input_grad[0]:
        wd, ws, wcd, wcs = _cast_both(weight, recipe.weight_dtype, "weight", recipe, stats)
        w_row, w_col = (wd, ws), (wcd, wcs)
    else:
        w_row = _cast(weight, recipe.weight_dtype, -1, "weight", recipe, stats)
    return x_row, w_row, x_col, w_col


def _cast_if_missing(
    have: _Cast,
    t: torch.Tensor,
    elem: torch.dtype,
    dim: int,
    role: str,
    recipe: MXRecipe,
    stats: MXStats | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`have` when it was cast ahead (in forward, or dY both ways), else the cast of t along `dim`."""
    data, scale = have
    if data is None or scale is None:
        return _cast(t, elem, dim, role, recipe, stats)
    return data, scale


def _input_grad(
    ctx, dy: torch.Tensor, weight: torch.Tensor, dy_row: _Cast, w_col: _Cast, qdq: bool
) -> torch.Tensor:
    """dX = dY W (M, K): MX (dY along N, W along N), its fp32 round trip, or the compute dtype when the
    recipe leaves this GEMM out."""
    recipe, stats = ctx.recipe, ctx.stats
    if not recipe.input_grad:
        return (dy.to(ctx.out_dtype) @ weight.to(ctx.out_dtype)).to(ctx.x_dtype)
    if qdq:
        dy_q = _qdq(dy, recipe.grad_dtype, -1, recipe)
        return (dy_q @ _qdq(weight, recipe.weight_dtype, 0, recipe)).to(ctx.x_dtype)
    gd, gs = _cast_if_missing(dy_row, dy, recipe.grad_dtype, -1, "grad", recipe, stats)  # (M, N) along N
    wcd, wcs = _cast_if_missing(w_col, weight, recipe.weight_dtype, 0, "weight", recipe, stats)  # (N, K)
    return mx_gemm(gd, gs, wcd.t(), wcs.t(), recipe.block_size, ctx.x_dtype, recipe.gemm_backend)


def _weight_grad(
    ctx,
    dy: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    dy_col: _Cast,
    x_col: _Cast,
    qdq: bool,
) -> torch.Tensor:
    """dW = dYᵀ X (N, K): MX (dY along M, X along M), its fp32 round trip, or the compute dtype when the
    recipe leaves this GEMM out. x is None only when forward saved its column cast instead."""
    recipe, stats = ctx.recipe, ctx.stats
    xcd, xcs = x_col
    if recipe.weight_grad and not qdq:
        gd, gs = _cast_if_missing(dy_col, dy, recipe.grad_dtype, 0, "grad", recipe, stats)  # (M, N) along M
        if xcd is None or xcs is None:
            assert x is not None  # forward saves X whenever it saves no column cast of it
            xcd, xcs = _cast(x, recipe.input_dtype, 0, "input", recipe, stats)  # (M, K) along M
        return mx_gemm(gd.t(), gs.t(), xcd.t(), xcs.t(), recipe.block_size, weight.dtype, recipe.gemm_backend)
    assert x is not None  # no column cast of X is saved for these two paths
    if qdq and recipe.weight_grad:
        dy_q = _qdq(dy, recipe.grad_dtype, 0, recipe)
        return (dy_q.t() @ _qdq(x, recipe.input_dtype, 0, recipe)).to(weight.dtype)
    return (dy.to(ctx.out_dtype).t() @ x.to(ctx.out_dtype)).to(weight.dtype)


class _MXLinearFunction(torch.autograd.Function):
    """Y = X Wᵀ with MX forward, input-gradient and weight-gradient GEMMs (see the module docstring).

    On the cast path (codes and scales: hardware GEMMs, the Triton cast, or stats), a tensor needed along
    both of its dims is cast both ways at once: X and W in forward (their column casts are saved for the
    backward GEMMs instead of being recast there), dY in backward when both gradients are MX GEMMs."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        recipe: MXRecipe,
        stats: MXStats | None,
        out_dtype: torch.dtype,
        grad_enabled: bool,
    ) -> torch.Tensor:
        # x: (M, K), weight: (N, K) -> (M, N) in out_dtype; grad_enabled: grad mode at the call (under
        # no_grad needs_input_grad still follows requires_grad, and no backward will come)
        ctx.recipe, ctx.stats, ctx.out_dtype = recipe, stats, out_dtype
        ctx.x_dtype, ctx.device_type = x.dtype, x.device.type
        with torch.autocast(x.device.type, enabled=False):
            if not recipe.forward:
                ctx.save_for_backward(x, weight, None, None, None, None)
                return x.to(out_dtype) @ weight.to(out_dtype).t()
            if _qdq_path(x, recipe, stats):
                ctx.save_for_backward(x, weight, None, None, None, None)
                x_q = _qdq(x, recipe.input_dtype, -1, recipe)
                return (x_q @ _qdq(weight, recipe.weight_dtype, -1, recipe).t()).to(out_dtype)
            (xd, xs), (wd, ws), x_col, w_col = _forward_casts(ctx, x, weight, recipe, stats, grad_enabled)
            # with its column cast saved, X itself is not needed in backward
            ctx.save_for_backward(x if x_col[0] is None else None, weight, *x_col, *w_col)
            return mx_gemm(xd, xs, wd, ws, recipe.block_size, out_dtype, recipe.gemm_backend)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # dy: (M, N)
        x, weight, xcd, xcs, wcd, wcs = ctx.saved_tensors
        recipe, stats = ctx.recipe, ctx.stats
        qdq = _qdq_path(dy, recipe, stats)
        want_dx = ctx.needs_input_grad[0]
        want_dw = ctx.needs_input_grad[1]
        dx = dw = None
        with torch.autocast(ctx.device_type, enabled=False):
            dy_row: _Cast = (None, None)
            dy_col: _Cast = (None, None)
            if want_dx and want_dw and recipe.input_grad and recipe.weight_grad and not qdq:
                gd_row, gs_row, gd_col, gs_col = _cast_both(dy, recipe.grad_dtype, "grad", recipe, stats)
                dy_row, dy_col = (gd_row, gs_row), (gd_col, gs_col)
            if want_dx:
                dx = _input_grad(ctx, dy, weight, dy_row, (wcd, wcs), qdq)
            if want_dw:
                dw = _weight_grad(ctx, dy, x, weight, dy_col, (xcd, xcs), qdq)
        return dx, dw, None, None, None, None


def mx_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    recipe: MXRecipe = PAPER_RECIPE,
    stats: MXStats | None = None,
) -> torch.Tensor:
    """Functional MX linear: x Wᵀ + b with the recipe's MX GEMMs in forward and backward.

    Args:
        x: (..., in_features) float32 / bfloat16 / float16.
        weight: (out_features, in_features), the high-precision (master) weight.
        bias: (out_features,) or None, added in the output dtype.
        recipe: an `MXRecipe`; a partial last block along any reduction dim is zero-padded.
        stats: an `MXStats` to accumulate diagnostics into (skipped under torch.compile).
    Returns:
        (..., out_features) in the autocast dtype when autocast is on, else x.dtype.
    """
    if not isinstance(recipe, MXRecipe):
        raise TypeError(f"recipe must be an MXRecipe, got {type(recipe).__name__}")
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        k = weight.shape[-1] if weight.dim() == 2 else "?"
        raise ValueError(f"x (..., {k}) does not match weight {tuple(weight.shape)}: got x {tuple(x.shape)}")
    if torch.compiler.is_compiling():
        stats = None
    out_dtype = _compute_dtype(x)
    x2d = x.reshape(-1, x.shape[-1])
    y = _MXLinearFunction.apply(x2d, weight, recipe, stats, out_dtype, torch.is_grad_enabled())
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class MXLinear(nn.Linear):
    """nn.Linear whose GEMMs run in MX (see `mx_linear`). Parameters are plain tensors, so optimizers,
    state dicts, DDP and FSDP2 see an ordinary linear layer.

    Attributes:
        recipe: the `MXRecipe`.
        mx_stats: an `MXStats`, filled when `recipe.track_stats` is on.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        recipe: MXRecipe = PAPER_RECIPE,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        if not isinstance(recipe, MXRecipe):
            raise TypeError(f"recipe must be an MXRecipe, got {type(recipe).__name__}")
        self.recipe = recipe
        self.mx_stats = MXStats()

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: MXRecipe = PAPER_RECIPE) -> MXLinear:
        """An MXLinear sharing `linear`'s weight and bias Parameters (no copy; ties are kept)."""
        new = cls(
            linear.in_features, linear.out_features, linear.bias is not None, device="meta", recipe=recipe
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.mx_stats if self.recipe.track_stats else None
        return mx_linear(x, self.weight, self.bias, self.recipe, stats)

    def extra_repr(self) -> str:
        r = self.recipe
        gemms = "".join(
            c for c, on in zip("FIW", (r.forward, r.input_grad, r.weight_grad), strict=True) if on
        )
        names = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
        return (
            f"{super().extra_repr()}, mx={r.scale_mode}/{r.block_size}, x={names[r.input_dtype]}, "
            f"w={names[r.weight_dtype]}, dy={names[r.grad_dtype]}, gemms={gemms or 'none'}"
        )
