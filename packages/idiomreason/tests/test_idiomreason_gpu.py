"""The transformers backend on CUDA: bf16 and 4-bit (bitsandbytes NF4) loading, batched generation."""

from __future__ import annotations

import pytest

from idiomreason.examples import Example
from idiomreason.prompts import build_prompt, get_template

pytestmark = pytest.mark.gpu


def _prompts(n):
    template = get_template("direct")
    return [
        build_prompt(
            template,
            Example(
                id=str(i),
                language="en",
                expression="spill the beans",
                target=f"He spilled the beans {i} times.",
                label="idiomatic",
            ),
            reasoning=True,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_cuda_generation(tiny_lm_dir, quantization):
    import torch

    from idiomreason.backends.hf import TransformersBackend

    backend = TransformersBackend(str(tiny_lm_dir), dtype="bfloat16", quantization=quantization, batch_size=3)
    assert next(backend.model.parameters()).device.type == "cuda"
    if quantization == "4bit":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in backend.model.modules())
    else:
        assert backend.model.dtype == torch.bfloat16
    out = dict(backend.generate(_prompts(7), max_new_tokens=6))
    assert sorted(out) == list(range(7))
    assert all(1 <= g.n_tokens <= 6 and g.finish_reason in ("stop", "length") for g in out.values())
    backend.close()


def test_vllm_offline_generation(tiny_lm_dir):
    """The vLLM backend (GPU machines with vLLM installed; it is not a dependency): every prompt answered
    once, token accounting and finish reasons sane, greedy decoding deterministic across calls."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm on a CUDA machine)")
    from idiomreason.backends.vllm_offline import VLLMBackend

    backend = VLLMBackend(
        str(tiny_lm_dir),
        dtype="bfloat16",
        chunk_size=3,
        gpu_memory_utilization=0.3,
        max_model_len=512,
        enforce_eager=True,
    )
    first = dict(backend.generate(_prompts(7), max_new_tokens=6))
    again = dict(backend.generate(_prompts(7), max_new_tokens=6))
    backend.close()
    assert sorted(first) == list(range(7))
    assert all(1 <= g.n_tokens <= 6 and g.finish_reason in ("stop", "length") for g in first.values())
    assert [first[i].text for i in range(7)] == [again[i].text for i in range(7)]
