"""Training recipes (need the `train` extra: torch, transformers, peft, trl, accelerate): distillation SFT,
reward-weighted fine-tuning, GRPO."""
