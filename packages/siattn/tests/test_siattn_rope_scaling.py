"""NTK-aware RoPE and YaRN at evaluation (`siattn.rope_scaling`, used by both length studies)."""

import math

import pytest
import torch

from siattn import rope_frequencies
from siattn.models import GPT, GPTConfig
from siattn.rope_scaling import ntk_base, q_gains, rescale_rope, yarn_frequencies


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    inv = rope_frequencies(16, 1e4)
    yarn = yarn_frequencies(inv, 128, 16.0)
    ratio = 128 * inv / (2 * torch.pi)
    assert torch.equal(yarn[ratio > 32], inv[ratio > 32])
    torch.testing.assert_close(yarn[ratio < 1], inv[ratio < 1] / 16)
    assert ntk_base(1e4, 16, 1.0) == 1e4 and ntk_base(1e4, 16, 4.0) > 4e4


def test_rescale_rope_sets_frequencies_and_yarn_gain_and_is_the_identity_at_one():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=19, n_layer=2, d_model=24, n_head=2, position="rope", rope_base=300.0))
    for block in model.layers:  # trained-looking q gains, so the YaRN scaling is visible
        torch.nn.init.uniform_(block.attn.q_norm.weight, 0.5, 1.5)
    tokens = torch.randint(0, 19, (2, 37))
    with torch.no_grad():
        before = model(tokens)
    gains = q_gains(model)
    rescale_rope(model, "rope+ntk", 8, gains)
    torch.testing.assert_close(model.layers[1].attn.inv_freq, rope_frequencies(12, ntk_base(300.0, 12, 8.0)))
    assert torch.equal(model.layers[1].attn.q_norm.weight, gains[1])
    rescale_rope(model, "rope+yarn", 8, gains)
    torch.testing.assert_close(
        model.layers[0].attn.inv_freq, yarn_frequencies(rope_frequencies(12, 300.0), 128, 8)
    )
    torch.testing.assert_close(model.layers[0].attn.q_norm.weight, gains[0] * (0.1 * math.log(8) + 1) ** 2)
    with torch.no_grad():
        assert not torch.allclose(model(tokens), before)
        rescale_rope(model, "rope+yarn", 1, gains)
        assert torch.equal(model(tokens), before)


def test_rescale_rope_rejects_other_variants_and_positions():
    model = GPT(GPTConfig(vocab_size=7, n_layer=1, d_model=8, n_head=2, position="p-rope"))
    with pytest.raises(ValueError, match="position"):
        rescale_rope(model, "rope+ntk", 4, q_gains(model))
    with pytest.raises(ValueError, match="variant"):
        rescale_rope(model, "rope+pi", 4, q_gains(model))
    with pytest.raises(ValueError, match="QK-norm"):
        q_gains(GPT(GPTConfig(vocab_size=7, n_layer=1, d_model=8, n_head=2, position="rope", qk_norm=False)))
