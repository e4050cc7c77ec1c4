"""The symmetric absmax Int4 baseline of `nf4lora-study`: round trips on constructed values."""

from __future__ import annotations

import pytest
import torch

from nf4lora.int4 import dequantize_int4, quantize_int4


def _grid_values(n_blocks: int, blocksize: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks whose values are k * absmax / 7 for integers k in [-7, 7], each block holding +-7 once."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-7, 8, (n_blocks, blocksize), generator=g)
    k[:, 0] = torch.where(torch.rand(n_blocks, generator=g) < 0.5, -7, 7)  # the block's absmax
    absmax = torch.rand(n_blocks, generator=g) * 10 + 0.1
    return k, absmax, k * (absmax / 7).unsqueeze(1)


@pytest.mark.parametrize("blocksize", [64, 128])
def test_values_on_the_grid_round_trip_exactly(blocksize):
    k, absmax, x = _grid_values(5, blocksize, seed=blocksize)
    packed, got_absmax = quantize_int4(
        x.reshape(-1)[: 5 * blocksize - 3].view(-1), blocksize
    )  # partial block
    torch.testing.assert_close(got_absmax[:4], absmax[:4], rtol=1e-6, atol=0)
    flat = x.reshape(-1)[: 5 * blocksize - 3]
    back = dequantize_int4(packed, got_absmax, (flat.numel(),), blocksize)
    torch.testing.assert_close(back, flat, rtol=1e-6, atol=0)
    # nibble = k + 8, element 2i in the high nibble; odd count padded with the code of 0.0 (8)
    codes = (k.reshape(-1)[: flat.numel()] + 8).tolist() + [8]
    assert packed.tolist() == [codes[i] << 4 | codes[i + 1] for i in range(0, len(codes), 2)]


def test_off_grid_values_round_to_the_nearest_level_ties_to_even():
    s = 0.5  # absmax 3.5 -> step 0.5
    fractions = torch.tensor([0.3, 0.7, 1.5, 2.5, -0.3, -2.6, 6.4, -6.9])
    x = torch.cat([torch.tensor([7.0]), fractions, torch.zeros(64 - 9)]) * s
    packed, absmax = quantize_int4(x, 64)
    back = dequantize_int4(packed, absmax, (64,), 64)
    expected = torch.cat([torch.tensor([7.0, 0, 1, 2, 2, -0.0, -3, 6, -7]), torch.zeros(64 - 9)]) * s
    torch.testing.assert_close(back, expected, rtol=0, atol=1e-7)


def test_zero_block_dtypes_shape_and_errors():
    x = torch.randn(3, 97, dtype=torch.bfloat16)
    x[0, :64] = 0
    packed, absmax = quantize_int4(x, 64)
    assert absmax[0] == 0 and packed.numel() == (3 * 97 + 1) // 2
    back = dequantize_int4(packed, absmax, (3, 97), 64, dtype=torch.bfloat16)
    assert back.shape == (3, 97) and back.dtype == torch.bfloat16
    assert torch.equal(back[0, :64], torch.zeros(64, dtype=torch.bfloat16))
    err = (back.float() - x.float()).abs().reshape(-1)
    bound = torch.repeat_interleave(absmax / 14, 64)[: err.numel()] * 1.01 + 0.01  # half a step (+ bf16)
    assert (err <= bound).all()
    with pytest.raises(ValueError, match="blocksize"):
        quantize_int4(x, 100)
    with pytest.raises(ValueError, match="float"):
        quantize_int4(torch.ones(8, dtype=torch.int32), 64)
    with pytest.raises(ValueError, match="finite"):
        quantize_int4(torch.tensor([1.0, float("nan")]), 64)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_int4(packed, absmax[:1], (3, 97), 64)
