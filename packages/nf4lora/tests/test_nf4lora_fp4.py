"""bitsandbytes conventions at the package surface: `quantize_4bit` / `dequantize_4bit` byte-equal with
bitsandbytes.functional for NF4 and FP4, and layer outputs in the input's dtype for every input/compute
pair."""

from __future__ import annotations

import itertools

import pytest
import torch

import nf4lora
from nf4lora.lora import Linear4bit, LoRALinear4bit
from nf4lora.weight import NF4Weight
from shared_kernels.testing import assert_exact

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_package_quantize_4bit_and_dequantize_4bit_equal_bitsandbytes(quant_type):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    for shape, blocksize in (((37, 29), 64), ((6, 130), 128)):  # odd count, partial last blocks
        x = torch.randn(shape, generator=torch.Generator().manual_seed(blocksize)) * 3
        x[0, :5] = 0.0
        packed, absmax = nf4lora.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        q, state = bnbf.quantize_4bit(
            x, blocksize=blocksize, quant_type=quant_type, compress_statistics=False
        )
        assert_exact(packed, q.reshape(-1), f"{quant_type} packed {shape}")
        assert_exact(absmax, state.absmax, f"{quant_type} absmax {shape}")
        for dtype in DTYPES:
            state.dtype = dtype
            with torch._dynamo.config.patch(disable=True):
                expected = bnbf.dequantize_4bit(q, state)
            got = nf4lora.dequantize_4bit(
                packed, absmax, shape, blocksize=blocksize, dtype=dtype, quant_type=quant_type
            )
            assert_exact(got, expected + 0.0, f"{quant_type} dequantize -> {dtype}")  # FP4: -0.0 -> +0.0


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_outputs_are_in_the_input_dtype_for_every_input_compute_pair(quant_type):
    # bitsandbytes' Linear4bit and peft's LoRA layers return the input's dtype whatever the compute dtype.
    torch.manual_seed(0)
    linear = torch.nn.Linear(72, 33)
    weight = NF4Weight.from_float(linear.weight, 64, double_quant=True, quant_type=quant_type)
    for in_dtype, compute_dtype in itertools.product(DTYPES, DTYPES):
        x = torch.randn(3, 72).to(in_dtype)
        base = Linear4bit(weight, linear.bias, compute_dtype=compute_dtype, backend="torch")
        w = weight.dequantize(compute_dtype, backend="torch")
        # the base adds the bias after the matmul (two roundings in 16-bit, as bitsandbytes' matmul_4bit)
        base_cd = x.to(compute_dtype) @ w.t() + linear.bias.detach().to(compute_dtype)
        expected = base_cd.to(in_dtype)
        y = base(x)
        assert y.dtype == in_dtype, (in_dtype, compute_dtype)
        assert_exact(y, expected, f"base {in_dtype} / {compute_dtype}")
        lora = LoRALinear4bit(
            weight, linear.bias, r=4, dropout=0.0, compute_dtype=compute_dtype, backend="torch"
        )
        torch.nn.init.normal_(lora.lora_B.weight, std=0.1)
        y = lora(x)
        assert y.dtype == in_dtype, (in_dtype, compute_dtype)
        delta = (lora.scaling * lora.lora_B(lora.lora_A(x.float()))).to(compute_dtype)
        assert_exact(y, (base_cd + delta).to(in_dtype), f"LoRA {in_dtype} / {compute_dtype}")
        lora.merge()
        assert lora(x).dtype == in_dtype
