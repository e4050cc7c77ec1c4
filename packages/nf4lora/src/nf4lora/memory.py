"""Memory accounting: what a prepared model holds (`memory_report`) and what QLoRA fine-tuning of a model of a
given size needs (`estimate_memory`, which rebuilds the paper's 65B-in-48GB budget from its parts)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
from torch import nn

from nf4lora.lora import LoRALinear4bit
from nf4lora.weight import DQ_BLOCKSIZE, DYNAMIC_CODE, NF4Weight
from shared_kernels.modules import output_embedding


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class MemoryReport:
    """Bytes by role. `base_codes`: packed NF4 codes; `base_constants`: absmax (+ second-level constants,
    offsets, code tables); `other_weights`: every other parameter and buffer (embeddings, LM head, norms,
    biases); `adapters`: LoRA parameters; `gradients`: existing .grad tensors; `optimizer_state`: tensors in
    the optimizer's state."""

    base_codes: int = 0
    base_constants: int = 0
    other_weights: int = 0
    adapters: int = 0
    gradients: int = 0
    optimizer_state: int = 0

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def format(self) -> str:
        rows = [*asdict(self).items(), ("total", self.total)]
        return "\n".join(f"{k:<16} {v / 2**20:>12.3f} MiB" for k, v in rows)


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model as it was before quantization: NF4 weights count their elements, LoRA adapters
    are not counted."""
    adapters = {
        id(p)
        for m in model.modules()
        if isinstance(m, LoRALinear4bit)
        for p in (m.lora_A.weight, m.lora_B.weight)
    }
    adapters |= {id(p) for m in model.modules() if isinstance(m, NF4Weight) for p in m.parameters()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in adapters)
    return dense + sum(m.numel for m in model.modules() if isinstance(m, NF4Weight))


class _CountOnce:
    """Remembers the tensors already counted (by storage address; empty tensors by identity)."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def __call__(self, t: torch.Tensor) -> bool:
        key = t.data_ptr() if t.numel() else id(t)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def _count_4bit_weights(model: nn.Module, report: MemoryReport, once: _CountOnce) -> None:
    for module in model.modules():
        if not isinstance(module, NF4Weight):
            continue
        for name, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
            if not once(t):
                continue
            if name == "packed":
                report.base_codes += _nbytes(t)
            else:
                report.base_constants += _nbytes(t)


def _count_parameters_and_buffers(model: nn.Module, report: MemoryReport, once: _CountOnce) -> None:
    adapter_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, LoRALinear4bit)
        for p in (m.lora_A.weight, m.lora_B.weight)
    }
    for p in model.parameters():
        if once(p):
            if id(p) in adapter_ids:
                report.adapters += _nbytes(p)
            else:
                report.other_weights += _nbytes(p)
        if p.grad is not None and once(p.grad):
            report.gradients += _nbytes(p.grad)
    for buf in model.buffers():
        if once(buf):
            report.other_weights += _nbytes(buf)


def _count_optimizer_state(optimizer: torch.optim.Optimizer, report: MemoryReport, once: _CountOnce) -> None:
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and once(v):
                report.optimizer_state += _nbytes(v)


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Count the bytes of `model` (and `optimizer`) by role; every tensor is counted once (the 4-bit codes
    and constants first, so they are never counted again as other weights)."""
    report = MemoryReport()
    once = _CountOnce()
    _count_4bit_weights(model, report, once)
    _count_parameters_and_buffers(model, report, once)
    if optimizer is not None:
        _count_optimizer_state(optimizer, report, once)
    return report


def estimate_model_memory(
    model: nn.Module,
    *,
    r: int = 64,
    target_modules: str | list[str] | tuple[str, ...] = "all-linear",
    blocksize: int = 64,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    skip: str | list[str] | tuple[str, ...] | None = None,
    modules_to_save: list[str] | tuple[str, ...] | None = None,
    adapter_dtype: torch.dtype = torch.float32,
    norms_in_fp32: bool = True,
    optimizer_bytes_per_param: int = 8,
) -> MemoryReport:
    """What `prepare_model(model, ...)` with these arguments would hold, from the model's real shapes and
    dtypes, without quantizing or allocating anything: `model` may live on the meta device
    (`with torch.device("meta"): AutoModelForCausalLM.from_config(config)`).

    `base_codes`, `base_constants`, `other_weights` and `adapters` are the bytes `memory_report` counts on the
    prepared model (equal, tested): packed 4-bit codes (padded to whole `quant_storage` elements), per-block
    constants (fp32, or uint8 + fp32 second-level constants, offset and the 256-entry code table with double
    quantization; the 256-entry table is one tensor shared by every weight, counted once), every dense
    parameter and buffer in its dtype (fp32 for norms with `norms_in_fp32`; the LM head, the skip list and
    `modules_to_save` stay dense), LoRA A and B in `adapter_dtype`. `gradients`: one per trainable element
    (adapters and `modules_to_save`) in its dtype; `optimizer_state`: `optimizer_bytes_per_param` per
    trainable element (8: two fp32 Adam moments, as 32-bit paged AdamW)."""
    from nf4lora.model import _linear_weight, _matches, is_norm, kept_dense

    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    saved, keep = kept_dense(model, skip, modules_to_save)
    head = output_embedding(model)
    report = MemoryReport()
    quantized: set[int] = set()
    code_table = 0
    trainable = 0  # gradient bytes
    n_trainable = 0
    for name, module in model.named_modules():
        found = _linear_weight(module)
        if found is None or module is head or keep(name):
            continue
        weight, bias = found
        quantized.add(id(module.weight))
        numel = weight.numel()
        n_blocks = -(-numel // blocksize)
        unit = torch.empty((), dtype=quant_storage).element_size()
        report.base_codes += -(-((numel + 1) // 2) // unit) * unit
        if double_quant:
            report.base_constants += n_blocks + 4 * -(-n_blocks // DQ_BLOCKSIZE) + 4
            code_table = DYNAMIC_CODE.numel() * 4  # one table, shared by every weight (counted once)
        else:
            report.base_constants += 4 * n_blocks
        if _matches(name, target_modules):
            n_lora = r * (weight.shape[0] + weight.shape[1])
            size = n_lora * torch.empty((), dtype=adapter_dtype).element_size()
            report.adapters += size
            trainable += size
            n_trainable += n_lora
    report.base_constants += code_table
    norm_tensors = {
        id(t)
        for m in model.modules()
        if norms_in_fp32 and is_norm(m)
        for t in (*m.parameters(), *m.buffers())
    }
    saved_params = {id(p) for s in saved for p in model.get_submodule(s).parameters()}
    for t in (*model.parameters(), *model.buffers()):  # each shared (tied) tensor once
        if id(t) in quantized:
            continue
        size = t.element_size() if not (id(t) in norm_tensors and t.is_floating_point()) else 4
        report.other_weights += t.numel() * size
        if id(t) in saved_params:
            trainable += t.numel() * size
            n_trainable += t.numel()
    report.gradients = trainable
    report.optimizer_state = n_trainable * optimizer_bytes_per_param
    return report


@dataclass
class MemoryEstimate:
    """Bytes by part of a QLoRA fine-tuning run (see `estimate_memory`)."""

    base_weights: int
    unquantized_weights: int
    adapters: int
    adapter_gradients: int
    optimizer_state: int
    activations: int
    full_finetune_16bit: int  # weights + gradients in 16 bits + Adam's two fp32 moments: 12 bytes/param

    @property
    def total(self) -> int:
        return (
            self.base_weights
            + self.unquantized_weights
            + self.adapters
            + self.adapter_gradients
            + self.optimizer_state
            + self.activations
        )


def estimate_memory(
    n_params: int,
    *,
    n_layers: int,
    hidden_size: int,
    intermediate_size: int,
    vocab_size: int,
    kv_size: int | None = None,
    r: int = 64,
    blocksize: int = 64,
    double_quant: bool = True,
    adapter_bytes: int = 2,
    optimizer_bytes_per_param: int = 8,
    batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = True,
) -> MemoryEstimate:
    """QLoRA memory of a Llama-style decoder with `n_params` parameters, from its parts.

    - base: every linear layer in NF4 (4 + 8/64 + 32/(64*256) bits with double quantization, 4 + 32/64 bits
      without); the input embedding and the LM head (2 * vocab * hidden params) stay in 16 bits;
    - adapters: LoRA rank r on q, k, v, o, gate, up, down of every layer, `adapter_bytes` each, the same again
      for their gradients, and `optimizer_bytes_per_param` for Adam's moments (8: 32-bit paged AdamW);
    - activations: with gradient checkpointing, each layer's 16-bit input plus one layer recomputed at a
      time (~ (10 * hidden + 3 * intermediate) values per token); without, every layer's.
    `full_finetune_16bit` is 12 bytes per parameter (16-bit weights and gradients, two fp32 Adam moments).
    """
    if n_params <= 0 or min(n_layers, hidden_size, intermediate_size, vocab_size, r) <= 0:
        raise ValueError(
            "n_params, n_layers, hidden_size, intermediate_size, vocab_size and r must be positive"
        )
    kv = hidden_size if kv_size is None else kv_size
    unquantized = 2 * vocab_size * hidden_size
    quantized = n_params - unquantized
    if quantized <= 0:
        raise ValueError(
            f"n_params={n_params} is smaller than the embeddings (2 * vocab * hidden = {unquantized})"
        )
    bits = 4 + 8 / blocksize + 32 / (blocksize * 256) if double_quant else 4 + 32 / blocksize
    per_layer_lora = r * (
        (hidden_size + hidden_size) * 2 + (hidden_size + kv) * 2 + (hidden_size + intermediate_size) * 3
    )
    n_lora = n_layers * per_layer_lora
    tokens = batch_size * seq_len
    one_layer = tokens * (10 * hidden_size + 3 * intermediate_size) * 2
    if gradient_checkpointing:
        activations = n_layers * tokens * hidden_size * 2 + one_layer
    else:
        activations = n_layers * one_layer
    return MemoryEstimate(
        base_weights=int(quantized * bits / 8),
        unquantized_weights=unquantized * 2,
        adapters=n_lora * adapter_bytes,
        adapter_gradients=n_lora * adapter_bytes,
        optimizer_state=n_lora * optimizer_bytes_per_param,
        activations=activations,
        full_finetune_16bit=12 * n_params,
    )


# LLaMA-1 (Touvron et al. 2023, table 2): layers, hidden size, MLP size; vocabulary 32000, untied head.
LLAMA_SHAPES = {
    "7B": (32, 4096, 11008),
    "13B": (40, 5120, 13824),
    "33B": (60, 6656, 17920),
    "65B": (80, 8192, 22016),
}
LLAMA_VOCAB = 32000
# QLoRA paper (arXiv 2305.14314), via REFERENCE.md section 2: "model sizes in 4-bit".
PAPER_4BIT_GB = {"7B": 5, "13B": 10, "33B": 21, "65B": 41}


def llama_params(n_layers: int, hidden: int, intermediate: int, vocab: int = LLAMA_VOCAB) -> int:
    """Parameters of a LLaMA decoder: per layer 4 attention + 3 MLP matrices and 2 norms; embeddings, an
    untied LM head and the final norm."""
    return (
        n_layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)
        + 2 * vocab * hidden
        + hidden
    )


def llama_table(
    r: int = 64, batch_size: int = 1, seq_len: int = 512, gpus_gb: tuple[int, ...] = (24, 48)
) -> str:
    """The QLoRA memory budget of LLaMA 7B-65B (`estimate_memory`, all-linear LoRA at rank r, NF4 + DQ at
    blocksize 64, 16-bit embeddings and head, 32-bit AdamW state, checkpointed activations of batch x
    seq_len), with bf16 and with fp32 adapters, against cards of `gpus_gb` "GB" (a 24 GB RTX 3090/4090 or
    48 GB A6000 holds that many GiB); a markdown table, sizes in GB (10^9 bytes). Not counted: the CUDA
    context, allocator fragmentation, one layer's transient dequantized weight, the logits."""
    gb = 1e9
    cols = [
        "model",
        "params (B)",
        "NF4+DQ linears",
        "16-bit emb+head",
        "adapters bf16",
        "adapter grads bf16",
        "AdamW 32-bit",
        f"activations ({batch_size}x{seq_len})",
        "total, bf16 adapters",
        "total, fp32 adapters",
        *(f"fits {g} GiB (bf16 / fp32)" for g in gpus_gb),
        "paper: 4-bit model",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, (layers, hidden, inter) in LLAMA_SHAPES.items():
        n = llama_params(layers, hidden, inter)
        estimate = functools.partial(
            estimate_memory,
            n,
            n_layers=layers,
            hidden_size=hidden,
            intermediate_size=inter,
            vocab_size=LLAMA_VOCAB,
            r=r,
            batch_size=batch_size,
            seq_len=seq_len,
        )
        bf16, fp32 = estimate(adapter_bytes=2), estimate(adapter_bytes=4)
        fits = [
            f"{'yes' if bf16.total <= g * 2**30 else 'no'} / {'yes' if fp32.total <= g * 2**30 else 'no'}"
            for g in gpus_gb
        ]
        parts = (
            bf16.base_weights,
            bf16.unquantized_weights,
            bf16.adapters,
            bf16.adapter_gradients,
            bf16.optimizer_state,
            bf16.activations,
            bf16.total,
            fp32.total,
        )
        lines.append(
            f"| {name} | {n / 1e9:.2f} | "
            + " | ".join(f"{p / gb:.2f}" for p in parts)
            + f" | {' | '.join(fits)} | {PAPER_4BIT_GB[name]} |"
        )
    return "\n".join(lines)
