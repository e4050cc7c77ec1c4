"""`nf4lora-study`: QLoRA's central claims at CPU scale (arXiv 2305.14314, Table 2 / Fig. 3 and Table 4).

Tiny byte-level Llamas (transformers `LlamaForCausalLM` from a config, ~1.9M parameters by default) are
pretrained here on one corpus (tinyshakespeare), `--bases N` of them (base seeds 0..N-1: the seed sets the
initialisation and the data order, nothing else), each saved once as safetensors and reused by later runs:
base 0 under `<out>/base` (or `--base-dir`), base s beside it as `base-seed<s>`. Then:

1. Storage types, zero-shot, on every base: every linear layer but the LM head is quantized and dequantized
   (what the 4-bit model computes with) to NF4, NF4+DQ, FP4 and symmetric absmax Int4 at blocksizes 64 and
   128; held-out loss of the pretraining corpus (`eval_loss`) and of the finetuning corpus's test split over
   `--zero-shot-windows` fixed windows, against that fp32 base. Summary: each storage type's degradation
   as mean and spread over bases, and paired t-tests across bases, NF4 vs FP4 and NF4 vs Int4.
2. Finetuning base 0 on a domain shift (Cranfield aerodynamics abstracts): `full-fp32` (every parameter),
   `lora-fp32` (peft LoRA on the fp32 base), `qlora-nf4` / `qlora-nf4-dq` / `qlora-fp4`
   (`nf4lora.prepare_model`, the real 4-bit storage, blocksize 64); the same steps, r, alpha, schedule and
   learning-rate grid for every variant. The learning rate is chosen per variant on the validation split
   with the first seed; the other seeds run at that rate; `eval_loss` is on the test split (documents
   disjoint from train and validation).

Seeds change only initialisation and data order: seed s draws the training windows with
`torch.Generator().manual_seed(1000 + s)` and initialises every LoRA `A` (kaiming-uniform(a=sqrt 5), that is
U(-1/sqrt(in), 1/sqrt(in))) from a generator keyed by (s, module name), so LoRA, QLoRA NF4/NF4+DQ/FP4 with the
same seed start from identical adapters and see identical batches (`B` is zero, dropout is 0); full
finetuning has no random initialisation. The base, the splits and the evaluation windows never change.

Memory per variant: `weight_bytes` (every stored weight: 4-bit codes and constants, 16/32-bit rest,
adapters), `train_state_bytes` (weights + gradients + AdamW state after a step) and `peak_rss_growth_bytes`
(process RSS sampled every 5 ms during training minus the RSS before it: noisy, includes activations and
allocator slack).

Outputs under --out, each written atomically; an interrupted study resumes (finished work is kept in the
base directories, `zero_shot/base<s>.json` and `runs/*.json`): `results.json` (config, machine, `records`:
one per zero-shot variant and base (`base_seed`) and per finetuning variant and seed, the lr sweep, the
summaries and paired tests), `results.md` (tables) and `study.png`. The machine figures in results.json
(wall time, load) are those of the last invocation, which may only have collected finished runs.

    nf4lora-study --out runs/nf4study          # the default study (3 bases; ~15 min on 2 idle cores, est.)
    nf4lora-study --out /tmp/nfq --quick       # smoke run, < 3 min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shared_kernels.runconfig import save_figure_atomic

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedModel

ZERO_SHOT_STORAGE = ("nf4", "nf4-dq", "fp4", "int4")
FINETUNE_VARIANTS = ("full-fp32", "lora-fp32", "qlora-nf4", "qlora-nf4-dq", "qlora-fp4")
VOCAB = 256  # bytes


@dataclass(frozen=True)
class StudyConfig:
    out: str = "nf4lora_study"
    pretrain_data: str | None = None  # default: <shared data>/tinyshakespeare/input.txt
    finetune_data: str | None = None  # default: <shared data>/cranfield/cran.all.1400
    base_dir: str | None = None  # default: <out>/base (reused when present)
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    context: int = 128
    batch_size: int = 8
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    finetune_steps: int = 100
    lrs: tuple[float, ...] = (1e-3, 4e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    r: int = 8
    alpha: float = 16.0
    blocksizes: tuple[int, ...] = (64, 128)
    eval_windows: int = 64
    bases: int = 3
    zero_shot_windows: int = 512
    max_grad_norm: float = 0.3
    jobs: int = 2
    threads: int = 1

    def __post_init__(self) -> None:
        for name in (
            "hidden",
            "layers",
            "heads",
            "intermediate",
            "context",
            "batch_size",
            "pretrain_steps",
            "finetune_steps",
            "r",
            "eval_windows",
            "bases",
            "zero_shot_windows",
            "jobs",
            "threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden ({self.hidden}) must be a multiple of --heads ({self.heads})")
        if (self.hidden // self.heads) % 2:
            raise ValueError(
                f"--hidden / --heads (the head dim, {self.hidden // self.heads}) must be even (RoPE)"
            )
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"--lrs must be positive learning rates, got {self.lrs}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"--seeds must be distinct non-negative integers, got {self.seeds}")
        from shared_kernels.nf4 import check_blocksize

        for b in self.blocksizes:
            check_blocksize(b, "--blocksizes")


QUICK: dict[str, Any] = dict(
    hidden=64,
    layers=2,
    heads=2,
    intermediate=128,
    context=64,
    batch_size=4,
    pretrain_steps=80,
    finetune_steps=15,
    lrs=(1e-3, 3e-3),
    seeds=(0, 1),
    eval_windows=16,
    bases=2,
    zero_shot_windows=16,
)


# ----------------------------------------------------------------------------------------------- data


def _default(path: str | None, *parts: str) -> Path:
    if path is not None:
        return Path(path)
    from shared_kernels.testing import shared_data_dir

    root = shared_data_dir()
    return (root if root is not None else Path("../shared/data")).joinpath(*parts)


def _as_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def _check_size(name: str, path: Path, split: str, t: torch.Tensor, context: int) -> None:
    if len(t) < 2 * (context + 2):
        raise ValueError(
            f"{name} {path}: the {split} split has {len(t)} bytes, need at least {2 * (context + 2)}"
        )


@lru_cache(maxsize=4)
def pretrain_splits(path: Path, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of a text file split by position: first 90% train, last 10% held out."""
    if not path.is_file():
        raise ValueError(f"--pretrain-data: file not found: {path}")
    data = _as_bytes(path.read_text(encoding="utf-8", errors="replace"))
    cut = int(0.9 * len(data))
    train, held = data[:cut], data[cut:]
    for split, t in (("train", train), ("held-out", held)):
        _check_size("--pretrain-data", path, split, t, context)
    return train, held


def cranfield_abstracts(text: str) -> list[str]:
    """The `.W` fields of a SMART-format collection (cran.all.1400), in file order."""
    docs: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(".I"):
            if current is not None:
                docs.append(" ".join(current).strip())
            current = None
        elif line.startswith(".W"):
            current = []
        elif line.startswith((".T", ".A", ".B")) and current is not None:
            current = None
        elif current is not None:
            current.append(line.strip())
    if current is not None:
        docs.append(" ".join(current).strip())
    return [d for d in docs if d]


@lru_cache(maxsize=4)
def finetune_splits(path: Path, context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, validation, test) bytes: documents 0-80% / 80-90% / 90-100% of a SMART collection (`.W`
    abstracts joined by blank lines), or, for a plain text file, its bytes split by position the same way."""
    if not path.is_file():
        raise ValueError(f"--finetune-data: file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    docs = cranfield_abstracts(text) if "\n.W" in text or text.startswith(".W") else None
    if docs is not None:
        a, b = int(0.8 * len(docs)), int(0.9 * len(docs))
        parts = ["\n\n".join(docs[:a]), "\n\n".join(docs[a:b]), "\n\n".join(docs[b:])]
        splits = (_as_bytes(parts[0]), _as_bytes(parts[1]), _as_bytes(parts[2]))
    else:
        data = _as_bytes(text)
        a, b = int(0.8 * len(data)), int(0.9 * len(data))
        splits = (data[:a], data[a:b], data[b:])
    for split, t in zip(("train", "validation", "test"), splits, strict=True):
        _check_size("--finetune-data", path, split, t, context)
    return splits


def train_windows(data: torch.Tensor, steps: int, batch: int, context: int, seed: int) -> torch.Tensor:
    """(steps, batch) window starts: the data order of one seed."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, len(data) - context - 1, (steps, batch), generator=g)


def _batch(data: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    return data[starts[:, None] + torch.arange(context + 1)]  # (B, T + 1): HF shifts the labels


@torch.no_grad()
def eval_loss(model: nn.Module, data: torch.Tensor, cfg: StudyConfig, windows: int | None = None) -> float:
    """Mean next-byte loss (nats) over `windows` (default `cfg.eval_windows`) fixed windows spread evenly
    over `data`."""
    model.eval()
    starts = torch.linspace(0, len(data) - cfg.context - 2, windows or cfg.eval_windows).long()
    total = 0.0
    for chunk in starts.split(cfg.batch_size):
        ids = _batch(data, chunk, cfg.context)
        total += model(input_ids=ids, labels=ids).loss.item() * len(chunk)
    model.train()
    return total / len(starts)


# ----------------------------------------------------------------------------------------------- base


def _load_base(base_dir: Path) -> PreTrainedModel:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    return LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)


def base_dir_for(cfg: StudyConfig, base_seed: int) -> Path:
    """Where the base of `base_seed` is kept: `--base-dir` (default `<out>/base`) for seed 0, the one the
    finetuning variants start from, and `<that>-seed<s>` beside it for the other bases."""
    first = Path(cfg.base_dir) if cfg.base_dir else Path(cfg.out) / "base"
    return first if base_seed == 0 else first.with_name(f"{first.name}-seed{base_seed}")


def _cached_base(cfg: StudyConfig, base_dir: Path, base_seed: int) -> dict[str, Any] | None:
    """The info of a finished base in `base_dir` (None if there is none); refuses one of another shape or
    seed. Bases saved before `base_seed` existed were all seed 0."""
    info_path = base_dir / "base.json"
    if not (info_path.is_file() and (base_dir / "model.safetensors").is_file()):
        return None
    info: dict[str, Any] = json.loads(info_path.read_text())
    arch = {k: getattr(cfg, k) for k in ("hidden", "layers", "heads", "intermediate")}
    if info.get("arch") != arch:
        raise ValueError(f"--base-dir {base_dir} holds a base of shape {info.get('arch')}, not {arch}")
    if info.get("base_seed", 0) != base_seed:
        raise ValueError(f"--base-dir {base_dir} holds base seed {info.get('base_seed', 0)}, not {base_seed}")
    return {**info, "base_seed": base_seed}


def pretrain_base(cfg: StudyConfig, base_dir: Path, base_seed: int = 0) -> dict[str, Any]:
    """Pretrain the base of `base_seed` on the pretraining corpus and save it (safetensors) unless `base_dir`
    has it. The base seed sets the initialisation and the data order (seed 0 is the study's first base);
    everything else (corpus, steps, schedule) is the same for every base."""
    from shared_kernels.runconfig import write_json_atomic

    cached = _cached_base(cfg, base_dir, base_seed)
    if cached is not None:
        return cached
    from transformers import LlamaConfig, LlamaForCausalLM

    train, held = pretrain_splits(_default(cfg.pretrain_data, "tinyshakespeare", "input.txt"), cfg.context)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.context + 1,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(base_seed)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, cfg.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / cfg.pretrain_steps))))
        ),
    )
    # data order: -999 - base_seed (never a finetuning seed's generator)
    starts = train_windows(train, cfg.pretrain_steps, cfg.batch_size, cfg.context, seed=-999 - base_seed)
    c0 = time.process_time()
    for step in range(cfg.pretrain_steps):
        ids = _batch(train, starts[step], cfg.context)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    info = {
        "base_seed": base_seed,
        "arch": {k: getattr(cfg, k) for k in ("hidden", "layers", "heads", "intermediate")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": cfg.pretrain_steps,
        "final_train_loss": loss.item(),
        "held_out_loss": eval_loss(model, held, cfg),
        "cpu_seconds": time.process_time() - c0,
    }
    tmp = base_dir.with_name(base_dir.name + ".tmp")
    base_dir.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    write_json_atomic(tmp / "base.json", info)
    if base_dir.exists():  # a stale partial directory without base.json
        import shutil

        shutil.rmtree(base_dir)
    os.replace(tmp, base_dir)
    return info


# ------------------------------------------------------------------------------------- storage types


def roundtrip(w: torch.Tensor, storage: str, blocksize: int) -> tuple[torch.Tensor, int]:
    """Quantize `w` to a 4-bit storage type and back: (fp32 values the 4-bit model computes with, stored
    bytes of codes + constants)."""
    if storage in ("nf4", "nf4-dq", "fp4"):
        from nf4lora.weight import NF4Weight

        q = NF4Weight.from_float(
            w, blocksize, storage == "nf4-dq", quant_type="fp4" if storage == "fp4" else "nf4"
        )
        return q.dequantize(torch.float32), q.nbytes
    if storage == "int4":
        from nf4lora.int4 import dequantize_int4, quantize_int4

        packed, absmax = quantize_int4(w, blocksize)
        return dequantize_int4(packed, absmax, tuple(w.shape), blocksize), packed.numel() + absmax.numel() * 4
    raise ValueError(f"storage must be one of {ZERO_SHOT_STORAGE}, got {storage!r}")


def bits_per_param(storage: str, blocksize: int) -> float:
    """Bits per quantized parameter as the paper counts them: 4-bit codes + per-block constants (fp32, or for
    NF4+DQ 8-bit constants + fp32 second-level constants per 256 blocks); per-tensor offsets and code tables
    are not counted (`weight_bytes` counts every stored byte)."""
    if storage == "nf4-dq":
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize


def _quantizable(model: PreTrainedModel) -> list[tuple[str, nn.Linear]]:
    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]


@torch.no_grad()
def fake_quantize(model: PreTrainedModel, storage: str, blocksize: int) -> int:
    """Replace every linear weight but the LM head by its 4-bit round trip in place; returns the bytes the
    model's weights take with those linears stored in 4 bits (everything else as it is)."""
    dense = _dense_bytes(model)
    for _, m in _quantizable(model):
        values, nbytes = roundtrip(m.weight, storage, blocksize)
        dense += nbytes - m.weight.numel() * m.weight.element_size()
        m.weight.copy_(values)
    return dense


def _dense_bytes(model: nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr() if t.numel() else id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def zero_shot(cfg: StudyConfig, base_dir: Path, base_seed: int = 0) -> list[dict[str, Any]]:
    """Records of one fp32 base and of every storage type x blocksize, quantized without training; losses
    over `zero_shot_windows` windows of each held-out split (the same windows for every storage type)."""
    _, held = pretrain_splits(_default(cfg.pretrain_data, "tinyshakespeare", "input.txt"), cfg.context)
    _, _, test = finetune_splits(_default(cfg.finetune_data, "cranfield", "cran.all.1400"), cfg.context)
    records = []
    for storage, blocksize in [("fp32", None), *[(s, b) for s in ZERO_SHOT_STORAGE for b in cfg.blocksizes]]:
        model = _load_base(base_dir)
        dense = _dense_bytes(model)
        nbytes = dense if blocksize is None else fake_quantize(model, storage, blocksize)
        name = "base-fp32" if blocksize is None else f"{storage}-b{blocksize}"
        records.append(
            {
                "kind": "zero-shot",
                "variant": name,
                "storage": storage,
                "blocksize": blocksize,
                "seed": None,
                "base_seed": base_seed,
                "eval_loss": eval_loss(model, held, cfg, cfg.zero_shot_windows),
                "eval_loss_finetune_test": eval_loss(model, test, cfg, cfg.zero_shot_windows),
                "weight_bytes": nbytes,
                "train_state_bytes": None,
                "peak_rss_growth_bytes": None,
                "linear_bits_per_param": 32.0 if blocksize is None else bits_per_param(storage, blocksize),
            }
        )
    return records


# ------------------------------------------------------------------------------------------ finetuning


def init_adapters(model: nn.Module, seed: int) -> int:
    """Re-initialise every LoRA `A` from a generator keyed by (seed, module name), the same for peft's and
    nf4lora's modules (`...q_proj.lora_A.default.weight` and `...q_proj.lora_A.weight`), and zero every `B`.
    Returns the number of adapters."""
    n = 0
    for name, p in model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".default.", ".")
        with torch.no_grad():
            if ".lora_B." in name:
                p.zero_()
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)) on an (r, in) weight
            p.copy_(torch.rand(p.shape, generator=g) * (2 * bound) - bound)
            n += 1
    return n


def build_variant(variant: str, base_dir: Path, cfg: StudyConfig, seed: int) -> tuple[nn.Module, int]:
    """The model of one finetuning variant, adapters initialised for `seed`; returns (model, weight bytes)."""
    from nf4lora.memory import memory_report
    from nf4lora.model import prepare_model

    model = _load_base(base_dir)
    if variant == "full-fp32":
        return model, _dense_bytes(model)
    if variant in ("qlora-nf4", "qlora-nf4-dq", "qlora-fp4"):
        prepare_model(
            model,
            r=cfg.r,
            alpha=cfg.alpha,
            dropout=0.0,
            double_quant=variant == "qlora-nf4-dq",
            blocksize=64,
            gradient_checkpointing=False,
            quant_type=variant.split("-")[1],
        )
        init_adapters(model, seed)
        return model, memory_report(model).total
    if variant != "lora-fp32":
        raise ValueError(f"variant must be one of {FINETUNE_VARIANTS}, got {variant!r}")
    from peft import LoraConfig, get_peft_model

    # peft annotates lora_alpha as int but only ever divides by it (scaling = alpha / r): a float is fine
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules="all-linear")  # type: ignore[arg-type]
    peft_model = get_peft_model(model, lora)
    init_adapters(peft_model, seed)
    return peft_model, _dense_bytes(peft_model)


class _PeakRSS:
    """Peak resident set size of this process, sampled every `interval` s on a thread (Linux /proc)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss(self) -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * self.page
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> _PeakRSS:
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _grad_and_optimizer_bytes(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> int:
    grads = sum(_tensor_bytes(p.grad) for p in params if p.grad is not None)
    state = sum(
        _tensor_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    return grads + state


def finetune_run(cfg: StudyConfig, base_dir: Path, variant: str, lr: float, seed: int) -> dict[str, Any]:
    """Train one variant at one lr and seed; returns its record (validation and test loss, memory, time)."""
    torch.set_num_threads(cfg.threads)
    train, val, test = finetune_splits(_default(cfg.finetune_data, "cranfield", "cran.all.1400"), cfg.context)
    c0, t0 = time.process_time(), time.perf_counter()
    model, weight_bytes = build_variant(variant, base_dir, cfg, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, cfg.finetune_steps // 10)  # then constant, as QLoRA
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    starts = train_windows(train, cfg.finetune_steps, cfg.batch_size, cfg.context, seed)
    model.train()
    state_bytes = 0
    with _PeakRSS() as rss:
        for step in range(cfg.finetune_steps):
            ids = _batch(train, starts[step], cfg.context)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            if step == 0:  # weights + gradients + AdamW state, all allocated now
                state_bytes = weight_bytes + _grad_and_optimizer_bytes(params, opt)
            opt.zero_grad(set_to_none=True)
    return {
        "kind": "finetune",
        "variant": variant,
        "seed": seed,
        "lr": lr,
        "eval_loss": eval_loss(model, test, cfg),
        "val_loss": eval_loss(model, val, cfg),
        "final_train_loss": loss.item(),
        "trainable_params": sum(p.numel() for p in params),
        "weight_bytes": weight_bytes,
        "train_state_bytes": state_bytes,
        "peak_rss_growth_bytes": rss.peak - rss.start,
        "cpu_seconds": time.process_time() - c0,
        "wall_seconds": time.perf_counter() - t0,
    }


def _run_file(out: Path, variant: str, lr: float, seed: int) -> Path:
    return out / "runs" / f"{variant}_lr{lr:g}_s{seed}.json"


def _job(cfg: StudyConfig, base_dir: Path, variant: str, lr: float, seed: int) -> dict[str, Any]:
    """One run, skipped when its file exists (resume); the record is written atomically when done."""
    from shared_kernels.runconfig import write_json_atomic

    path = _run_file(Path(cfg.out), variant, lr, seed)
    if path.is_file():
        return json.loads(path.read_text())
    record = finetune_run(cfg, base_dir, variant, lr, seed)
    write_json_atomic(path, record)
    print(
        f"  {variant:<13} lr={lr:<7g} seed={seed}  val {record['val_loss']:.4f}"
        f"  test {record['eval_loss']:.4f}  ({record['cpu_seconds']:.0f} cpu-s)",
        flush=True,
    )
    return record


def _zero_shot_file(out: Path, base_seed: int) -> Path:
    return out / "zero_shot" / f"base{base_seed}.json"


def _base_job(cfg: StudyConfig, base_seed: int) -> dict[str, Any]:
    """One base, pretrained (or reused) with its zero-shot records (or reused; written atomically)."""
    from shared_kernels.runconfig import write_json_atomic

    torch.set_num_threads(cfg.threads)
    base_dir = base_dir_for(cfg, base_seed)
    info = pretrain_base(cfg, base_dir, base_seed)
    path = _zero_shot_file(Path(cfg.out), base_seed)
    if path.is_file():
        return {"base": info, "zero_shot": json.loads(path.read_text())}
    records = zero_shot(cfg, base_dir, base_seed)
    write_json_atomic(path, records)
    fp32 = records[0]["eval_loss"]
    shifts = "  ".join(f"{r['variant']} {r['eval_loss'] - fp32:+.4f}" for r in records[1:])
    print(f"  base {base_seed}: held-out {fp32:.4f}; zero-shot {shifts}", flush=True)
    return {"base": info, "zero_shot": records}


def _in_workers(cfg: StudyConfig, fn: Any, calls: list[tuple[Any, ...]], pending: int) -> list[Any]:
    """`[fn(cfg, *c) for c in calls]`, on `cfg.jobs` spawned processes when more than one call has work to
    do (`pending`); no worker processes just to read finished results."""
    if cfg.jobs == 1 or pending <= 1:
        return [fn(cfg, *c) for c in calls]
    with ProcessPoolExecutor(min(cfg.jobs, len(calls)), mp_context=get_context("spawn")) as pool:
        return list(pool.map(fn, *zip(*[(cfg, *c) for c in calls], strict=True)))


def _run_all(cfg: StudyConfig, base_dir: Path, jobs: list[tuple[str, float, int]]) -> list[dict[str, Any]]:
    pending = sum(not _run_file(Path(cfg.out), *j).is_file() for j in jobs)
    return _in_workers(cfg, _job, [(base_dir, *j) for j in jobs], pending)


def _all_bases(cfg: StudyConfig) -> list[dict[str, Any]]:
    seeds = range(cfg.bases)
    pending = sum(not _zero_shot_file(Path(cfg.out), s).is_file() for s in seeds)
    return _in_workers(cfg, _base_job, [(s,) for s in seeds], pending)


# ---------------------------------------------------------------------------------------------- report


def _spread(values: list[float]) -> dict[str, Any]:
    """n, mean, sample standard deviation (0 for one value), min and max."""
    t = torch.tensor(values, dtype=torch.float64)
    return {
        "n": len(values),
        "mean": t.mean().item(),
        "std": t.std().item() if len(values) > 1 else 0.0,
        "min": t.min().item(),
        "max": t.max().item(),
    }


def _paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Paired two-sided t-test (`shared_kernels.significance`, = scipy `ttest_rel`) of a[k] - b[k] over the
    keys both have."""
    from shared_kernels.significance import paired_t_test

    keys = sorted(set(a) & set(b))
    result: dict[str, Any] = {"n": len(keys)}
    if len(keys) < 2:
        return {**result, "note": "needs at least 2 pairs"}
    diffs = torch.tensor([a[k] - b[k] for k in keys], dtype=torch.float64)
    t, p = paired_t_test([a[k] for k in keys], [b[k] for k in keys])
    return {**result, "mean_diff": diffs.mean().item(), "std_diff": diffs.std().item(), "t": t, "p": p}


def zero_shot_summary(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per storage type x blocksize: its degradation on each base (eval_loss minus that base's fp32 loss,
    listed in `base_seeds` order) and their spread over bases; the same on the finetuning corpus's test
    split (`*_finetune_test`). Key `base-fp32`: the fp32 bases' own losses."""
    zs = [r for r in records if r["kind"] == "zero-shot"]
    fp32 = {r["base_seed"]: r for r in zs if r["blocksize"] is None}
    seeds = sorted(fp32)
    out: dict[str, dict[str, Any]] = {
        "base-fp32": {
            "base_seeds": seeds,
            "eval_loss": _spread([fp32[s]["eval_loss"] for s in seeds]),
            "eval_loss_finetune_test": _spread([fp32[s]["eval_loss_finetune_test"] for s in seeds]),
        }
    }
    for variant in dict.fromkeys(r["variant"] for r in zs if r["blocksize"] is not None):
        rs = sorted((r for r in zs if r["variant"] == variant), key=lambda r: r["base_seed"])
        delta = [r["eval_loss"] - fp32[r["base_seed"]]["eval_loss"] for r in rs]
        delta_ft = [
            r["eval_loss_finetune_test"] - fp32[r["base_seed"]]["eval_loss_finetune_test"] for r in rs
        ]
        out[variant] = {
            "storage": rs[0]["storage"],
            "blocksize": rs[0]["blocksize"],
            "linear_bits_per_param": rs[0]["linear_bits_per_param"],
            "weight_bytes": rs[0]["weight_bytes"],
            "base_seeds": [r["base_seed"] for r in rs],
            "delta": delta,
            "delta_finetune_test": delta_ft,
            **_spread(delta),
            "finetune_test": _spread(delta_ft),
        }
    return out


ZERO_SHOT_PAIRS = (("nf4", "fp4"), ("nf4", "int4"))


def zero_shot_tests(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired t-tests across bases of the held-out degradation, NF4 vs FP4 and NF4 vs Int4, per blocksize
    (a negative mean difference: NF4 degrades less)."""
    tests = []
    blocksizes = sorted({s["blocksize"] for k, s in summary.items() if k != "base-fp32"})
    for b in blocksizes:
        for a, c in ZERO_SHOT_PAIRS:
            va, vc = summary.get(f"{a}-b{b}"), summary.get(f"{c}-b{b}")
            if va is None or vc is None:
                continue
            xa = dict(zip(va["base_seeds"], va["delta"], strict=True))
            xc = dict(zip(vc["base_seeds"], vc["delta"], strict=True))
            tests.append({"a": va["storage"], "b": vc["storage"], "blocksize": b, **_paired(xa, xc)})
    return tests


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per finetuning variant: n, mean, sample std, min, max of eval_loss; mean memory figures."""
    out: dict[str, dict[str, Any]] = {}
    for v in FINETUNE_VARIANTS:
        rs = [r for r in records if r["kind"] == "finetune" and r["variant"] == v]
        if not rs:
            continue
        out[v] = {
            "lr": rs[0]["lr"],
            **_spread([r["eval_loss"] for r in rs]),
            **{
                k: max(r[k] for r in rs)
                for k in ("weight_bytes", "train_state_bytes", "peak_rss_growth_bytes")
            },
        }
    return out


def paired_test(
    records: list[dict[str, Any]], a: str = "qlora-nf4-dq", b: str = "lora-fp32"
) -> dict[str, Any]:
    """Paired t-test over seeds of eval_loss(a) - eval_loss(b) (two-sided, `_paired`)."""
    by = {
        v: {r["seed"]: r["eval_loss"] for r in records if r["kind"] == "finetune" and r["variant"] == v}
        for v in (a, b)
    }
    seeds = sorted(set(by[a]) & set(by[b]))
    result = {"a": a, "b": b, "seeds": seeds, **_paired(by[a], by[b])}
    if "p" not in result:
        return {**result, "note": "needs at least 2 seeds"}
    return {**result, "within_seed_noise": bool(result["p"] >= 0.05)}


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.3f}"


def _zero_shot_markdown(results: dict[str, Any]) -> list[str]:
    zs = results["zero_shot_summary"]
    fp32 = zs["base-fp32"]
    n = len(fp32["base_seeds"])
    lines = [
        "### Zero-shot storage types (every linear but the LM head quantized; no training)",
        "",
        f"{n} fp32 base(s), base seeds {fp32['base_seeds']}: held-out loss (pretraining corpus) "
        f"{fp32['eval_loss']['mean']:.4f} +- {fp32['eval_loss']['std']:.4f}, finetune-corpus test loss "
        f"{fp32['eval_loss_finetune_test']['mean']:.4f} +- {fp32['eval_loss_finetune_test']['std']:.4f} "
        "(mean +- std over bases). Below: each storage type's loss minus its own base's, over the bases.",
        "",
        "| storage | bits/param (linears) | held-out loss - fp32: mean +- std | min .. max | "
        "finetune-corpus test loss - fp32: mean +- std | weights (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for variant, z in zs.items():
        if variant == "base-fp32":
            continue
        lines.append(
            f"| {variant} | {z['linear_bits_per_param']:.3f} | {z['mean']:+.4f} +- {z['std']:.4f} | "
            f"{z['min']:+.4f} .. {z['max']:+.4f} | {z['finetune_test']['mean']:+.4f} +- "
            f"{z['finetune_test']['std']:.4f} | {_mib(z['weight_bytes'])} |"
        )
    lines.append("")
    for t in results["zero_shot_tests"]:
        head = f"Paired t-test across {t['n']} bases, {t['a']} - {t['b']} at blocksize {t['blocksize']}"
        if "p" not in t:
            lines.append(f"{head}: {t['note']}.")
            continue
        lines.append(
            f"{head}: mean {t['mean_diff']:+.4f} (std {t['std_diff']:.4f}), t = {t['t']:.3f}, "
            f"p = {t['p']:.3g}."
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines = _zero_shot_markdown(results)
    lines += [
        "",
        "### Finetuning on the shifted corpus (test loss over seeds, lr chosen on validation)",
        "",
        "| variant | lr | seeds | test loss mean | std | min .. max | weights (MiB) | "
        "weights+grads+AdamW (MiB) | peak RSS growth (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v, s in results["summary"].items():
        lines.append(
            f"| {v} | {s['lr']:g} | {s['n']} | {s['mean']:.4f} | {s['std']:.4f} | "
            f"{s['min']:.4f} .. {s['max']:.4f} | {_mib(s['weight_bytes'])} | "
            f"{_mib(s['train_state_bytes'])} | {_mib(s['peak_rss_growth_bytes'])} |"
        )
    pt = results["paired_test"]
    lines += [""]
    if "p" in pt:
        lines.append(
            f"Paired t-test over seeds {pt['seeds']}, {pt['a']} - {pt['b']}: mean {pt['mean_diff']:+.4f} "
            f"(std {pt['std_diff']:.4f}), t = {pt['t']:.3f}, p = {pt['p']:.3g}: "
            + ("within seed noise (p >= 0.05)." if pt["within_seed_noise"] else "a difference (p < 0.05).")
        )
    else:
        lines.append(f"Paired test {pt['a']} vs {pt['b']}: {pt['note']}.")
    return "\n".join(lines) + "\n"


STORAGE_LABELS = {"nf4": "NF4", "nf4-dq": "NF4+DQ", "fp4": "FP4", "int4": "Int4"}


def _plot_zero_shot(ax: Any, results: dict[str, Any]) -> None:
    """Bars: mean degradation over bases per storage type and blocksize; error bars: std; dots: each base."""
    zs = {k: v for k, v in results["zero_shot_summary"].items() if k != "base-fp32"}
    blocksizes = sorted({z["blocksize"] for z in zs.values()})
    width = 0.8 / max(len(blocksizes), 1)
    tops = [0.0]
    for i, b in enumerate(blocksizes):
        xs = [k + i * width for k in range(len(ZERO_SHOT_STORAGE))]
        cells = [zs[f"{s}-b{b}"] for s in ZERO_SHOT_STORAGE]
        ax.bar(xs, [z["mean"] for z in cells], width, color=f"C{i}", alpha=0.6, label=f"blocksize {b}")
        ax.errorbar(
            xs,
            [z["mean"] for z in cells],
            yerr=[z["std"] for z in cells],
            fmt="none",
            ecolor="0.2",
            capsize=4,
            label="mean ± std" if i == 0 else None,
        )
        for x, z in zip(xs, cells, strict=True):  # the bases, beside the whisker
            ax.scatter([x + width / 4] * len(z["delta"]), z["delta"], color="k", s=10, zorder=3)
        tops += [max(z["mean"] + z["std"], *z["delta"]) for z in cells]
    ax.scatter([], [], color="k", s=10, label="one base")
    ax.axhline(0.0, color="grey", lw=0.8)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, max(tops) + 0.45 * (max(tops) - lo))  # headroom for the legend above the data
    ax.set_xticks(
        [k + width * (len(blocksizes) - 1) / 2 for k in range(len(ZERO_SHOT_STORAGE))],
        [STORAGE_LABELS[s] for s in ZERO_SHOT_STORAGE],
    )
    ax.set_xlabel("4-bit storage type")
    ax.set_ylabel("held-out loss - fp32 base (nats/byte)")
    n = len(results["zero_shot_summary"]["base-fp32"]["base_seeds"])
    ax.set_title(f"zero-shot degradation of the 4-bit storage types\nover {n} pretrained bases")
    ax.legend(loc="upper center", ncol=2, fontsize="small")


def _plot_finetune(ax: Any, results: dict[str, Any]) -> None:
    summary = results["summary"]
    for k, v in enumerate(summary):
        ys = [r["eval_loss"] for r in results["records"] if r["kind"] == "finetune" and r["variant"] == v]
        ax.scatter([k] * len(ys), ys, color="grey", s=14, zorder=3, label="a seed" if k == 0 else None)
        ax.errorbar(
            [k + 0.15],
            [summary[v]["mean"]],
            yerr=[summary[v]["std"]],
            fmt="o",
            color="C3",
            capsize=5,
            label="mean ± std" if k == 0 else None,
        )
    ax.set_xticks(range(len(summary)), list(summary), rotation=20, ha="right")
    ax.set_xlim(-0.5, len(summary) - 0.5)
    ax.set_xlabel("finetuning variant")
    ax.set_ylabel("test loss after finetuning (nats/byte)")
    ax.set_title("finetuning on the shifted corpus\n(lr chosen per variant on validation)")
    ax.legend(loc="best", fontsize="small")


def plot(results: dict[str, Any], path: Path) -> None:
    """The study's figure, written atomically: zero-shot degradation (left), finetuned test loss (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.6))
    _plot_zero_shot(ax0, results)
    _plot_finetune(ax1, results)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


# ------------------------------------------------------------------------------------------------- CLI


def _machine() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "torch_threads_per_run": None,
        "loadavg_start": os.getloadavg(),
    }


def _check_config(cfg: StudyConfig, out: Path, pretrain_path: Path, finetune_path: Path) -> dict[str, Any]:
    """The config recorded in `<out>/config.json`; refuses an `--out` that holds runs of another one."""
    from shared_kernels.runconfig import write_json_atomic

    config = {
        **dataclasses.asdict(cfg),
        "pretrain_data": str(pretrain_path),
        "finetune_data": str(finetune_path),
    }
    config_path = out / "config.json"
    keep = ("out", "jobs", "threads", "base_dir", "bases")  # more or fewer bases reuse the finished ones
    if config_path.is_file():
        old = json.loads(config_path.read_text())
        changed = sorted(
            k for k in config if k not in keep and json.loads(json.dumps(config[k])) != old.get(k)
        )
        if changed:
            raise ValueError(
                f"--out {out} holds runs of another configuration ({', '.join(changed)} differ); "
                "use a new --out"
            )
    write_json_atomic(config_path, config)
    return config


def _finetune_all(cfg: StudyConfig, base_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(lr sweep with the first seed, chosen-lr runs of every seed sorted by variant and seed)."""
    sweep = _run_all(cfg, base_dir, [(v, lr, cfg.seeds[0]) for v in FINETUNE_VARIANTS for lr in cfg.lrs])
    best = {
        v: min((r for r in sweep if r["variant"] == v), key=lambda r: r["val_loss"])["lr"]
        for v in FINETUNE_VARIANTS
    }
    rest = _run_all(cfg, base_dir, [(v, best[v], s) for v in FINETUNE_VARIANTS for s in cfg.seeds[1:]])
    chosen = [r for r in sweep if r["lr"] == best[r["variant"]]] + rest
    return sweep, sorted(chosen, key=lambda r: (FINETUNE_VARIANTS.index(r["variant"]), r["seed"]))


def run_study(cfg: StudyConfig, command: str = "") -> dict[str, Any]:
    """The whole study (resuming finished work); returns the results dict that is written to results.json."""
    from shared_kernels.runconfig import write_json_atomic, write_text_atomic

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    # fail early and clearly on missing data
    pretrain_path = _default(cfg.pretrain_data, "tinyshakespeare", "input.txt")
    finetune_path = _default(cfg.finetune_data, "cranfield", "cran.all.1400")
    pretrain_splits(pretrain_path, cfg.context)
    finetune_splits(finetune_path, cfg.context)
    config = _check_config(cfg, out, pretrain_path, finetune_path)
    machine = {**_machine(), "torch_threads_per_run": cfg.threads}
    c0, t0 = time.process_time(), time.perf_counter()
    print(f"bases 0..{cfg.bases - 1}: {base_dir_for(cfg, 0)} (finetuning base) and beside it", flush=True)
    bases = _all_bases(cfg)
    zero = [r for b in bases for r in b["zero_shot"]]
    sweep, chosen = _finetune_all(cfg, base_dir_for(cfg, 0))
    records = zero + chosen
    machine.update(
        loadavg_end=os.getloadavg(),
        main_process_cpu_seconds=time.process_time() - c0,
        runs_cpu_seconds=sum(r["cpu_seconds"] for r in sweep + chosen if r["seed"] != cfg.seeds[0])
        + sum(r["cpu_seconds"] for r in sweep),
        pretrain_cpu_seconds=sum(b["base"]["cpu_seconds"] for b in bases),
        wall_seconds=time.perf_counter() - t0,
    )
    zs_summary = zero_shot_summary(records)
    results = {
        "command": command,
        "config": config,
        "machine": machine,
        "base": bases[0]["base"],
        "bases": [b["base"] for b in bases],
        "records": records,
        "lr_sweep": [{k: r[k] for k in ("variant", "lr", "seed", "val_loss", "eval_loss")} for r in sweep],
        "chosen_lr": {r["variant"]: r["lr"] for r in chosen},
        "zero_shot_summary": zs_summary,
        "zero_shot_tests": zero_shot_tests(zs_summary),
        "summary": summarise(records),
        "paired_test": paired_test(records),
    }
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", f"Command: `{command}`\n\n" + markdown(results))
    plot(results, out / "study.png")
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nf4lora-study",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory (created; a finished run there is resumed)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke configuration (< 3 min on 2 cores): " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    for f in dataclasses.fields(StudyConfig):
        if f.name == "out":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind: Callable[[str], Any]
        if f.name in ("lrs", "seeds", "blocksizes"):
            kind = float if f.name == "lrs" else int
            p.add_argument(flag, type=kind, nargs="+", default=None, help=f"default {f.default}")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=None, help=f"default {f.default}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {
        k: (tuple(v) if isinstance(v, list) else v)
        for k, v in vars(args).items()
        if k not in ("out", "quick") and v is not None
    }
    command = "nf4lora-study " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        cfg = StudyConfig(out=args.out, **{**(QUICK if args.quick else {}), **overrides})
        results = run_study(cfg, command)
    except (ValueError, OSError) as e:
        print(f"nf4lora-study: error: {e}", file=sys.stderr)
        return 2
    print(markdown(results))
    print(f"wrote {Path(cfg.out) / 'results.json'}, results.md, study.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
