"""The 4-bit weight container: storage accounting and conversion to/from bitsandbytes without
re-quantizing."""

from __future__ import annotations

import pytest
import torch

from nf4lora.weight import NF4Weight
from shared_kernels.testing import assert_exact


def test_bits_per_param_exact_with_double_quant_at_blocksize_64():
    w = NF4Weight.from_float(torch.randn(256, 128), blocksize=64, double_quant=True)  # 2 * 64 * 256 elements
    assert w.bits_per_param == 4.126953125
    assert w.bits_per_param == 4 + 8 / 64 + 32 / (64 * 256)
    plain = NF4Weight.from_float(torch.randn(256, 128), blocksize=64, double_quant=False)
    assert plain.bits_per_param == 4.5
    # nbytes counts everything stored: codes, 8-bit constants, second-level constants, offset, 256-entry code.
    assert w.nbytes == 256 * 128 // 2 + 512 + 2 * 4 + 4 + 256 * 4
    assert plain.nbytes == 256 * 128 // 2 + 512 * 4


def test_dequantize_round_trip_quality_and_dtype():
    x = torch.randn(97, 130, dtype=torch.bfloat16)
    w = NF4Weight.from_float(x, blocksize=64, double_quant=True)
    y = w.dequantize()
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    rel = float((y.float() - x.float()).norm() / x.float().norm())
    assert rel < 0.12  # NF4: ~10% relative error on Gaussian weights


def test_bad_container_arguments():
    packed = torch.zeros(10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="packed must be uint8 with 5 elements"):
        NF4Weight(packed, torch.ones(1), (10,), torch.float32)
    with pytest.raises(ValueError, match="absmax must hold 1 values"):
        NF4Weight(torch.zeros(5, dtype=torch.uint8), torch.ones(2), (10,), torch.float32)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        NF4Weight(torch.zeros(5, dtype=torch.uint8), torch.ones(1), (10,), torch.float32, blocksize=100)
    with pytest.raises(ValueError, match="absmax2 and offset are required"):
        NF4Weight(torch.zeros(5, dtype=torch.uint8), torch.ones(1, dtype=torch.uint8), (10,), torch.float32)


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("double_quant", (False, True))
def test_bitsandbytes_params4bit_round_trip_shares_bytes(double_quant, quant_type):
    bnb = pytest.importorskip("bitsandbytes")
    from nf4lora.interop import from_bnb, to_bnb_params4bit

    x = torch.randn(48, 97)
    ours = NF4Weight.from_float(x, 64, double_quant, quant_type=quant_type)
    param = to_bnb_params4bit(ours)
    assert param.quant_type == quant_type and param.quant_state.quant_type == quant_type
    assert param.data_ptr() == ours.packed.data_ptr()  # no copy, no re-quantization
    expected = bnb.functional.dequantize_4bit(param.data, param.quant_state)
    assert_exact(ours.dequantize(), expected, "bitsandbytes dequantize of our bytes")
    # bitsandbytes-quantized -> ours
    q, state = bnb.functional.quantize_4bit(
        x, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    back = from_bnb(q, state)
    assert back.quant_type == quant_type
    assert_exact(back.packed, ours.packed, "packed")
    assert_exact(back.absmax, ours.absmax, "absmax")
    assert_exact(back.dequantize(), bnb.functional.dequantize_4bit(q, state), "dequantize")
    with pytest.raises(ValueError, match="quant_state is required"):
        from_bnb(q)


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_bitsandbytes_serialized_form_round_trip(quant_type):
    pytest.importorskip("bitsandbytes")
    from nf4lora.interop import bnb_serialized, from_bnb_serialized

    w = NF4Weight.from_float(torch.randn(33, 64), 64, True, quant_type=quant_type)
    tensors = bnb_serialized(w, "layer.weight")
    assert {
        "layer.weight",
        "layer.weight.absmax",
        "layer.weight.nested_absmax",
        f"layer.weight.quant_state.bitsandbytes__{quant_type}",
    } <= set(tensors)
    back = from_bnb_serialized(tensors, "layer.weight")
    assert back.quant_type == quant_type
    assert_exact(back.dequantize(), w.dequantize(), "dequantize after serialization")
    assert back.shape == w.shape and back.dtype == w.dtype


@pytest.mark.parametrize("storage", (torch.bfloat16, torch.float32))
def test_float_quant_storage_round_trips_through_bitsandbytes_and_survives_dtype_casts(storage):
    bnb = pytest.importorskip("bitsandbytes")
    from nf4lora.interop import from_bnb, to_bnb_params4bit

    x = torch.randn(40, 64)  # 1280 bytes: whole bf16 and fp32 elements, as bitsandbytes needs
    ours = NF4Weight.from_float(x, 64, True, quant_storage=storage)
    plain = NF4Weight.from_float(x, 64, True)
    assert ours.packed.dtype == storage and not ours.packed.requires_grad
    assert_exact(ours.packed_bytes(), plain.packed_bytes(), "same bytes in another storage dtype")
    param = to_bnb_params4bit(ours)
    assert param.dtype == storage and param.quant_storage == storage
    assert_exact(
        bnb.functional.dequantize_4bit(param.data, param.quant_state), plain.dequantize(), "bnb reads it"
    )
    q, state = bnb.functional.quantize_4bit(
        x, blocksize=64, quant_type="nf4", compress_statistics=True, quant_storage=storage
    )
    back = from_bnb(q, state)
    assert back.quant_storage == storage
    assert_exact(back.packed_bytes(), plain.packed_bytes(), "bnb's float-stored bytes")
    # model.to(dtype) / .half() move the weight but never convert its bytes or constants
    module = torch.nn.ModuleDict({"w": ours}).to(torch.float16)
    assert module["w"].packed.dtype == storage and module["w"].absmax.dtype == torch.uint8
    assert module["w"].absmax2.dtype == torch.float32
    assert_exact(module["w"].dequantize(), plain.dequantize(), "after .to(float16)")
    y = torch.randn(3, 3)  # 5 bytes: zero-padded to whole storage elements
    odd = NF4Weight.from_float(y, 64, False, quant_storage=storage)
    itemsize = odd.packed.element_size()
    assert odd.packed.numel() * itemsize == -(-5 // itemsize) * itemsize and odd.n_bytes == 5
    assert_exact(odd.dequantize(), NF4Weight.from_float(y, 64, False).dequantize(), "padded storage")
