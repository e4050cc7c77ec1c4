"""Quantized checkpoints in bitsandbytes' on-disk format (safetensors + `quantization_config`), so
`transformers.AutoModelForCausalLM.from_pretrained(out)` with bitsandbytes installed loads them too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nf4lora.lora import Linear4bit
from nf4lora.model import quantize_model, swap_linear_layers
from nf4lora.weight import NF4Weight
from shared_kernels.nf4 import QUANT_TYPES
from shared_kernels.runconfig import write_atomic

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def save_quantized(model: nn.Module, out_dir: str | Path, source_dir: str | Path | None = None) -> Path:
    """Write a `quantize_model`-ed transformers model to `out_dir` (config.json with a bitsandbytes
    `quantization_config`, model.safetensors with each 4-bit weight in bitsandbytes' serialized form), copying
    tokenizer files from `source_dir` when given. Files are written atomically."""
    from safetensors.torch import save_file

    from nf4lora.interop import bnb_serialized

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not quantized:
        raise ValueError("model has no Linear4bit layers: call nf4lora.quantize_model first")
    for name, m in quantized.items():
        tensors.update(bnb_serialized(m.weight, f"{name}.weight"))
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach()
    inside = tuple(f"{n}." for n in quantized)
    for key, value in model.state_dict().items():
        if not key.startswith(inside):
            tensors[key] = value
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # code tables are shared
    first = next(iter(quantized.values()))
    hf_config: Any = getattr(model, "config", None)
    if hf_config is None:
        raise ValueError(f"model must be a transformers model (with a .config), got {type(model).__name__}")
    config = hf_config.to_dict()
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": first.weight.quant_type,
        "bnb_4bit_use_double_quant": first.weight.double_quant,
        "bnb_4bit_compute_dtype": str(first.compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": ["lm_head"],
    }
    write_atomic(out / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_atomic(out / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2, default=str)))
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copyfile(Path(source_dir) / name, out / name)
    return out


def load_quantized(path: str | Path, backend: str = "auto") -> nn.Module:
    """Load a checkpoint written by `save_quantized` (or by transformers + bitsandbytes, nf4 or fp4) as a
    model whose linear layers are `Linear4bit`, the 4-bit bytes taken as they are (no re-quantization)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from nf4lora.interop import from_bnb_serialized

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    qconfig = getattr(config, "quantization_config", None)
    if not qconfig:
        raise ValueError(f"path has no quantization_config in config.json: {path}")
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    if qconfig.get("bnb_4bit_quant_type") not in QUANT_TYPES:
        raise ValueError(
            f"quantization_config.bnb_4bit_quant_type must be one of {QUANT_TYPES}, "
            f"got {qconfig.get('bnb_4bit_quant_type')!r}"
        )
    del config.quantization_config
    compute_dtype = getattr(torch, str(qconfig.get("bnb_4bit_compute_dtype", "float32")))
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_file(str(path / WEIGHTS))
    head = model.get_output_embeddings()

    def build(name: str, dense: torch.Tensor, bias: torch.Tensor | None) -> Linear4bit | None:
        if f"{name}.weight.absmax" not in tensors:  # left dense in the checkpoint
            return None
        weight = from_bnb_serialized(tensors, f"{name}.weight")
        return Linear4bit(weight, tensors.get(f"{name}.bias"), compute_dtype=compute_dtype, backend=backend)

    swap_linear_layers(model, build)
    rest = {
        k: v
        for k, v in tensors.items()
        if k in model.state_dict() and not k.endswith((".packed", ".absmax", ".absmax2", ".offset", ".code2"))
    }
    missing = [
        k
        for k, m in model.named_parameters()
        if k not in rest and not isinstance(model.get_submodule(k.rsplit(".", 1)[0]), Linear4bit | NF4Weight)
    ]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(rest, strict=False)
    if head is not None and getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


__all__ = ["load_quantized", "quantize_model", "save_quantized"]
