"""`nf4lora quantize` writes bitsandbytes' format: it loads again in ours and in transformers +
bitsandbytes."""

from __future__ import annotations

import pytest
import torch

from nf4lora.cli import main
from nf4lora.lora import Linear4bit
from nf4lora.model import quantize_model
from nf4lora.serialize import load_quantized


def test_quantize_and_report_cli_round_trip(tiny_lm_dir, tmp_path, capsys, bnb_fp32_cpu):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "nf4"
    assert main(["quantize", str(tiny_lm_dir), str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4-bit checkpoint" in printed and "base_codes" in printed and "QLoRA estimate" in printed

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = quantize_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir))
    ours = load_quantized(out)
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == 14
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.equal(ours(ids).logits, expected)
        bnb_model = bnb_fp32_cpu(
            AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
        )  # transformers + bitsandbytes
        assert type(bnb_model.model.layers[0].mlp.down_proj).__module__.startswith("bitsandbytes")
        torch.testing.assert_close(bnb_model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_fp4_checkpoint_round_trip_through_transformers_and_bitsandbytes(tiny_lm_dir, tmp_path, bnb_fp32_cpu):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fp4"
    assert main(["quantize", str(tiny_lm_dir), str(out), "--quant-type", "fp4"]) == 0
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    reference = quantize_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), quant_type="fp4")
    ours = load_quantized(out)
    assert {m.weight.quant_type for m in ours.modules() if isinstance(m, Linear4bit)} == {"fp4"}
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.equal(ours(ids).logits, expected)
        bnb_model = bnb_fp32_cpu(AutoModelForCausalLM.from_pretrained(out, device_map="cpu"))
        assert bnb_model.model.layers[0].mlp.down_proj.weight.quant_state.quant_type == "fp4"
        torch.testing.assert_close(bnb_model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_cli_rejects_a_path_without_config(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip() == f"nf4lora report: error: MODEL_PATH has no config.json: {tmp_path}"
    )
