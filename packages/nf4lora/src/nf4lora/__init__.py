"""QLoRA: 4-bit NormalFloat weights bit-compatible with bitsandbytes, double quantization, LoRA through a frozen 4-bit base, paged optimizers."""
