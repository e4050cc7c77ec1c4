"""The one module that imports bitsandbytes and peft (lazily, inside functions): conversions of the 4-bit
weight to and from bitsandbytes' `Params4bit` / `QuantState` (the same bytes, no re-quantization), its
serialized state-dict form, and peft's LoraConfig."""

from __future__ import annotations

from typing import Any

import torch

from nf4lora.weight import NF4Weight
from shared_kernels.nf4 import CODES, QUANT_TYPES


def conv1d_type() -> type | None:
    """transformers' `Conv1D` (GPT-2's linear layer, weight stored (in, out)), or None without
    transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def to_bnb_quant_state(weight: NF4Weight) -> Any:
    """A bitsandbytes `QuantState` sharing this weight's constants (nf4/fp4, nested when double-quantized)."""
    from bitsandbytes.functional import QuantState

    state2 = None
    offset = None
    if weight.double_quant:
        state2 = QuantState(
            absmax=weight.absmax2, code=weight.code2, blocksize=weight.blocksize2, dtype=torch.float32
        )
        offset = weight.offset
    return QuantState(
        absmax=weight.absmax,
        shape=weight.shape,
        code=CODES[weight.quant_type].to(weight.packed.device),
        blocksize=weight.blocksize,
        quant_type=weight.quant_type,
        dtype=weight.dtype,
        offset=offset,
        state2=state2,
    )


def to_bnb_params4bit(weight: NF4Weight) -> Any:
    """A bitsandbytes `Params4bit` (units, 1) of `weight.quant_storage` over the same bytes, already quantized
    (bitsandbytes itself needs the byte count to be a multiple of the storage itemsize: no padding)."""
    from bitsandbytes.nn import Params4bit

    return Params4bit(
        weight.packed.detach().reshape(-1, 1),
        requires_grad=False,
        quant_state=to_bnb_quant_state(weight),
        blocksize=weight.blocksize,
        compress_statistics=weight.double_quant,
        quant_type=weight.quant_type,
        quant_storage=weight.quant_storage,
        bnb_quantized=True,
    )


def from_bnb(data: torch.Tensor, quant_state: Any | None = None) -> NF4Weight:
    """An `NF4Weight` over bitsandbytes' bytes: `data` is a Params4bit (its quant_state is used) or the packed
    tensor with `quant_state` given (nf4 or fp4). Its dtype is the `quant_storage` (uint8, or a float dtype
    viewing the same bytes, as bitsandbytes' FSDP-QLoRA stores them); the container keeps it."""
    state = quant_state if quant_state is not None else getattr(data, "quant_state", None)
    if state is None:
        raise ValueError("quant_state is required (data has none): is the Params4bit quantized?")
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_state.quant_type must be one of {QUANT_TYPES}, got {state.quant_type!r}")
    if not isinstance(data, torch.Tensor):
        raise TypeError(
            f"data must be a torch.Tensor (Params4bit or its packed data), got {type(data).__name__}"
        )
    packed = data.detach()
    packed = torch.Tensor(packed) if type(packed) is not torch.Tensor else packed  # drop the Params4bit class
    kw = dict(quant_type=state.quant_type, quant_storage=packed.dtype)
    if state.nested:
        return NF4Weight(
            packed.reshape(-1),
            state.absmax,
            state.shape,
            state.dtype,
            state.blocksize,
            absmax2=state.state2.absmax,
            offset=torch.as_tensor(state.offset, dtype=torch.float32),
            code2=state.state2.code,
            blocksize2=state.state2.blocksize,
            **kw,
        )
    return NF4Weight(packed.reshape(-1), state.absmax, state.shape, state.dtype, state.blocksize, **kw)


def bnb_serialized(weight: NF4Weight, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes writes for a Linear4bit weight under `prefix` (e.g. "model.q_proj.weight"):
    the packed data, `.absmax`, `.quant_map`, nested entries and the packed
    `.quant_state.bitsandbytes__<type>`."""
    state = to_bnb_quant_state(weight)
    out = {prefix: weight.packed.detach().reshape(-1, 1)}
    for key, value in state.as_dict(packed=True).items():
        out[f"{prefix}.{key}"] = value
    return out


def from_bnb_serialized(tensors: dict[str, torch.Tensor], prefix: str) -> NF4Weight:
    """Inverse of `bnb_serialized` (also reads checkpoints written by transformers + bitsandbytes)."""
    from bitsandbytes.functional import QuantState

    qs = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    state = QuantState.from_dict(qs, device=tensors[prefix].device)
    return from_bnb(tensors[prefix], state)


def peft_config_dict(settings: Any, base_model_name_or_path: str | None, task_type: str) -> dict[str, Any]:
    """peft's adapter_config.json content for our LoRA settings, produced by peft's own LoraConfig."""
    from peft import LoraConfig

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        use_rslora=settings.use_rslora,
        bias="none",
        modules_to_save=[n.rsplit(".", 1)[-1] for n in settings.modules_to_save] or None,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
    )
    out = config.to_dict()
    for key, value in list(out.items()):
        if isinstance(value, set):
            out[key] = sorted(value)
        elif hasattr(value, "value"):  # enums
            out[key] = value.value
    return out
