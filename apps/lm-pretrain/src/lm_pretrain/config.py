"""The lm-pretrain run config: model (siattn's small GPT), byte-level data, training, precision and
evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared_kernels.runconfig import option

PRECISIONS = ("fp32", "bf16", "mxfp8-rceil", "mxfp8-floor", "mxfp8-e5m2-grad")


@dataclass
class ModelConfig:
    """siattn.models.GPTConfig fields (byte-level: vocab 256)."""

    n_layer: int = option(2, "transformer blocks")
    d_model: int = option(64, "width")
    n_head: int = option(4, "query heads (head dim = d_model / n_head)")
    n_kv_head: int | None = option(None, "key/value heads (GQA); null = n_head")
    mlp_ratio: int = option(4, "MLP hidden width / d_model")
    position: Literal["rope", "p-rope", "nope", "alibi"] = option("p-rope", "positional encoding")
    attention: Literal["softmax", "si", "logn"] = option("si", "attention: softmax, scale-invariant or LogN")
    rope_base: float = option(10000.0, "RoPE theta (position=rope)")
    p_rope_fraction: float = option(0.5, "share of rotary pairs p-RoPE keeps rotating")
    p_rope_base: float = option(8.0, "p-RoPE base; keep 2*pi*base below the training context (REFERENCE s.6)")
    tau: float = option(10.0, "scale-invariant attention's tau")
    qk_norm: bool = option(True, "RMSNorm on q and k per head")

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("tau", "rope_base", "p_rope_base"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"model.{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 <= self.p_rope_fraction <= 1:
            raise ValueError(f"model.p_rope_fraction must be in [0, 1], got {self.p_rope_fraction}")
        if self.d_model % self.n_head:
            raise ValueError(f"model.n_head ({self.n_head}) must divide model.d_model ({self.d_model})")
        if self.position in ("rope", "p-rope") and (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"model.position={self.position} needs an even head dim (rotary pairs), got "
                f"model.d_model / model.n_head = {self.d_model // self.n_head}"
            )
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(
                f"model.n_kv_head ({self.n_kv_head}) must be >= 1 and divide model.n_head ({self.n_head})"
            )


@dataclass
class DataConfig:
    corpus: str = option(
        "stdlib",
        "'stdlib' (Python standard-library sources, present on every machine), 'tinyshakespeare' "
        "(../shared/data or $SHARED_DATA) or a path to a UTF-8 text file",
    )
    val_fraction: float = option(0.1, "tail share of the corpus held out for validation")
    max_bytes: int = option(4_000_000, "cap on corpus bytes read")

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_bytes < 1:
            raise ValueError(f"data.max_bytes must be >= 1, got {self.max_bytes}")


@dataclass
class TrainConfig:
    steps: int = option(300, "optimizer steps")
    seq_len: int = option(128, "training context (bytes)")
    batch_size: int = option(16, "global batch (sequences per optimizer step, all processes together)")
    micro_batch_size: int = option(
        8, "sequences per forward pass on one process (gradient accumulation fills the rest)"
    )
    lr: float = option(3e-3, "peak learning rate (AdamW)")
    warmup_steps: int = option(20, "linear warmup, then cosine decay to 10%")
    weight_decay: float = option(0.1, "AdamW weight decay")
    grad_clip: float = option(1.0, "max gradient norm (0 = off)")
    precision: Literal["fp32", "bf16", "mxfp8-rceil", "mxfp8-floor", "mxfp8-e5m2-grad"] = option(
        "fp32",
        "fp32, bf16 autocast, or an MXFP8 preset of mxfp8train (block linears; RCEIL, FLOOR, E5M2 grads)",
    )
    seed: int = option(0, "seed of initialisation and data order")
    log_every: int = option(10, "steps between metric logs")
    checkpoint_every: int = option(100, "steps between atomic checkpoints (0 = only at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept")

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "batch_size", "micro_batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr}")
        for name in ("warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"train.{name} must be a finite number >= 0, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    length_multipliers: list[int] = option(
        default_factory=lambda: [1, 4, 16], help="evaluate at seq_len x these"
    )
    windows: int = option(8, "validation windows per length")
    position_buckets: int = option(16, "buckets of the loss-by-position curve")

    def __post_init__(self) -> None:
        if not self.length_multipliers or min(self.length_multipliers) < 1:
            raise ValueError(
                f"eval.length_multipliers must be non-empty and >= 1, got {self.length_multipliers}"
            )
        if self.windows < 1:
            raise ValueError(f"eval.windows must be >= 1, got {self.windows}")


@dataclass
class PretrainConfig:
    run_dir: Path = option(
        Path("runs/lm-pretrain"), "run directory (config, logs, metrics, checkpoints, report)"
    )
    resume: bool = option(True, "resume from the run directory's latest checkpoint when there is one")
    trackers: list[str] = option(
        default_factory=lambda: ["auto"],
        help="accelerate trackers: auto (TensorBoard if installed), tensorboard, wandb, none",
    )
    model: ModelConfig = option(default_factory=ModelConfig, help="model")
    data: DataConfig = option(default_factory=DataConfig, help="data")
    train: TrainConfig = option(default_factory=TrainConfig, help="training")
    eval: EvalConfig = option(default_factory=EvalConfig, help="evaluation")


@dataclass
class StudyConfig:
    """A study: one base config and named variants, each a list of key=value overrides of it."""

    run_dir: Path = option(Path("runs/lm-pretrain-study"), "study directory (one run directory per variant)")
    base: PretrainConfig = option(default_factory=PretrainConfig, help="config shared by every variant")
    variants: dict[str, list[str]] = option(
        default_factory=lambda: {"si-p-rope/fp32": []}, help="variant name -> overrides of base"
    )
    seeds: list[int] = option(default_factory=lambda: [0], help="train.seed values; every variant runs each")

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("variants must name at least one variant")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
