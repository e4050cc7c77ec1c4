"""prepare_model with peft's meanings: modules_to_save (a classification head) trained dense and round-tripped
through peft.PeftModel.from_pretrained, task heads kept dense by default, adapter_dtype, no global RNG
change."""

from __future__ import annotations

import pytest
import torch

import nf4lora
from nf4lora.lora import Linear4bit, LoRALinear4bit
from nf4lora.model import load_adapter, lora_modules, prepare_model, save_adapter


def _classifier(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


def test_task_head_is_kept_dense_and_frozen_by_default():
    model = prepare_model(_classifier(), r=4, dropout=0.0, gradient_checkpointing=False)
    assert type(model.score) is torch.nn.Linear and not model.score.weight.requires_grad
    assert isinstance(model.model.layers[0].mlp.down_proj, LoRALinear4bit)
    model = prepare_model(_classifier(), r=4, dropout=0.0, gradient_checkpointing=False, skip=())
    assert isinstance(model.score, LoRALinear4bit)  # skip=() quantizes the head too, as before


def test_modules_to_save_round_trip_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = prepare_model(
        _classifier(),
        r=4,
        alpha=8,
        dropout=0.0,
        modules_to_save=["score"],
        gradient_checkpointing=False,
        target_modules=["q_proj", "v_proj"],
    )
    assert type(model.score) is torch.nn.Linear and model.score.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all("lora_" in n or n == "score.weight" for n in trainable)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
        model.score.weight.add_(torch.randn(model.score.weight.shape, generator=g))
    save_adapter(model, tmp_path / "adapter", task_type="SEQ_CLS")
    ids = torch.randint(1, 50, (2, 7), generator=g)
    with torch.no_grad():
        ours = model(ids).logits

    # peft reads it: the trained head and the LoRA tensors arrive unchanged on a dense base
    peft_model = peft.PeftModel.from_pretrained(_classifier(), tmp_path / "adapter").eval()
    peft_params = dict(peft_model.named_parameters())
    head = peft_params["base_model.model.score.modules_to_save.default.weight"]
    assert torch.equal(head, model.score.weight.detach())
    a = peft_params["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert torch.equal(a, model.model.layers[0].self_attn.q_proj.lora_A.weight.detach())
    # and back into ours: same logits bit for bit
    again = load_adapter(_classifier(), tmp_path / "adapter", gradient_checkpointing=False)
    assert type(again.score) is torch.nn.Linear and again.score.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours)
    # a peft-saved adapter with modules_to_save loads into ours as well
    peft_model.save_pretrained(tmp_path / "from_peft")
    third = load_adapter(_classifier(), tmp_path / "from_peft", gradient_checkpointing=False)
    assert torch.equal(third.score.weight, model.score.weight)
    with pytest.raises(ValueError, match="modules_to_save .* match no module"):
        prepare_model(_classifier(), r=2, modules_to_save=["nope"])


def test_adapter_dtype_and_global_rng_untouched():
    model = _classifier()
    state = torch.random.get_rng_state()
    prepare_model(
        model, r=4, dropout=0.0, seed=123, adapter_dtype=torch.bfloat16, gradient_checkpointing=False
    )
    assert torch.equal(torch.random.get_rng_state(), state)  # neither the seed nor the init moved it
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.bfloat16 and layer.lora_B.weight.dtype == torch.bfloat16
    other = prepare_model(_classifier(), r=4, dropout=0.0, seed=123, gradient_checkpointing=False)
    assert torch.equal(other.model.layers[0].self_attn.q_proj.lora_A.weight.bfloat16(), layer.lora_A.weight)
    x = torch.randint(1, 50, (1, 5))
    with torch.no_grad():
        assert model(x).logits.dtype == torch.float32
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
    assert nf4lora.prepare_model is prepare_model


def test_gpt2_conv1d_layers_are_quantized_transposed():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=64, n_layer=1, n_head=2)).eval()
    dense_attn = model.transformer.h[0].attn.c_attn
    w, b = dense_attn.weight.detach().clone(), dense_attn.bias.detach().clone()  # (in 64, out 192)
    ids = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(1))
    prepare_model(model, r=4, dropout=0.0, gradient_checkpointing=False, target_modules=["c_attn", "c_fc"])
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, LoRALinear4bit) and attn.weight.shape == (192, 64)
    assert isinstance(model.transformer.h[0].mlp.c_proj, Linear4bit)
    x = torch.randn(3, 64)
    expected = x @ nf4lora.NF4Weight.from_float(w.t()).dequantize().t() + b
    assert torch.equal(attn(x), expected)  # LoRA B is zero at init
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
