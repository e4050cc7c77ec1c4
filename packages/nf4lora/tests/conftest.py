"""Fixtures for nf4lora's tests."""

from __future__ import annotations

import pytest
from torch import nn


@pytest.fixture
def bnb_fp32_cpu():
    """A function that makes a model's bitsandbytes `Linear4bit` layers compute as the test asks: on CPUs with
    AVX512-BF16, bitsandbytes (0.50) repacks the weight at the first eval/no-grad forward and multiplies in
    bf16, whatever `bnb_4bit_compute_dtype` says (logits off by ~3e-3). Exact comparisons turn that off."""

    def disable_bf16_repacking(model: nn.Module) -> nn.Module:
        import bitsandbytes as bnb

        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
        return model

    return disable_bf16_repacking
