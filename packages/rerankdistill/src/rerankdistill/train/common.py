"""Shared pieces of the training recipes: tokenised examples with loss masks, a weighted-NLL loop under
`accelerate` (the workspace's one loop, `shared_kernels.training`), LoRA/QLoRA adapters, checkpoints that
resume.

Loss: per example, the mean token NLL over its unmasked label positions; the batch loss is the mean over
examples of `weight_i * nll_i` (weight 1 for SFT; r^3 for reward-weighted fine-tuning). Masks: with
`completion_only=True` the prompt tokens (chat template, query, document) carry label -100 and only the
answer (explanation, label line, stop marker, end-of-turn token) is learned; otherwise every real token is.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import torch

from shared_kernels.distributed import full_state_dict, is_sharded
from shared_kernels.finite import check_finite_tensors

IGNORE = -100


@dataclass
class Example:
    """One tokenised training sequence. input_ids/labels: (T,) lists; weight scales its loss."""

    input_ids: list[int]
    labels: list[int]
    weight: float = 1.0


@overload
def encode_example(
    tokenizer,
    messages: list[dict[str, str]],
    completion: str,
    completion_only: bool = ...,
    max_length: None = None,
    weight: float = ...,
) -> Example: ...


@overload
def encode_example(
    tokenizer,
    messages: list[dict[str, str]],
    completion: str,
    completion_only: bool = ...,
    max_length: int | None = ...,
    weight: float = ...,
) -> Example | None: ...


def encode_example(
    tokenizer,
    messages: list[dict[str, str]],
    completion: str,
    completion_only: bool = True,
    max_length: int | None = None,
    weight: float = 1.0,
) -> Example | None:
    """Tokenise chat `messages` + assistant `completion` (+ end-of-turn token); None when over max_length.

    The prompt is rendered with the tokenizer's chat template and `add_generation_prompt=True`, so the prompt
    tokens are exactly those the model sees at inference; the completion is tokenised separately and appended.
    """
    prompt_ids = list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id: the student could not learn to stop")
    completion_ids = list(completion_ids) + [tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    if max_length is not None and len(ids) > max_length:
        return None
    labels = ([IGNORE] * len(prompt_ids) if completion_only else list(prompt_ids)) + completion_ids
    return Example(ids, labels, float(weight))


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids/labels/attention_mask (B, T) and weights (B,)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    weights = torch.tensor([e.weight for e in examples], dtype=torch.float32)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "weights": weights}


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL of each learned label token.

    Args:
        logits: (B, T, V); labels: (B, T) with -100 where not learned (shifted inside: logits[t] predicts
            labels[t + 1]).
    Returns:
        nll: (B, T-1) float32, 0 where not learned; mask: (B, T-1) bool, True where learned.
    """
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none"
    )
    return nll, shift_labels != IGNORE


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL per sequence over unmasked labels (`token_nll`'s arguments).

    Returns:
        (B,) float32; 0 for a sequence with no learned token.
    """
    nll, mask = token_nll(logits, labels)
    return nll.sum(1) / mask.sum(1).clamp(min=1)


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_i(weights_i * nll_i): InteRank's r^3-weighted NLL when weights = r^3."""
    return (weights.to(logits.device) * per_example_nll(logits, labels)).mean()


@dataclass
class LoraSpec:
    """LoRA settings (InteRank: r=64, alpha=16, dropout 0.1); `quantize="nf4"` makes it QLoRA via nf4lora."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    quantize: str | None = None


def apply_lora(model, spec: LoraSpec):
    """Wrap `model` with trainable LoRA adapters (base weights frozen); with spec.quantize == "nf4" the base
    linears are NF4-quantised first through `nf4lora.prepare_model`."""
    if spec.quantize not in (None, "nf4"):
        raise ValueError(f"lora.quantize must be None or 'nf4', got {spec.quantize!r}")
    if spec.quantize == "nf4":
        try:
            from nf4lora.model import prepare_model
        except ImportError as e:
            raise ImportError("QLoRA needs nf4lora.model.prepare_model (the nf4lora package)") from e
        return prepare_model(
            model, r=spec.r, alpha=spec.alpha, dropout=spec.dropout, target_modules=list(spec.target_modules)
        )
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in spec.target_modules if t in present]
    if not targets:
        raise ValueError(f"lora.target_modules {spec.target_modules} match no module of the model")
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@dataclass
class LoopConfig:
    """Optimisation settings shared by SFT and reward-weighted fine-tuning."""

    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 16
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0  # optimizer steps between resumable checkpoints (0: only at the end)


def _order(n: int, epochs: int, seed: int) -> list[int]:
    order: list[int] = []
    for epoch in range(epochs):
        idx = list(range(n))
        random.Random(seed * 1000 + epoch).shuffle(idx)
        order += idx
    return order


def step_windows(n_examples: int, cfg: LoopConfig) -> list[list[list[int]]]:
    """The global schedule: one window of micro-batches (lists of example indices) per optimizer step.

    A window holds `cfg.grad_accum` micro-batches of `cfg.batch_size` examples, however many processes share
    it, so the global batch and the step count do not depend on the number of processes.
    """
    order = _order(n_examples, cfg.epochs, cfg.seed)
    micro = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    windows = [micro[i : i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
    return windows if cfg.max_steps is None else windows[: cfg.max_steps]


def train_loop(
    model,
    examples: Sequence[Example],
    pad_id: int,
    output_dir: str | os.PathLike,
    cfg: LoopConfig,
    progress: bool = True,
) -> dict[str, float]:
    """Minimise the weighted NLL over `examples` with AdamW, with the workspace's one training loop
    (`shared_kernels.training.run_loop`) under `accelerate` (so `accelerate launch` works, DDP or FSDP2).

    Data parallel: each optimizer step's window of `grad_accum` micro-batches (`step_windows`) is split
    between the processes (`grad_accum` must be a multiple of the process count): the same global batch,
    steps and losses on 1 or N processes. A final partial window is cut to a multiple of the process count
    (at most N - 1 micro-batches dropped, none on one process).

    Checkpoints (`shared_kernels.checkpoint`: trainable weights, optimizer, scheduler, RNG) go to
    `output_dir/checkpoints` every `cfg.save_every` optimizer steps and at the end; a run resumes from the
    newest one. A non-finite loss stops training before the optimizer step (`NonFiniteLossError`).

    Returns:
        {"steps", "first_loss", "last_loss"} (losses are per optimizer step, averaged over micro-batches).
    """
    from accelerate import Accelerator

    from shared_kernels.checkpoint import CheckpointManager
    from shared_kernels.training import LoopSettings, run_loop

    if not examples:
        raise ValueError("no training examples (all filtered out?)")
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.epochs < 1:
        raise ValueError(f"batch_size, grad_accum and epochs must be >= 1, got {cfg}")
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world = accelerator.num_processes
    if cfg.grad_accum % world:
        raise ValueError(
            f"grad_accum ({cfg.grad_accum}) must be a multiple of the number of processes ({world})"
        )
    windows = [w[: len(w) - len(w) % world] for w in step_windows(len(examples), cfg)]
    windows = [w for w in windows if w]
    total_steps = len(windows)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / max(1, total_steps))
    )

    def loss_fn(m, micro: list[int]) -> torch.Tensor:
        batch = {
            k: v.to(accelerator.device) for k, v in collate([examples[j] for j in micro], pad_id).items()
        }
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return weighted_loss(out.logits, batch["labels"], batch["weights"])

    checkpoints = CheckpointManager(
        Path(output_dir) / "checkpoints",
        keep=2,
        rank=accelerator.process_index,
        world_size=world,
        barrier=accelerator.wait_for_everyone,
    )
    settings = LoopSettings(
        steps=total_steps,
        phase="train",
        checkpoint_every=cfg.save_every,
        max_grad_norm=cfg.max_grad_norm,
        trainable_only=True,
        progress=progress,
    )
    state = run_loop(
        accelerator, model, optimizer, scheduler, windows.__getitem__, loss_fn, settings, checkpoints
    )
    accelerator.wait_for_everyone()
    losses = [row["train/loss"] for row in state.history]
    return {
        "steps": float(state.step),
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
    }


def save_model(
    model,
    tokenizer,
    output_dir: str | os.PathLike,
    *,
    name: str = "final",
    base_model_name_or_path: str | None = None,
    is_main_process: bool = True,
) -> Path:
    """Save the trained weights as safetensors and the tokenizer into `output_dir/name`, atomically (written
    to `name.tmp`, then renamed over `name`); returns that directory (on every rank).

    A QLoRA model (nf4lora) is saved as its LoRA adapters in peft's format (`nf4lora.save_adapter`), any
    other (a peft model: its adapters; a plain one: all weights) with `save_pretrained`. The trainable
    weights are checked finite first (`shared_kernels.finite`). A sharded model (FSDP2) is gathered into
    whole tensors first (`shared_kernels.distributed.full_state_dict`): a collective, so every rank calls
    this at the same point and only the main process writes.

    Args:
        model: the trained model (a DDP wrapper is unwrapped).
        tokenizer: saved beside the weights.
        output_dir: the run directory.
        name: the directory's name inside it.
        base_model_name_or_path: recorded in a QLoRA adapter's adapter_config.json (default: the model
            config's `_name_or_path`).
        is_main_process: whether this rank writes (the others only take part in the gathering).
    """
    final = Path(output_dir) / name
    tmp = final.with_name(f"{name}.tmp")
    unwrapped = getattr(model, "module", model)
    sharded = is_sharded(unwrapped)
    whole = full_state_dict(unwrapped, trainable_only=True) if sharded else None  # collective when sharded
    if not is_main_process:
        return final
    trained = (
        whole if whole is not None else {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    )
    check_finite_tensors(trained, str(final))
    shutil.rmtree(tmp, ignore_errors=True)
    if getattr(unwrapped, "nf4lora_settings", None) is not None:  # QLoRA: the adapters in peft's format
        from nf4lora.model import save_adapter

        save_adapter(unwrapped, tmp, base_model_name_or_path=base_model_name_or_path, state_dict=whole)
    elif sharded:
        unwrapped.save_pretrained(str(tmp), safe_serialization=True, state_dict=whole)
    else:
        unwrapped.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
