"""Linear layers on a frozen NF4 base: `Linear4bit` (no adapter) and `LoRALinear4bit`.

    y = x @ dequant(W)^T + bias + (alpha / r) * B(A(dropout(x)))

Outputs are in the input's dtype (bitsandbytes' and peft's convention): the base matmul runs in the compute
dtype, the adapter in the adapter dtype, and the sum is cast back to x.dtype.

The base path is an autograd.Function that keeps only a reference to the 4-bit weight for backward (never a
dequantized copy, never the input) and returns no gradient for it: dx = dy @ dequant(W) is recomputed from the
codes (on CPU into a reused per-thread scratch buffer: `shared_kernels.nf4_matmul`). A is
kaiming-uniform(a=sqrt(5)), B is zero, so at initialisation the layer equals the base.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nf4lora.weight import NF4Weight


class _NF4LinearFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T + bias, with W frozen. Saves nothing but the weight container."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, backend: str):
        ctx.weight = weight  # the 4-bit buffers only: bitsandbytes' MatMul4Bit keeps its state the same way
        ctx.backend = backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        y = weight.matmul(x, transpose_w=True, backend=backend, reuse_workspace=True)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.weight.matmul(grad_out, transpose_w=False, backend=ctx.backend, reuse_workspace=True)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


def nf4_linear(
    x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """x (..., in) @ dequant(W)^T (in, out) + bias -> (..., out), in x's dtype; W gets no gradient."""
    return _NF4LinearFunction.apply(x, weight, bias, backend)


class Linear4bit(nn.Module):
    """A frozen 4-bit linear layer: `weight` is an `NF4Weight` (NF4 or FP4), `bias` a frozen parameter or
    None. The output has the input's dtype; the matmul runs in `compute_dtype`.

    Args:
        weight: the (out_features, in_features) NF4 weight.
        bias: (out_features,) or None.
        compute_dtype: dtype of the matmul (inputs are cast to it); default: the weight's original dtype.
        backend: kernel backend for the base matmul ("auto", "torch", "triton").
    """

    def __init__(
        self,
        weight: NF4Weight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(
                f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
            )
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype or weight.dtype
        self.backend = backend

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        backend: str = "auto",
        quant_type: str = "nf4",
        quant_storage: torch.dtype = torch.uint8,
        **kwargs,
    ) -> Linear4bit:
        weight = NF4Weight.from_float(
            linear.weight,
            blocksize,
            double_quant,
            backend=backend,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )
        return cls(
            weight, linear.bias, compute_dtype=compute_dtype or linear.weight.dtype, backend=backend, **kwargs
        )

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen path in the compute dtype (the caller casts back to x.dtype)."""
        return nf4_linear(x.to(self.compute_dtype), self.weight, self.bias, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class LoRALinear4bit(Linear4bit):
    """`Linear4bit` + a LoRA adapter: `lora_A` (r, in) kaiming-uniform(a=sqrt(5)), `lora_B` (out, r) zeros,
    scaling alpha / r (alpha / sqrt(r) with `use_rslora`). Parameter names match peft's saved adapters
    (`<module>.lora_A.weight`, `<module>.lora_B.weight`).

    Args:
        weight, bias, compute_dtype, backend: as for `Linear4bit`.
        r: adapter rank (> 0). alpha: LoRA alpha. dropout: dropout on the adapter input.
        adapter_dtype: dtype of A and B (default float32, QLoRA keeps adapters in higher precision).
    """

    def __init__(
        self,
        weight: NF4Weight,
        bias: torch.Tensor | None = None,
        *,
        r: int = 64,
        alpha: float = 16,
        dropout: float = 0.05,
        use_rslora: bool = False,
        compute_dtype: torch.dtype | None = None,
        adapter_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ) -> None:
        super().__init__(weight, bias, compute_dtype=compute_dtype, backend=backend)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = weight.packed.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()
        self.merged = False

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A: (out, in) in the adapter dtype."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the 4-bit base as peft does for bitsandbytes layers:
        W <- quantize(dequantize(W) + scaling * B @ A) with the same quant type, block size, double
        quantization and storage; forward then skips the adapter. Lossy (the sum is rounded to 4 bits again,
        so small adapter updates may vanish); `nf4lora.merge_and_unload` is the exact dense export."""
        if self.merged:
            raise ValueError("the adapter is already merged")
        self.weight = self.weight.requantized(
            self.weight.dequantize(torch.float32) + self.delta_weight().float()
        )
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` as peft does: W <- quantize(dequantize(W) - scaling * B @ A) (lossy again)."""
        if not self.merged:
            raise ValueError("the adapter is not merged")
        self.weight = self.weight.requantized(
            self.weight.dequantize(torch.float32) - self.delta_weight().float()
        )
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_forward(x).to(x.dtype)
        y = self.base_forward(x)
        a = self.lora_A.weight
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        return (y + (self.scaling * lora).to(y.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"
