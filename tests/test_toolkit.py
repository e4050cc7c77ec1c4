"""The shared testing toolkit: tiny LM + tokenizer round-trip, train a few steps, generate; tolerances."""

from __future__ import annotations

import pytest
import torch

from shared_kernels.testing import assert_error_ratio, assert_exact, assert_sqnr, sqnr_db
from shared_kernels.testing.tiny_lm import tiny_causal_lm


def test_chat_template_and_roundtrip(tiny_tokenizer):
    text = "She spilled the beans. Relevance Label: 2 ##"
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tiny_lm_saves_loads_trains_and_generates(tmp_path, tiny_tokenizer, family):
    model = tiny_causal_lm(save_dir=tmp_path / family, tokenizer=tiny_tokenizer, family=family)
    reloaded = tiny_causal_lm(tokenizer=tiny_tokenizer, family=family)  # same seed, built in memory
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert (tmp_path / family / "model.safetensors").exists()

    batch = tiny_tokenizer(["the quick brown fox jumps over the lazy dog"] * 4, return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(12):
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0]

    model.eval()
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "the quick"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 5 or int(gen[0, -1]) == tiny_tokenizer.eos_token_id


def test_tolerance_helpers_fail_when_they_should():
    x = torch.randn(97, 33)
    assert_exact(x.clone(), x)
    with pytest.raises(AssertionError, match="differ"):
        assert_exact(x + (x == x.max()) * 1e-3, x)
    with pytest.raises(AssertionError, match="differ"):
        assert_exact(torch.tensor([-0.0]), torch.tensor([0.0]))
    q = x.to(torch.bfloat16).float()
    assert 45 < sqnr_db(x, q) < 60
    with pytest.raises(AssertionError, match="SQNR"):
        assert_sqnr(x, q, min_db=70)
    ref = x.double() @ x.double().T
    plain = x @ x.T
    assert_error_ratio(plain, plain, ref)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_error_ratio(plain.half().float(), plain, ref)
