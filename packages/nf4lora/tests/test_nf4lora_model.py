"""prepare_model on a tiny Llama: structure, peft-format adapters both ways, and training lowers the loss."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nf4lora.lora import Linear4bit, LoRALinear4bit
from nf4lora.model import load_adapter, lora_modules, merge_and_unload, prepare_model, save_adapter


def _tiny(tiny_tokenizer, **kw):
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    return tiny_causal_lm(tokenizer=tiny_tokenizer, **kw)


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_prepare_model_structure(tiny_tokenizer):
    model = _tiny(tiny_tokenizer)
    prepare_model(model, r=4, alpha=8, dropout=0.0)
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and ".lora_" not in n]
    assert linears == ["lm_head"]  # every other linear is 4-bit
    assert len(lora_modules(model)) == 2 * 7  # q,k,v,o,gate,up,down per layer
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert model.model.norm.weight.dtype == torch.float32
    assert model.is_activation_checkpointing
    assert model.nf4lora_settings.target_modules == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    with pytest.raises(ValueError, match="already prepared"):
        prepare_model(model)


def test_bf16_model_trains_with_fp32_norms(tiny_tokenizer):
    model = prepare_model(_tiny(tiny_tokenizer, dtype=torch.bfloat16), r=4, dropout=0.0)
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 100, (2, 8))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)  # fp32 adapters
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_target_modules_subset_quantizes_the_rest(tiny_tokenizer):
    model = _tiny(tiny_tokenizer)
    prepare_model(model, r=2, target_modules=["q_proj", "v_proj"])
    kinds = {n.rsplit(".", 1)[-1]: type(m) for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert kinds["q_proj"] is LoRALinear4bit and kinds["v_proj"] is LoRALinear4bit
    assert kinds["k_proj"] is Linear4bit and kinds["down_proj"] is Linear4bit
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        prepare_model(_tiny(tiny_tokenizer), target_modules=["nope"])


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_adapter_loads_in_peft_on_bitsandbytes_4bit_base_with_identical_logits(
    tiny_tokenizer, tmp_path, quant_type, bnb_fp32_cpu
):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    base_dir = tmp_path / "base"
    model = tiny_causal_lm(save_dir=base_dir, tokenizer=tiny_tokenizer)
    prepare_model(model, r=4, alpha=8, dropout=0.0, quant_type=quant_type)
    _randomize_adapters(model)
    model.eval()
    save_adapter(model, tmp_path / "adapter", str(base_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8

    ids = torch.randint(0, len(tiny_tokenizer), (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    bnb_model = bnb_fp32_cpu(
        AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=qconfig, device_map="cpu")
    )
    peft_model = peft.PeftModel.from_pretrained(bnb_model, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    # Same NF4 bytes, same adapters: bitsandbytes + peft computes the very same logits.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_load_peft_trained_adapter_back(tiny_tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    dense = _tiny(tiny_tokenizer)
    peft_model = peft.get_peft_model(
        dense, peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "down_proj"])
    )
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(std=0.1)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))

    ours = load_adapter(_tiny(tiny_tokenizer), tmp_path / "peft-adapter", double_quant=False).eval()
    assert ours.nf4lora_settings.target_modules == ["down_proj", "q_proj"]
    with torch.no_grad():
        ours_logits = ours(ids).logits
    # Reference: peft itself on a dense base holding the NF4 round-trip of the same weights.
    from nf4lora.weight import NF4Weight

    reference = _tiny(tiny_tokenizer)
    for name, m in reference.named_modules():
        if type(m) is torch.nn.Linear and name != "lm_head":
            with torch.no_grad():
                m.weight.copy_(NF4Weight.from_float(m.weight, 64, double_quant=False).dequantize())
    base_logits = reference(ids).logits.detach()
    reference = peft.PeftModel.from_pretrained(reference, tmp_path / "peft-adapter").eval()
    with torch.no_grad():
        ref_logits = reference(ids).logits
    assert float((ref_logits - base_logits).abs().max()) > 1e-2  # the adapter matters
    torch.testing.assert_close(ours_logits, ref_logits, rtol=1e-5, atol=1e-5)
    merged = merge_and_unload(ours)
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, ours_logits, rtol=1e-4, atol=1e-4)


def test_load_adapter_rejects_mismatch(tiny_tokenizer, tmp_path):
    model = prepare_model(_tiny(tiny_tokenizer), r=4, dropout=0.0)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="different r"):
        load_adapter(prepare_model(_tiny(tiny_tokenizer), r=2, dropout=0.0), tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(_tiny(tiny_tokenizer), tmp_path / "a")
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        load_adapter(_tiny(tiny_tokenizer), tmp_path)


def test_tiny_llama_training_lowers_loss(tiny_tokenizer):
    # One intra-op thread: on a loaded 2-core machine the second thread's barrier waits made each of these
    # tiny matmuls take ~40 ms (16 steps: 63-94 s); with one thread 10 steps take ~3 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = prepare_model(_tiny(tiny_tokenizer, seed=0), r=8, alpha=16, dropout=0.05, seed=0)
        model.train()
        text = "The quick brown fox jumps over the lazy dog. " * 4
        ids = torch.tensor([tiny_tokenizer(text)["input_ids"][:32]] * 2)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(10):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # 6.22, 6.00, 5.82 ... 5.19, 5.17, 5.14 (0.86x)


def test_norms_in_fp32_by_type_not_by_class_name():
    """A non-norm named "...Norm..." stays bf16; norms whose names lack "Norm" (a LayerNorm subclass, a
    registered class, transformers' LlamaRMSNorm) are upcast; their outputs keep the input dtype."""
    from nf4lora.model import is_norm, norm_types, register_norm_type
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    class NormalizedScale(nn.Module):  # not a norm: a learned scale
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    class Ln(nn.LayerNorm):
        pass

    class RootMeanSquare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    register_norm_type(RootMeanSquare)
    model = nn.Sequential(nn.Linear(32, 32), NormalizedScale(), Ln(32), RootMeanSquare(), nn.Linear(32, 32))
    model.to(torch.bfloat16)
    assert not is_norm(model[1]) and is_norm(model[2]) and RootMeanSquare in norm_types()
    prepare_model(model, r=2, dropout=0.0, gradient_checkpointing=False)
    assert model[1].scale.dtype == torch.bfloat16
    assert model[2].weight.dtype == model[2].bias.dtype == model[3].weight.dtype == torch.float32
    assert model(torch.randn(3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="register_norm_type"):
        register_norm_type(len)

    llama = tiny_causal_lm(dtype=torch.bfloat16)
    prepare_model(llama, r=2, dropout=0.0)
    assert llama.model.norm.weight.dtype == torch.float32
    assert llama.model.embed_tokens.weight.dtype == torch.bfloat16
