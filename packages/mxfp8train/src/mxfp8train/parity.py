"""The BF16-vs-MXFP8 parity experiment: one small byte-level GPT trained from each seed once per variant
(a paired design: for seed s every variant starts from the same initialization, torch seed s, and sees the
same data order, seed s + 1), changing only the number format of the block linears' GEMM operands.

Variants (the first four run by default):
    bf16                     GEMM operands X, W, dY rounded to bf16, fp32 accumulation (the baseline)
    mxfp8-rceil              the paper's recipe: E4M3 everywhere, RCEIL scales, all three GEMMs
    mxfp8-floor              the OCP FLOOR scale rule instead
    mxfp8-rceil-e5m2-grads   RCEIL with E5M2 gradients
    fp32                     no rounding at all (how much bf16 itself costs)
    mxfp8-rceil-fwd-only     RCEIL in the forward GEMM only, both backward GEMMs fp32 } where RCEIL's
    mxfp8-rceil-bwd-only     RCEIL in both backward GEMMs only, the forward GEMM fp32 } cost comes from
    mxfp8-floor-fwd-only     the same two for FLOOR                                   } and FLOOR's
    mxfp8-floor-bwd-only
Everything else (embeddings, norms, attention, LM head, master weights, AdamW state) is fp32 in every
variant: on CPUs without bf16 hardware, autocast bf16 runs ~10x slower than fp32, and rounding only the
GEMM operands is what a bf16 tensor-core GEMM does to them.

Outputs under --out (each written atomically; a killed run resumes from the last checkpoint):
    runs/<variant>-seed<s>.json  loss curves, final validation loss, diagnostics (pooled and per layer,
                                 every --stats-every steps), seconds
    ckpt/<variant>-seed<s>/      training checkpoints (deleted once the run finishes)
    results.json                 config, variants, seeds, every run, the per-variant summary (mean, std,
                                 paired differences to bf16 with sign-flip and t-test p) and the table
    parity_loss.png              loss curves; parity_stats.png: clip / flush-to-zero per layer over training

    mxfp8-parity --out runs/parity                      # default CPU config (4 layers, width 192, T=128)
    mxfp8-parity --out runs/study --seeds 0,1,2         # three paired seeds per variant

Variants run in `--jobs` processes (default 2, one per core of a 2-core CPU) of `--threads` torch threads
each (default 1): the GEMMs here are small, and two single-threaded variants side by side finish sooner
than one two-threaded variant after another (and do not oversubscribe a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mxfp8train.convert import collect_stats, convert, reset_stats, set_track_stats
from mxfp8train.gpt import GPT, GPTConfig
from mxfp8train.linear import MXLinear
from mxfp8train.recipe import RECIPES
from shared_kernels.errors import OneLineParser
from shared_kernels.modules import swap_modules
from shared_kernels.runconfig import save_figure_atomic, write_json_atomic

DEFAULT_VARIANTS = ("bf16", "mxfp8-rceil", "mxfp8-floor", "mxfp8-rceil-e5m2-grads")
VARIANTS = (
    *DEFAULT_VARIANTS,
    "fp32",
    "mxfp8-rceil-fwd-only",
    "mxfp8-rceil-bwd-only",
    "mxfp8-floor-fwd-only",
    "mxfp8-floor-bwd-only",
)
REFERENCE_VARIANTS = ("bf16", "fp32")  # no MX layers, so no MX statistics


@dataclass(frozen=True)
class ParityConfig:
    out: str = "mxfp8_parity"
    data: str | None = None  # default: <shared data>/tinyshakespeare/input.txt
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    steps: int = 400
    batch_size: int = 8
    context: int = 128
    n_layers: int = 4
    width: int = 192
    n_heads: int = 4
    lr: float = 2e-3
    warmup: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seeds: tuple[int, ...] = (0,)  # seed s: init from s, data order from s + 1, the same for every variant
    block_size: int = 32  # MX block size of the MX variants (32 is OCP; smaller blocks are an ablation)
    eval_every: int = 100
    eval_batches: int = 8
    stats_every: int = 20
    ckpt_every: int = 50
    threads: int = 1  # torch threads per variant process; 0: leave torch's default
    jobs: int = 2  # variants trained side by side in separate processes
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {self.variants}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        for name in (
            "steps",
            "batch_size",
            "context",
            "n_layers",
            "width",
            "n_heads",
            "eval_every",
            "eval_batches",
            "stats_every",
            "ckpt_every",
            "jobs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.n_heads:
            raise ValueError(f"width ({self.width}) must be a multiple of n_heads ({self.n_heads})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be distinct non-negative ints, got {self.seeds}")
        for name in ("lr", "grad_clip"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.block_size < 2 or self.block_size > 1024 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two in [2, 1024], got {self.block_size}")


# ------------------------------------------------------------------------------------- bf16 baseline


class _RoundBF16(torch.autograd.Function):
    """Round to bf16 (RNE) and back in the forward pass and the backward pass."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).to(t.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g.to(torch.bfloat16).to(g.dtype)


class BF16OperandLinear(nn.Linear):
    """nn.Linear whose three GEMMs see bf16-rounded X, W and dY, accumulating in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _RoundBF16.apply(self.weight)
        # rounding the output in forward rounds dY in backward; rounding x rounds nothing else
        y = _RoundBF16.apply(nn.functional.linear(_RoundBF16.apply(x), w))
        return y if self.bias is None else y + self.bias


def bf16_convert(model: nn.Module, from_mx: bool = False) -> nn.Module:
    """Give every block linear (the ones `convert` would swap; with `from_mx`, the MXLinear layers it did
    swap) bf16 GEMM operands, in place, sharing their parameters."""

    def bf16_operands(name: str, module: nn.Module) -> nn.Module:
        assert isinstance(module, nn.Linear)  # selected below
        new = BF16OperandLinear(
            module.in_features, module.out_features, module.bias is not None, device="meta"
        )
        new.weight, new.bias = module.weight, module.bias
        return new

    def selected(name: str, module: nn.Module) -> bool:
        return isinstance(module, MXLinear) if from_mx else type(module) is nn.Linear and name != "lm_head"

    swap_modules(model, bf16_operands, selected)
    return model


# ----------------------------------------------------------------------------------------------- data


def default_data_path() -> Path | None:
    from shared_kernels.testing import shared_data_dir

    root = shared_data_dir()
    path = root / "tinyshakespeare" / "input.txt" if root is not None else None
    return path if path is not None and path.is_file() else None


def load_splits(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the file as int64, split by position: the first 90% train, the rest validation."""
    raw = Path(path).read_bytes()
    if len(raw) < 10_000:
        raise ValueError(f"data file {path} has only {len(raw)} bytes; need at least 10000")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def batch_starts(n_tokens: int, cfg: ParityConfig, seed: int) -> torch.Tensor:
    """(steps, batch_size) window starts: the data order of `seed`, identical for every variant."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, n_tokens - cfg.context - 1, (cfg.steps, cfg.batch_size), generator=g)


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(context + 1)  # (B, T + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model: GPT, val: torch.Tensor, cfg: ParityConfig) -> float:
    """Mean next-byte loss (nats) over eval_batches x batch_size fixed windows spread over the split."""
    n = cfg.eval_batches * cfg.batch_size
    starts = torch.linspace(0, len(val) - cfg.context - 2, n).long()
    total = 0.0
    for chunk in starts.split(cfg.batch_size):
        x, y = windows(val, chunk, cfg.context)
        total += model.loss(x, y).item() * len(chunk)
    return total / n


def bf16_forward_loss(model: GPT, val: torch.Tensor, cfg: ParityConfig) -> float:
    """`evaluate` of an MX model's weights with bf16 operands in place of its MX GEMMs (model unchanged):
    what the trained weights are worth, apart from the MX rounding of the evaluation's own forward pass."""
    bf16_model = copy.deepcopy(model)
    bf16_convert(bf16_model, from_mx=True)
    return evaluate(bf16_model, val, cfg)


# -------------------------------------------------------------------------------------------- training


def build_model(cfg: ParityConfig, variant: str, seed: int) -> GPT:
    """The GPT initialized from `seed` (the same weights for every variant), its block linears converted."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(context=cfg.context, n_layers=cfg.n_layers, width=cfg.width, n_heads=cfg.n_heads))
    if variant == "bf16":
        bf16_convert(model)  # in place, as convert
    elif variant != "fp32":
        convert(model, RECIPES[variant].replace(block_size=cfg.block_size))
    return model


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


# the fields that decide a run's numbers: a finished run or checkpoint made with others is never reused
_RUN_FIELDS = (
    "steps", "batch_size", "context", "n_layers", "width", "n_heads", "lr", "warmup", "weight_decay",
    "grad_clip", "block_size", "eval_every", "eval_batches", "stats_every",
)  # fmt: skip


def run_config(cfg: ParityConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in _RUN_FIELDS}


def _check_same_config(found: dict[str, Any] | None, cfg: ParityConfig, where: Path) -> None:
    """A ValueError naming `where` when it was made with another run config (or none recorded)."""
    want = run_config(cfg)
    if found == want:
        return
    if found is None:
        raise ValueError(f"{where} records no run config; it cannot be reused: move it or pick another --out")
    diff = ", ".join(f"{k}={found.get(k)!r}" for k in want if found.get(k) != want[k])
    raise ValueError(f"{where} was made with {diff}, not this run's; move it or pick another --out")


def check_outputs(cfg: ParityConfig) -> None:
    """Before any training: every finished run and checkpoint under cfg.out that this command would reuse
    was made with cfg's run settings (a ValueError naming the first that was not)."""
    from shared_kernels.checkpoint import CheckpointManager

    out = Path(cfg.out)
    for variant in cfg.variants:
        for seed in cfg.seeds:
            name = run_name(variant, seed)
            result_path = out / "runs" / f"{name}.json"
            if result_path.is_file():
                try:
                    found = json.loads(result_path.read_text()).get("config")
                except (OSError, ValueError) as err:
                    raise ValueError(f"{result_path} cannot be read ({type(err).__name__})") from None
                _check_same_config(found, cfg, result_path)
                continue
            latest = CheckpointManager(out / "ckpt" / name, keep=1).latest_extra()
            if latest is not None:
                _check_same_config(latest[1].get("config"), cfg, latest[0])


def lr_at(step: int, cfg: ParityConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def _sample_stats(model: GPT, step: int) -> dict[str, Any]:
    """Pooled and per-layer clip / flush fractions since the last sample, then tracking off again."""
    per_layer = collect_stats(model)
    pooled = per_layer.pop("__all__")
    layers = {
        layer: {role: {k: c[k] for k in _LAYER_FIELDS} for role, c in roles.items()}
        for layer, roles in per_layer.items()
    }
    reset_stats(model)
    set_track_stats(model, False)
    return {"step": step + 1, **pooled, "layers": layers}


def _train_step(
    model: GPT, opt: torch.optim.Optimizer, cfg: ParityConfig, x: torch.Tensor, y: torch.Tensor, step: int
) -> float:
    """One AdamW step at the scheduled lr with gradient clipping; returns the training loss."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    loss = model.loss(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.item()


def train_variant(
    cfg: ParityConfig, variant: str, seed: int, train: torch.Tensor, val: torch.Tensor
) -> dict[str, Any]:
    """Train one variant from one seed (resuming from its checkpoint if any); returns and saves its result."""
    from shared_kernels.checkpoint import CheckpointManager

    out = Path(cfg.out)
    name = run_name(variant, seed)
    result_path = out / "runs" / f"{name}.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        _check_same_config(result.get("config"), cfg, result_path)
        return result
    model = build_model(cfg, variant, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    ckpt = CheckpointManager(out / "ckpt" / name, keep=1)
    state = ckpt.load(model, opt)  # a ValueError naming the checkpoint if its tensors' shapes differ
    if state:
        _check_same_config(state["extra"].get("config"), cfg, state["path"])
    start = state["step"] if state else 0
    log: dict[str, Any] = (
        state["extra"]
        if state
        else {
            "config": run_config(cfg),
            "train": [],
            "val": [],
            "stats": [],
            "seconds": 0.0,
            "cpu_seconds": 0.0,
        }
    )
    starts = batch_starts(len(train), cfg, seed)
    is_mx = variant not in REFERENCE_VARIANTS
    t0 = time.perf_counter() - log["seconds"]
    c0 = time.process_time() - log.get("cpu_seconds", 0.0)  # this process's user + sys time, all threads
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        position = cfg.variants.index(variant) if cfg.jobs > 1 else None  # one line per parallel variant
        bar = tqdm(desc=name, initial=start, total=cfg.steps, position=position)
    for step in range(start, cfg.steps):
        track = is_mx and (step % cfg.stats_every == 0 or step == cfg.steps - 1)
        if is_mx:
            set_track_stats(model, track)
        loss = _train_step(model, opt, cfg, *windows(train, starts[step], cfg.context), step)
        log["train"].append([step + 1, loss])
        if track:
            log["stats"].append(_sample_stats(model, step))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            log["val"].append([step + 1, evaluate(model, val, cfg)])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            log["seconds"], log["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
            ckpt.save(step + 1, model, opt, extra=log)
    if bar is not None:
        bar.close()
    log["seconds"], log["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    result = {
        "variant": variant,
        "seed": seed,
        "final_val_loss": log["val"][-1][1],
        **log,
        **({"final_val_loss_bf16_forward": bf16_forward_loss(model, val, cfg)} if is_mx else {}),
        "diagnostics": pool_stats(log["stats"]),
    }
    write_json_atomic(result_path, result)
    shutil.rmtree(out / "ckpt" / name, ignore_errors=True)
    return result


_LAYER_FIELDS = ("clip_fraction", "clipped_block_fraction", "flush_fraction")


def pool_stats(samples: list[dict]) -> dict[str, dict[str, float]]:
    """Diagnostics pooled over every sampled step, per tensor role."""
    from mxfp8train.stats import merge_summaries

    return (
        merge_summaries([{k: v for k, v in s.items() if k not in ("step", "layers")} for s in samples])
        if samples
        else {}
    )


# ---------------------------------------------------------------------------------------------- report


def paired_tests(diffs: list[float]) -> dict[str, float]:
    """Two-sided tests that paired differences (variant - bf16, one per seed) have mean 0, from
    `shared_kernels.significance`: the exact sign-flip randomization test (its smallest p with n seeds is
    2 / 2^n) and the paired t-test (nan with fewer than 2 seeds)."""
    from shared_kernels.significance import paired_randomization_test, paired_t_test

    zeros = [0.0] * len(diffs)
    p_t = paired_t_test(diffs, zeros)[1] if len(diffs) > 1 else float("nan")
    return {"sign_flip_p": paired_randomization_test(diffs, zeros), "t_test_p": p_t}


def summarize(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per variant: final validation losses per seed, mean, std, half-range, and (variants other than bf16)
    the paired differences to bf16 on the same seeds with their tests; diagnostics pooled over seeds."""
    from mxfp8train.stats import merge_summaries

    out: dict[str, dict] = {}
    base = runs.get("bf16", {})
    for variant, by_seed in runs.items():
        seeds = sorted(by_seed)
        losses = [by_seed[s]["final_val_loss"] for s in seeds]
        n = len(losses)
        mean = sum(losses) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in losses) / (n - 1)) if n > 1 else float("nan")
        entry = {
            "seeds": seeds,
            "final_val_loss": losses,
            "mean": mean,
            "std": std,
            "half_range": (max(losses) - min(losses)) / 2,
            "cpu_seconds": sum(by_seed[s].get("cpu_seconds", float("nan")) for s in seeds),
            "diagnostics": merge_summaries(
                [by_seed[s]["diagnostics"] for s in seeds if by_seed[s]["diagnostics"]]
            ),
        }
        shared = [s for s in seeds if s in base]
        if variant != "bf16" and shared:  # fp32 too: the cost of bf16 rounding itself
            entry["paired_vs_bf16"] = _paired(by_seed, base, shared, "final_val_loss")
            if all("final_val_loss_bf16_forward" in by_seed[s] for s in shared):
                entry["bf16_forward_paired_vs_bf16"] = _paired(
                    by_seed, base, shared, "final_val_loss_bf16_forward"
                )
        out[variant] = entry
    return out


def _paired(by_seed: dict[int, dict], base: dict[int, dict], seeds: list[int], key: str) -> dict[str, Any]:
    """Per seed, the run's `key` minus bf16's final validation loss; their mean, std and tests."""
    return {"seeds": seeds, **_paired_stats([by_seed[s][key] - base[s]["final_val_loss"] for s in seeds])}


def _paired_stats(diffs: list[float]) -> dict[str, Any]:
    """The paired differences with their mean, sample std (nan for one) and `paired_tests`."""
    mean = sum(diffs) / len(diffs)
    std = (
        math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else float("nan")
    )
    return {"diffs": diffs, "mean": mean, "std": std, **paired_tests(diffs)}


def pool_runs(results: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """The runs of finished studies (each a `results.json` dict) as {variant: {seed: run}}. The studies must
    share one run config (pooling two regimes would test a mixture); a variant's seed may appear in
    several only with the same final loss (a deterministic rerun, e.g. the bf16 runs of an ablation)."""
    pooled: dict[str, dict[int, dict[str, Any]]] = {}
    first: dict[str, Any] | None = None
    for i, study in enumerate(results):
        runs = study.get("runs") if isinstance(study, dict) else None
        if not isinstance(runs, dict) or not runs:
            raise ValueError(
                f"results #{i + 1} has no per-run results (a results.json written by mxfp8-parity)"
            )
        cfg = study.get("config")
        if not isinstance(cfg, dict):
            raise ValueError(f"results #{i + 1} records no run config")
        this = {k: cfg.get(k) for k in _RUN_FIELDS}
        if first is None:
            first = this
        elif this != first:
            diff = ", ".join(f"{k}={this[k]!r}" for k in _RUN_FIELDS if this[k] != first[k])
            raise ValueError(f"results #{i + 1} was made with {diff}, not results #1's: it is another regime")
        for variant, by_seed in runs.items():
            if not isinstance(by_seed, dict) or not all(
                str(s).isdigit() and isinstance(r, dict) for s, r in by_seed.items()
            ):
                raise ValueError(f"results #{i + 1}: runs of {variant!r} are not a map of seed to run")
            for s, run in by_seed.items():
                have = pooled.setdefault(variant, {}).setdefault(int(s), run)
                if have.get("final_val_loss") != run.get("final_val_loss"):
                    raise ValueError(
                        f"results #{i + 1} repeats {variant} seed {s} with another final loss "
                        f"({run.get('final_val_loss')} vs {have.get('final_val_loss')})"
                    )
    return pooled


def compare(results: list[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """Paired difference a - b of final validation losses, per seed, over the runs of finished studies
    (`pool_runs`: one run config; a and b may come from different studies). A name ending in
    "@bf16-forward" takes the run's `final_val_loss_bf16_forward` (an MX variant's weights evaluated with
    bf16 operands).

    Returns {"a", "b", "seeds", "diffs", "mean", "std", "positive", "sign_flip_p", "t_test_p"}; a ValueError
    names the variant, seed or evaluation that is missing."""
    pooled = pool_runs(results)
    values: list[dict[int, float]] = []
    for name in (a, b):
        variant, _, evaluation = name.partition("@")
        if evaluation not in ("", "bf16-forward"):
            raise ValueError(f"{name!r}: the only evaluation suffix is '@bf16-forward'")
        if variant not in pooled:
            raise ValueError(f"no results have variant {variant!r} (they have {', '.join(pooled)})")
        key = "final_val_loss_bf16_forward" if evaluation else "final_val_loss"
        missing = sorted(s for s, r in pooled[variant].items() if r.get(key) is None)
        if missing:
            raise ValueError(f"{variant} runs of seeds {missing} have no {key}")
        values.append({s: float(r[key]) for s, r in pooled[variant].items()})
    seeds = sorted(set(values[0]) & set(values[1]))
    if len(seeds) < 2:
        raise ValueError(f"{a} - {b}: {len(seeds)} paired seed(s); need at least 2")
    diffs = [values[0][s] - values[1][s] for s in seeds]
    positive = sum(d > 0 for d in diffs)
    return {"a": a, "b": b, "seeds": seeds, "positive": positive, **_paired_stats(diffs)}


def report_table(summary: dict[str, dict]) -> str:
    """Markdown table: val loss mean +- std over seeds, paired difference to bf16 with its tests, clip and
    flush fractions per role pooled over seeds and sampled steps."""
    lines = [
        "| variant | seeds | final val loss mean +- std (nats/byte) "
        "| minus bf16, paired: mean +- std [per seed] | sign-flip p / t-test p "
        "| clipped elements x / w / dy | clipped blocks x / w / dy "
        "| flushed to zero x / w / dy | CPU minutes (all seeds) "
        "| MX weights with a bf16 forward at evaluation, minus bf16: mean +- std (sign-flip p) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary.items():
        d = r["diagnostics"]

        def triple(key: str, fmt: str, d=d) -> str:
            return " / ".join(
                fmt.format(d[role][key]) if role in d else "-" for role in ("input", "weight", "grad")
            )

        paired = r.get("paired_vs_bf16")
        if paired:
            per_seed = ", ".join(f"{v:+.4f}" for v in paired["diffs"])
            diff = f"{paired['mean']:+.4f} +- {paired['std']:.4f} [{per_seed}]"
            tests = f"{paired['sign_flip_p']:.3f} / {paired['t_test_p']:.3f}"
        else:
            diff = tests = "-"
        fwd = r.get("bf16_forward_paired_vs_bf16")
        bf16_forward = f"{fwd['mean']:+.4f} +- {fwd['std']:.4f} ({fwd['sign_flip_p']:.3f})" if fwd else "-"
        lines.append(
            f"| {name} | {len(r['seeds'])} | {r['mean']:.4f} +- {r['std']:.4f} | {diff} | {tests} | "
            f"{triple('clip_fraction', '{:.2e}')} | {triple('clipped_block_fraction', '{:.3f}')} | "
            f"{triple('flush_fraction', '{:.1e}')} | {r['cpu_seconds'] / 60:.1f} | {bf16_forward} |"
        )
    return "\n".join(lines)


def _plot_val_minus_bf16(ax, runs: dict[str, dict[int, dict]]) -> None:
    """Per variant, validation loss minus bf16's on the same seed at each evaluation: the paired
    difference, every seed as a thin line and their mean as a thick one (bf16 is the zero line)."""
    base = runs["bf16"]
    ax.axhline(0.0, color="C0", lw=1.5, label="bf16 (reference)")
    for i, (name, by_seed) in enumerate(runs.items()):
        if name == "bf16":
            continue
        diffs = []
        for seed in sorted(set(by_seed) & set(base)):
            vs, vl = zip(*by_seed[seed]["val"], strict=True)
            diffs.append([v - b for v, (_, b) in zip(vl, base[seed]["val"], strict=True)])
            ax.plot(vs, diffs[-1], color=f"C{i}", alpha=0.3, lw=0.8)
        if diffs:
            mean = [sum(col) / len(col) for col in zip(*diffs, strict=True)]
            ax.plot(vs, mean, color=f"C{i}", marker="o", lw=2, label=f"{name} (mean of {len(diffs)} seeds)")
    ax.set(
        xlabel="step",
        ylabel="val loss minus bf16, same seed (nats/byte)",
        title="validation: paired difference to bf16",
    )


def plot_curves(runs: dict[str, dict[int, dict]], path: Path) -> None:
    """Training loss (20-step mean) of every run, and validation loss: as the paired difference to bf16
    when bf16 ran, else every run's value; one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, by_seed) in enumerate(runs.items()):
        for j, seed in enumerate(sorted(by_seed)):
            r = by_seed[seed]
            steps, losses = zip(*r["train"], strict=True)
            window = 20
            smooth = [
                sum(losses[max(0, k - window + 1) : k + 1]) / min(k + 1, window) for k in range(len(losses))
            ]
            label = name if j == 0 else None
            ax_train.plot(steps, smooth, color=f"C{i}", alpha=0.8, label=label)
            if "bf16" not in runs:
                vs, vl = zip(*r["val"], strict=True)
                ax_val.plot(vs, vl, color=f"C{i}", marker="o", alpha=0.8, label=label)
    ax_train.set(xlabel="step", ylabel="train loss, 20-step mean (nats/byte)", title="training (every seed)")
    if "bf16" in runs:
        _plot_val_minus_bf16(ax_val, runs)
    else:
        ax_val.set(xlabel="step", ylabel="validation loss (nats/byte)", title="validation (every seed)")
    ax_train.legend()
    ncol = 3 if len(runs) <= 4 else 2  # long labels: wider columns than a third of the axes fit
    ax_val.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol, frameon=False)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def plot_layer_stats(runs: dict[str, dict[int, dict]], path: Path) -> None:
    """Per layer, over training: clipped-element fraction (top row) and flush-to-zero fraction (bottom row)
    for each tensor role, every MX variant's first seed (one colour per variant, one line per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = ("input", "weight", "grad")
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), sharex=True)
    for i, (name, by_seed) in enumerate(runs.items()):
        if name in REFERENCE_VARIANTS or not by_seed:
            continue
        samples = by_seed[min(by_seed)]["stats"]
        layers = sorted(samples[0]["layers"]) if samples else []
        for layer_idx, layer in enumerate(layers):
            steps = [s["step"] for s in samples]
            for col, role in enumerate(roles):
                for row, key in enumerate(("clip_fraction", "flush_fraction")):
                    values = [s["layers"][layer].get(role, {}).get(key, float("nan")) for s in samples]
                    axes[row, col].plot(
                        steps,
                        values,
                        color=f"C{i}",
                        alpha=0.35 + 0.65 * (layer_idx + 1) / len(layers),
                        lw=1,
                        label=name if layer_idx == 0 else None,
                    )
    for col, role in enumerate(roles):
        axes[0, col].set(title=f"{role}: clipped elements", yscale="symlog", ylabel="fraction of elements")
        axes[0, col].yaxis.set_major_formatter(matplotlib.ticker.LogFormatterSciNotation())
        axes[1, col].set(
            title=f"{role}: non-zero values flushed to 0",
            yscale="symlog",
            xlabel="step",
            ylabel="fraction of non-zero values",
        )
    for ax in axes.flat:
        ax.set_yscale("symlog", linthresh=1e-6)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("MX diagnostics per layer over training (first seed; darker = deeper layer)")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def check_data(cfg: ParityConfig) -> Path:
    """The data file to train on, checked before any work: a ValueError naming it if unusable."""
    path = Path(cfg.data) if cfg.data else default_data_path()
    if path is None:
        raise ValueError(
            "data file not found: tinyshakespeare/input.txt is not in the shared data dir; pass --data"
        )
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as e:
        raise ValueError(f"data file {path} cannot be read: {e.strerror}") from None
    if size < 10_000:
        raise ValueError(f"data file {path} has only {size} bytes; need at least 10000")
    return path


def run_parity(cfg: ParityConfig) -> dict:
    """Train every (variant, seed); write results.json, parity_loss.png and parity_stats.png under cfg.out."""
    path = check_data(cfg)
    check_outputs(cfg)
    _set_threads(cfg.threads)
    train, val = load_splits(path)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(v, s) for s in cfg.seeds for v in cfg.variants]
    pending = [(v, s) for v, s in jobs if not (out / "runs" / f"{run_name(v, s)}.json").is_file()]
    if cfg.jobs > 1 and len(pending) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # the cheap bf16 baselines last, so they fill the gaps beside the last MX runs
        pending.sort(key=lambda job: job[0] == "bf16")
        with ProcessPoolExecutor(
            min(cfg.jobs, len(pending)),
            multiprocessing.get_context("spawn"),
            initializer=_set_threads,
            initargs=(cfg.threads,),
        ) as pool:
            for future in [pool.submit(train_variant, cfg, v, s, train, val) for v, s in pending]:
                future.result()  # results are read back from runs/<name>.json below
    runs: dict[str, dict[int, dict]] = {v: {} for v in cfg.variants}
    for v, s in jobs:
        runs[v][s] = train_variant(cfg, v, s, train, val)
    summary = summarize(runs)
    results = {
        "config": {**dataclasses.asdict(cfg), "data": str(path)},
        "variants": list(cfg.variants),
        "seeds": list(cfg.seeds),
        "summary": summary,
        "runs": {v: {str(s): r for s, r in by_seed.items()} for v, by_seed in runs.items()},
        "table": report_table(summary),
    }
    write_json_atomic(out / "results.json", results)
    plot_curves(runs, out / "parity_loss.png")
    plot_layer_stats(runs, out / "parity_stats.png")
    return results


def _set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def compare_main(argv: list[str] | None = None) -> None:
    """`mxfp8-parity-compare A/results.json [B/results.json ...] --pairs a:b[,c:d...]`: paired differences
    pooled over finished studies, one line per pair."""
    parser = OneLineParser(
        prog="mxfp8-parity-compare", description="paired differences pooled over finished parity studies"
    )
    parser.add_argument(
        "results", nargs="+", help="results.json files of mxfp8-parity made with one run config"
    )
    parser.add_argument(
        "--pairs",
        required=True,
        help="comma-separated a:b, each a variant or variant@bf16-forward; e.g. mxfp8-floor:mxfp8-rceil",
    )
    args = parser.parse_args(argv)
    try:
        studies = []
        for path in args.results:
            try:
                studies.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError) as err:
                raise ValueError(f"results file {path} cannot be read ({type(err).__name__})") from None
        pairs = [p.split(":") for p in args.pairs.split(",") if p]
        if not pairs or any(len(p) != 2 or not all(p) for p in pairs):
            raise ValueError(f"--pairs must be comma-separated a:b, got {args.pairs!r}")
        found = [compare(studies, a, b) for a, b in pairs]
    except ValueError as e:
        parser.error(str(e))
    for c in found:
        tests = f"sign-flip p {c['sign_flip_p']:.4f}, t-test p {c['t_test_p']:.4f}"
        print(
            f"{c['a']} - {c['b']}: {c['mean']:+.4f} +- {c['std']:.4f} nats/byte over {len(c['diffs'])} "
            f"seeds, {c['positive']} positive; {tests}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="mxfp8-parity", description=__doc__.split("\n\n")[0])
    defaults = ParityConfig()
    for f in dataclasses.fields(ParityConfig):
        if f.name in ("variants", "progress", "data", "seeds"):
            continue
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
        )
    parser.add_argument("--data", default=None, help="text file (default: shared tinyshakespeare/input.txt)")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: the first four)",
    )
    parser.add_argument(
        "--seeds",
        type=_int_list,
        default=defaults.seeds,
        help="comma-separated seeds; every variant trains from each (paired design)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = vars(parser.parse_args(argv))
    args["variants"] = tuple(v for v in args.pop("variants").split(",") if v)
    args["progress"] = not args.pop("no_progress")
    try:
        cfg = ParityConfig(**args)
        check_data(cfg)
        check_outputs(cfg)
    except ValueError as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    results = run_parity(cfg)
    print(results["table"])
    cpu = sum(r["cpu_seconds"] for r in results["summary"].values())
    print(
        f"this command: {(time.perf_counter() - t0) / 60:.1f} min wall; runs' CPU time {cpu / 60:.1f} min "
        f"(jobs={cfg.jobs}, threads={cfg.threads})"
    )
    print(
        f"results: {Path(cfg.out) / 'results.json'}  plots: {Path(cfg.out) / 'parity_loss.png'}, "
        f"{Path(cfg.out) / 'parity_stats.png'}"
    )


if __name__ == "__main__":
    main()
