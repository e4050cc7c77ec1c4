"""QLoRA on a whole model: quantize the linear layers, attach adapters, save and load them in peft's format.

`quantize_model` swaps every `nn.Linear` except the LM head for a frozen `Linear4bit`; `prepare_model` does
that and attaches `LoRALinear4bit` adapters to the targeted layers, upcasts norms to fp32, freezes everything
but the adapters and enables gradient checkpointing (the QLoRA recipe).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nf4lora.lora import Linear4bit, LoRALinear4bit
from nf4lora.weight import NF4Weight
from shared_kernels.modules import output_embedding, set_plain_attribute, swap_modules
from shared_kernels.runconfig import write_atomic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoRASettings:
    """What `prepare_model` did; saved as peft's LoraConfig."""

    r: int
    alpha: float
    dropout: float
    target_modules: list[str] = field(default_factory=list)  # leaf names, e.g. ["q_proj", "v_proj"]
    use_rslora: bool = False
    blocksize: int = 64
    double_quant: bool = True
    quant_type: str = "nf4"
    modules_to_save: list[str] = field(default_factory=list)  # full names of the dense trained modules


# Task heads that transformers' *For{SequenceClassification,TokenClassification,QuestionAnswering} models
# create untrained: they are trained in full (modules_to_save), never quantized.
DEFAULT_SKIP = ("score", "classifier", "qa_outputs", "lm_head")


def _matches(name: str, target_modules: str | list[str] | tuple[str, ...]) -> bool:
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


# Normalisation layers `norms_in_fp32` upcasts, by type (a class name says nothing: "NormalizedMLP" is no
# norm, a custom "RootMeanSquare" may be one). torch's own norm layers, the RMSNorm classes of the
# transformers architectures listed below (resolved from their already-imported modeling modules, so nothing
# extra is imported), and whatever `register_norm_type` adds.
_NORM_TYPES: list[type[nn.Module]] = [nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm]
_TRANSFORMERS_NORMS = {
    "llama": "LlamaRMSNorm",
    "mistral": "MistralRMSNorm",
    "mixtral": "MixtralRMSNorm",
    "qwen2": "Qwen2RMSNorm",
    "qwen3": "Qwen3RMSNorm",
    "qwen3_moe": "Qwen3MoeRMSNorm",
    "gemma": "GemmaRMSNorm",
    "gemma2": "Gemma2RMSNorm",
    "gemma3": "Gemma3RMSNorm",
    "phi3": "Phi3RMSNorm",
    "olmo2": "Olmo2RMSNorm",
    "granite": "GraniteRMSNorm",
    "t5": "T5LayerNorm",
    "cohere": "CohereLayerNorm",
    "deepseek_v3": "DeepseekV3RMSNorm",
    "smollm3": "SmolLM3RMSNorm",
}


def register_norm_type(cls: type[nn.Module]) -> type[nn.Module]:
    """Treat `cls` (and its subclasses) as a normalisation layer in `prepare_model(norms_in_fp32=True)` and
    `estimate_model_memory`; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"register_norm_type needs an nn.Module subclass, got {cls!r}")
    if cls not in _NORM_TYPES:
        _NORM_TYPES.append(cls)
    return cls


def norm_types() -> tuple[type[nn.Module], ...]:
    """The normalisation layer types known now (torch's, registered ones, transformers' imported ones)."""
    found = list(_NORM_TYPES)
    for arch, name in _TRANSFORMERS_NORMS.items():
        module = sys.modules.get(f"transformers.models.{arch}.modeling_{arch}")
        cls = getattr(module, name, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, norm_types())


def _output_in_input_dtype(module: nn.Module, args: tuple, output: Any) -> Any:
    # An fp32 norm computes in fp32 but hands the next layer (e.g. a bf16 LM head) its input dtype back.
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        return output.to(args[0].dtype)
    return output


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (out, in), bias) of an exact nn.Linear or a transformers Conv1D (GPT-2: weight (in, out), so
    transposed here, as transformers' bitsandbytes integration does); None for any other module."""
    from nf4lora.interop import conv1d_type

    if type(module) is nn.Linear:
        return module.weight, module.bias
    conv1d = conv1d_type()
    if conv1d is not None and type(module) is conv1d:
        weight, bias = module.weight, module.bias
        assert isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))
        return weight.t(), bias
    return None


def swap_linear_layers(
    model: nn.Module,
    build: Callable[[str, torch.Tensor, torch.Tensor | None], nn.Module | None],
    keep: Callable[[str], bool] = lambda name: False,
) -> list[str]:
    """Every exact nn.Linear (and transformers Conv1D) of `model` but its output embedding and the names
    `keep` accepts is replaced, in place, by `build(name, weight (out, in), bias)` (None leaves it), through
    the one module-swap loop `shared_kernels.modules.swap_modules`. Returns the replaced names."""
    head = output_embedding(model)

    def select(name: str, module: nn.Module) -> bool:
        return module is not head and _linear_weight(module) is not None and not keep(name)

    def build_from_weight(name: str, module: nn.Module) -> nn.Module | None:
        found = _linear_weight(module)
        assert found is not None  # select accepted it
        return build(name, *found)

    return swap_modules(model, build_from_weight, select)


def ddp_ignore_frozen_4bit(model: nn.Module) -> list[str]:
    """Add every parameter and buffer of the model's 4-bit weights to `_ddp_params_and_buffers_to_ignore` (the
    attribute DistributedDataParallel reads at construction), so DDP neither broadcasts these frozen tensors
    at construction nor re-sends the buffers at every forward (`broadcast_buffers=True`, its default). Each
    rank quantizes the same checkpoint to the same bytes, so nothing needs sending. Returns the ignored
    names."""
    names = [
        f"{prefix}.{name}"
        for prefix, m in model.named_modules()
        if isinstance(m, NF4Weight)
        for name, _ in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))
    ]
    known = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    set_plain_attribute(
        model, "_ddp_params_and_buffers_to_ignore", known + [n for n in names if n not in known]
    )
    return names


def quantize_model(
    model: nn.Module,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip: tuple[str, ...] = (),
    backend: str = "auto",
    quant_type: str = "nf4",
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """Replace every nn.Linear except the output embedding (LM head) and names in `skip` by a frozen
    `Linear4bit`, in place. Returns the model."""

    def build(name: str, dense: torch.Tensor, bias: torch.Tensor | None) -> Linear4bit:
        weight = NF4Weight.from_float(
            dense,
            blocksize,
            double_quant,
            backend=backend,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )
        return Linear4bit(weight, bias, compute_dtype=compute_dtype or dense.dtype, backend=backend)

    swap_linear_layers(model, build, keep=lambda name: name in skip)
    ddp_ignore_frozen_4bit(model)
    return model


def prepare_model(
    model: nn.Module,
    r: int = 64,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: str | list[str] | tuple[str, ...] = "all-linear",
    double_quant: bool = True,
    *,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
    use_rslora: bool = False,
    gradient_checkpointing: bool = True,
    norms_in_fp32: bool = True,
    seed: int | None = None,
    backend: str = "auto",
    quant_type: str = "nf4",
    quant_storage: torch.dtype = torch.uint8,
    skip: str | list[str] | tuple[str, ...] | None = None,
    modules_to_save: list[str] | tuple[str, ...] | None = None,
    adapter_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """QLoRA-prepare a (transformers) model in place and return it.

    Every nn.Linear except the LM head is quantized to NF4 (bitsandbytes-identical bytes); those selected by
    `target_modules` get a LoRA adapter; everything else is frozen.

    Args:
        model: a torch module, typically a transformers `PreTrainedModel`.
        r, alpha, dropout: LoRA rank, alpha (scaling alpha / r) and adapter-input dropout.
        target_modules: "all-linear" (QLoRA's choice), a list of module-name suffixes (peft semantics, e.g.
            ["q_proj", "v_proj"]) or a regex matched against the full module name.
        double_quant: double-quantize the NF4 constants (0.127 instead of 0.5 extra bits per parameter).
        blocksize: NF4 block size. compute_dtype: matmul dtype (default: each layer's original dtype).
        use_rslora: scaling alpha / sqrt(r) instead of alpha / r.
        gradient_checkpointing: enable the model's (non-reentrant) activation checkpointing when it has one.
        norms_in_fp32: upcast normalisation layers to fp32, found by type (`norm_types()`: torch's
            LayerNorm / RMSNorm / GroupNorm / BatchNorm, common transformers RMSNorm classes, and classes
            added with `register_norm_type`), not by class name.
        seed: seed for the adapter initialisation (A kaiming-uniform) when given; the global RNG state is
            left as it was either way.
        backend: kernel backend of the base matmuls ("auto", "torch", "triton").
        quant_type: "nf4" (QLoRA's choice) or "fp4" (bitsandbytes' 4-bit float).
        quant_storage: dtype the packed bytes are viewed as in their frozen Parameter (uint8 by default; FSDP2
            shards either; bitsandbytes' FSDP-QLoRA uses the model's float dtype).
        skip: linear layers kept dense and frozen (names or suffixes, or a regex, as `target_modules`);
            default `DEFAULT_SKIP`, the task heads transformers creates fresh (`score`, `classifier`,
            `qa_outputs`, ...). The output embedding (LM head) is always kept dense.
        modules_to_save: modules trained in full and saved with the adapter (peft's `modules_to_save`: names
            or suffixes, e.g. ["score"] for a classification head); they stay dense, their parameters
            trainable.
        adapter_dtype: dtype of the LoRA A and B matrices (fp32 by default, as peft and QLoRA; bf16 halves
            their memory, which `estimate_memory` assumes).
    """
    if getattr(model, "nf4lora_settings", None) is not None:
        raise ValueError("model was already prepared by nf4lora.prepare_model")
    if not (target_modules == "all-linear" or isinstance(target_modules, str | list | tuple)):
        raise ValueError(
            f"target_modules must be 'all-linear', a list of names or a regex, got {target_modules!r}"
        )
    with torch.random.fork_rng(devices=[]):  # the adapter init never moves the caller's RNG
        if seed is not None:
            torch.manual_seed(seed)
        targeted, saved = _attach(
            model,
            r,
            alpha,
            dropout,
            target_modules,
            double_quant,
            blocksize,
            compute_dtype,
            use_rslora,
            backend,
            quant_type,
            quant_storage,
            skip,
            modules_to_save or (),
            adapter_dtype,
        )
    if not targeted:
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear (the LM head is never targeted)"
        )
    if norms_in_fp32:
        norms = norm_types()
        for module in model.modules():
            if isinstance(module, norms):
                module.float()
                module.register_forward_hook(_output_in_input_dtype)
    enable_new = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    enable_old = getattr(model, "gradient_checkpointing_enable", None)
    if gradient_checkpointing and callable(enable_new):
        enable_new(activation_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing and callable(enable_old):
        enable_old(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in targeted})
    ddp_ignore_frozen_4bit(model)
    settings = LoRASettings(
        r, alpha, dropout, leaf_names, use_rslora, blocksize, double_quant, quant_type, saved
    )
    set_plain_attribute(model, "nf4lora_settings", settings)
    return model


def kept_dense(
    model: nn.Module,
    skip: str | list[str] | tuple[str, ...] | None,
    modules_to_save: list[str] | tuple[str, ...] | None,
) -> tuple[list[str], Callable[[str], bool]]:
    """`prepare_model`'s choice of what stays dense: (the `modules_to_save` module names, a predicate that is
    true for linear layers kept dense (the skip list, and anything inside a saved module))."""
    saved = [
        name
        for name, _ in model.named_modules()
        if name and modules_to_save and _matches(name, list(modules_to_save))
    ]
    if (
        modules_to_save and not saved
    ):  # peft lists both task-head names ("classifier", "score"): any may match
        raise ValueError(f"modules_to_save {list(modules_to_save)} match no module of the model")
    skip = DEFAULT_SKIP if skip is None else skip

    def keep(name: str) -> bool:
        return bool(skip and _matches(name, skip)) or any(
            name == s or name.startswith(s + ".") for s in saved
        )

    return saved, keep


def _attach(
    model,
    r,
    alpha,
    dropout,
    target_modules,
    double_quant,
    blocksize,
    compute_dtype,
    use_rslora,
    backend,
    quant_type,
    quant_storage,
    skip,
    modules_to_save,
    adapter_dtype,
) -> tuple[list[str], list[str]]:
    """Freeze everything, swap the linear layers, unfreeze `modules_to_save`: (targeted names, saved
    names)."""
    for p in model.parameters():
        p.requires_grad_(False)
    saved, keep = kept_dense(model, skip, modules_to_save)
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    targeted: list[str] = []

    def build(name: str, dense: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        weight = NF4Weight.from_float(
            dense,
            blocksize,
            double_quant,
            backend=backend,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )
        if not _matches(name, target_modules):
            return Linear4bit(weight, bias, compute_dtype=compute_dtype or dense.dtype, backend=backend)
        targeted.append(name)
        return LoRALinear4bit(
            weight,
            bias,
            r=r,
            alpha=alpha,
            dropout=dropout,
            use_rslora=use_rslora,
            compute_dtype=compute_dtype or dense.dtype,
            adapter_dtype=adapter_dtype,
            backend=backend,
        )

    swap_linear_layers(model, build, keep)
    return targeted, saved


def lora_modules(model: nn.Module) -> dict[str, LoRALinear4bit]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear4bit)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under peft's saved names: `base_model.model.<module>.lora_{A,B}.weight`, and the
    parameters of `modules_to_save` as `base_model.model.<module>.<param>` (peft's format for them)."""
    return {f"{PEFT_PREFIX}{name}": t.detach().contiguous() for name, t in _adapter_tensors(model).items()}


def _adapter_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """The saved tensors by model parameter name: LoRA A and B, and every parameter of `modules_to_save`."""
    out = {
        f"{name}.{ab}.weight": getattr(m, ab).weight
        for name, m in lora_modules(model).items()
        for ab in ("lora_A", "lora_B")
    }
    settings: LoRASettings | None = getattr(model, "nf4lora_settings", None)
    for module_name in settings.modules_to_save if settings else ():
        for pname, p in model.get_submodule(module_name).named_parameters():
            out[f"{module_name}.{pname}"] = p
    return out


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str = "CAUSAL_LM",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` in peft's format (loadable with
    `peft.PeftModel.from_pretrained` on the bf16 or bitsandbytes-4bit base), atomically. Returns out_dir.

    state_dict: the model's whole tensors by parameter name when its own are shards (FSDP2: e.g.
    `shared_kernels.distributed.full_state_dict(model, trainable_only=True)`); the adapters are taken from it.
    """
    from safetensors.torch import save_file

    from nf4lora.interop import peft_config_dict

    settings: LoRASettings | None = getattr(model, "nf4lora_settings", None)
    if settings is None:
        raise ValueError("model has no adapters: call nf4lora.prepare_model first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = peft_config_dict(settings, base_model_name_or_path, task_type)
    if state_dict is None:
        tensors = {k: v.cpu() for k, v in lora_state_dict(model).items()}
    else:
        tensors = {
            f"{PEFT_PREFIX}{name}": state_dict[name].detach().cpu().contiguous()
            for name in _adapter_tensors(model)
        }
    write_atomic(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_atomic(
        out / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True))
    )
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """Read and check a peft LoRA adapter_config.json: plain LoRA (no DoRA, no per-module ranks, no trained
    bias; `modules_to_save` is supported), else a ValueError naming the field."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"adapter_dir has no {ADAPTER_CONFIG}: {adapter_dir}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    unsupported = {
        "use_dora": False,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
    }
    for key, plain in unsupported.items():
        if cfg.get(key) not in (plain, None) and not (plain == {} and not cfg.get(key)):
            raise ValueError(f"adapter config field {key}={cfg.get(key)!r} is not supported (only {plain!r})")
    return cfg


def load_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    *,
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
    backend: str = "auto",
    **prepare_kwargs,
) -> nn.Module:
    """Load a peft LoRA adapter (ours or peft's) into `model`, preparing it first (with the adapter's r,
    alpha, dropout and target modules) if it is not prepared yet. Every adapter tensor must find its
    module."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(adapter_dir)
    if getattr(model, "nf4lora_settings", None) is None:
        targets = cfg.get("target_modules")  # a list of names, "all-linear" or a regex, as in peft
        prepare_model(
            model,
            r=int(cfg["r"]),
            alpha=float(cfg["lora_alpha"]),
            dropout=float(cfg.get("lora_dropout", 0)),
            target_modules=targets if targets else "all-linear",
            double_quant=double_quant,
            blocksize=blocksize,
            compute_dtype=compute_dtype,
            use_rslora=bool(cfg.get("use_rslora")),
            backend=backend,
            modules_to_save=cfg.get("modules_to_save") or None,
            **prepare_kwargs,
        )
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    targets = _adapter_tensors(model)
    seen: set[str] = set()
    for key, value in tensors.items():
        name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key.removeprefix(PEFT_PREFIX))
        if name not in targets:
            raise ValueError(f"adapter tensor {key!r} matches no LoRA module or module to save of the model")
        if tuple(value.shape) != tuple(targets[name].shape):
            raise ValueError(
                f"adapter tensor {key!r} has shape {tuple(value.shape)}, the module expects "
                f"{tuple(targets[name].shape)} (different r?)"
            )
        with torch.no_grad():
            targets[name].copy_(value)
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        raise ValueError(f"adapter_dir lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every Linear4bit / LoRALinear4bit by a dense nn.Linear (dequantized base + scaling * B @ A),
    in place, e.g. to export a merged model. dtype: of the dense weights (default: each base's dtype)."""

    def dense_linear(name: str, m: nn.Module) -> nn.Module:
        assert isinstance(m, Linear4bit)  # select accepted it
        w = m.weight.dequantize(torch.float32)
        if isinstance(m, LoRALinear4bit):
            w = w + m.delta_weight().float()
        out_dtype = dtype or m.weight.dtype
        dense = nn.Linear(
            m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=out_dtype
        )
        dense.weight.copy_(w)
        if m.bias is not None:
            dense.bias.copy_(m.bias)
        return dense

    swap_modules(model, dense_linear, lambda name, m: isinstance(m, Linear4bit))
    if hasattr(model, "nf4lora_settings"):
        set_plain_attribute(model, "nf4lora_settings", None)
    return model


def settings_dict(model: nn.Module) -> dict[str, Any]:
    settings = getattr(model, "nf4lora_settings", None)
    return {} if settings is None else asdict(settings)
