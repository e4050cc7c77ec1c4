"""QLoRA: 4-bit NormalFloat weights bit-compatible with bitsandbytes, double quantization, LoRA through a
frozen 4-bit base, paged optimizers.

The kernels (quantize, dequantize with fused double-quant dequantization, fused dequantize + matmul) live in
`shared_kernels.nf4` / `shared_kernels.nf4_matmul`; this package adds the weight container, the LoRA modules,
`prepare_model`, peft/bitsandbytes interop, memory accounting and the CLI.
"""

from nf4lora.lora import Linear4bit, LoRALinear4bit, nf4_linear
from nf4lora.memory import (
    MemoryEstimate,
    MemoryReport,
    count_parameters,
    estimate_memory,
    estimate_model_memory,
    memory_report,
)
from nf4lora.model import (
    LoRASettings,
    ddp_ignore_frozen_4bit,
    load_adapter,
    lora_modules,
    lora_state_dict,
    merge_and_unload,
    norm_types,
    prepare_model,
    quantize_model,
    register_norm_type,
    save_adapter,
)
from nf4lora.optim import paged_adamw
from nf4lora.weight import NF4Weight
from shared_kernels.nf4 import (
    FP4_CODE,
    NF4_CODE,
    QUANT_TYPES,
    SUPPORTED_BLOCKSIZES,
    dequantize_4bit,
    dequantize_nf4,
    double_quantize_absmax,
    quantize_4bit,
    quantize_nf4,
)

__all__ = [
    "FP4_CODE",
    "NF4_CODE",
    "QUANT_TYPES",
    "SUPPORTED_BLOCKSIZES",
    "Linear4bit",
    "LoRALinear4bit",
    "LoRASettings",
    "MemoryEstimate",
    "MemoryReport",
    "count_parameters",
    "ddp_ignore_frozen_4bit",
    "estimate_memory",
    "estimate_model_memory",
    "norm_types",
    "register_norm_type",
    "memory_report",
    "paged_adamw",
    "NF4Weight",
    "dequantize_4bit",
    "dequantize_nf4",
    "double_quantize_absmax",
    "load_adapter",
    "lora_modules",
    "lora_state_dict",
    "merge_and_unload",
    "nf4_linear",
    "prepare_model",
    "quantize_model",
    "quantize_4bit",
    "quantize_nf4",
    "save_adapter",
]
