"""The public API: everything the README's API table lists imports from `nf4lora` itself."""

from __future__ import annotations

import nf4lora

PUBLIC = [
    "NF4_CODE", "quantize_nf4", "dequantize_nf4", "double_quantize_absmax", "NF4Weight", "Linear4bit",
    "LoRALinear4bit", "nf4_linear", "prepare_model", "quantize_model", "save_adapter", "load_adapter",
    "merge_and_unload", "lora_modules", "lora_state_dict", "paged_adamw", "memory_report", "estimate_memory",
    "MemoryReport", "MemoryEstimate", "LoRASettings", "estimate_model_memory", "register_norm_type",
    "norm_types",
]  # fmt: skip


def test_public_names_import_from_the_package_and_are_in_all():
    from nf4lora import load_adapter, prepare_model, save_adapter  # noqa: F401 - the import is the test

    for name in PUBLIC:
        assert name in nf4lora.__all__, name
        assert callable(getattr(nf4lora, name)) or name == "NF4_CODE", name
    assert set(nf4lora.__all__) <= set(dir(nf4lora))
    assert nf4lora.prepare_model is nf4lora.model.prepare_model
