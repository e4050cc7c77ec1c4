"""The BF16-vs-MXFP8 parity experiment: one small byte-level GPT trained several times with the same
initialization, seed and data order, changing only the number format of the block linears' GEMM operands.

Variants:
    bf16                     GEMM operands X, W, dY rounded to bf16, fp32 accumulation (the baseline)
    mxfp8-rceil              the paper's recipe: E4M3 everywhere, RCEIL scales, all three GEMMs
    mxfp8-floor              the OCP FLOOR scale rule instead
    mxfp8-rceil-e5m2-grads   RCEIL with E5M2 gradients
Everything else (embeddings, norms, attention, LM head, master weights, AdamW state) is fp32 in every
variant: on CPUs without bf16 hardware, autocast bf16 runs ~10x slower than fp32, and rounding only the
GEMM operands is what a bf16 tensor-core GEMM does to them.

Outputs under --out (each written atomically; a killed run resumes from the last checkpoint):
    variants/<name>.json     loss curves, final validation loss, diagnostics, seconds
    ckpt/<name>/             training checkpoints (deleted once the variant finishes)
    results.json             all variants + the config; parity_loss.png: loss curves

    mxfp8-parity --out runs/parity            # default CPU config (4 layers, width 192, T=128, 400 steps)

Variants run in `--jobs` processes (default 2, one per core of a 2-core CPU) of `--threads` torch threads
each (default 1): the GEMMs here are small, and two single-threaded variants side by side finish sooner
than one two-threaded variant after another (and do not oversubscribe a shared machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mxfp8train.convert import collect_stats, convert, reset_stats, set_track_stats
from mxfp8train.gpt import GPT, GPTConfig
from mxfp8train.recipe import RECIPES

VARIANTS = ("bf16", "mxfp8-rceil", "mxfp8-floor", "mxfp8-rceil-e5m2-grads")


@dataclass(frozen=True)
class ParityConfig:
    out: str = "mxfp8_parity"
    data: str | None = None  # default: <shared data>/tinyshakespeare/input.txt
    variants: tuple[str, ...] = VARIANTS
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
    seed: int = 0
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
        for name in ("steps", "batch_size", "context", "eval_every", "eval_batches", "stats_every", "ckpt_every", "jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


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


def bf16_convert(model: nn.Module) -> nn.Module:
    """Give every block linear (the ones `convert` would swap) bf16 GEMM operands."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name != "lm_head":
            new = BF16OperandLinear(module.in_features, module.out_features, module.bias is not None, device="meta")
            new.weight, new.bias = module.weight, module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
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


def batch_starts(n_tokens: int, cfg: ParityConfig) -> torch.Tensor:
    """(steps, batch_size) window starts: the data order, identical for every variant."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
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


# -------------------------------------------------------------------------------------------- training


def build_model(cfg: ParityConfig, variant: str) -> GPT:
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(context=cfg.context, n_layers=cfg.n_layers, width=cfg.width, n_heads=cfg.n_heads))
    if variant == "bf16":
        return bf16_convert(model)
    return convert(model, RECIPES[variant])


def lr_at(step: int, cfg: ParityConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def write_json_atomic(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def train_variant(cfg: ParityConfig, variant: str, train: torch.Tensor, val: torch.Tensor) -> dict:
    """Train one variant (resuming from its checkpoint if any); returns and saves its result."""
    from shared_kernels.checkpoint import CheckpointManager

    out = Path(cfg.out)
    result_path = out / "variants" / f"{variant}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    model = build_model(cfg, variant)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    ckpt = CheckpointManager(out / "ckpt" / variant, keep=1)
    state = ckpt.load(model, opt)
    start = state["step"] if state else 0
    log = state["extra"] if state else {"train": [], "val": [], "stats": [], "seconds": 0.0, "cpu_seconds": 0.0}
    starts = batch_starts(len(train), cfg)
    is_mx = variant != "bf16"
    t0 = time.perf_counter() - log["seconds"]
    c0 = time.process_time() - log.get("cpu_seconds", 0.0)  # this process's user + sys time, all threads
    steps = range(start, cfg.steps)
    if cfg.progress:
        from tqdm import tqdm

        position = cfg.variants.index(variant) if cfg.jobs > 1 else None  # one line per parallel variant
        steps = tqdm(steps, desc=variant, initial=start, total=cfg.steps, position=position)
    for step in steps:
        track = is_mx and (step % cfg.stats_every == 0 or step == cfg.steps - 1)
        if is_mx:
            set_track_stats(model, track)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = windows(train, starts[step], cfg.context)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        log["train"].append([step + 1, loss.item()])
        if track:
            pooled = collect_stats(model)["__all__"]
            log["stats"].append({"step": step + 1, **pooled})
            reset_stats(model)
            set_track_stats(model, False)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            log["val"].append([step + 1, evaluate(model, val, cfg)])
        if cfg.progress:
            steps.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            log["seconds"], log["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
            ckpt.save(step + 1, model, opt, extra=log)
    log["seconds"], log["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    result = {"variant": variant, "final_val_loss": log["val"][-1][1], **log, "diagnostics": pool_stats(log["stats"])}
    write_json_atomic(result_path, result)
    shutil.rmtree(out / "ckpt" / variant, ignore_errors=True)
    return result


def pool_stats(samples: list[dict]) -> dict[str, dict[str, float]]:
    """Diagnostics pooled over every sampled step, per tensor role."""
    from mxfp8train.stats import merge_summaries

    return merge_summaries([{k: v for k, v in s.items() if k != "step"} for s in samples]) if samples else {}


# ---------------------------------------------------------------------------------------------- report


def report_table(results: dict[str, dict]) -> str:
    """Markdown table: final val loss, ratio to bf16, clip / flush fractions per role."""
    base = results.get("bf16", {}).get("final_val_loss")
    lines = [
        "| variant | final val loss (nats/byte) | ratio to bf16 | clipped elements x / w / dy | clipped blocks x / w / dy "
        "| flushed to zero x / w / dy | minutes | CPU minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        d = r.get("diagnostics", {})

        def triple(key: str, fmt: str, d=d) -> str:
            return " / ".join(fmt.format(d[role][key]) if role in d else "-" for role in ("input", "weight", "grad"))

        ratio = f"{r['final_val_loss'] / base:.4f}" if base else "-"
        lines.append(
            f"| {name} | {r['final_val_loss']:.4f} | {ratio} | {triple('clip_fraction', '{:.2e}')} | "
            f"{triple('clipped_block_fraction', '{:.3f}')} | {triple('flush_fraction', '{:.1e}')} | {r['seconds'] / 60:.1f} | "
            f"{r.get('cpu_seconds', float('nan')) / 60:.1f} |"
        )
    return "\n".join(lines)


def plot_curves(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps, losses = zip(*r["train"], strict=True)
        window = 20
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(losses))]
        ax_train.plot(steps, smooth, label=name)
        vs, vl = zip(*r["val"], strict=True)
        ax_val.plot(vs, vl, marker="o", label=name)
    ax_train.set(xlabel="step", ylabel="train loss (20-step mean)", title="training")
    ax_val.set(xlabel="step", ylabel="validation loss (nats/byte)", title="validation")
    ax_train.legend()
    ax_val.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_parity(cfg: ParityConfig) -> dict:
    """Train every variant in turn and write results.json and parity_loss.png under cfg.out."""
    path = Path(cfg.data) if cfg.data else default_data_path()
    if path is None or not path.is_file():
        raise ValueError(f"data file not found: {cfg.data or 'tinyshakespeare/input.txt in the shared data dir'}; pass --data")
    _set_threads(cfg.threads)
    train, val = load_splits(path)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pending = [v for v in cfg.variants if not (out / "variants" / f"{v}.json").is_file()]
    if cfg.jobs > 1 and len(pending) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # the cheap bf16 baseline last, so it fills the gap beside the last MX variant
        pending.sort(key=lambda v: v == "bf16")
        with ProcessPoolExecutor(min(cfg.jobs, len(pending)), multiprocessing.get_context("spawn"),
                                 initializer=_set_threads, initargs=(cfg.threads,)) as pool:
            for future in [pool.submit(train_variant, cfg, v, train, val) for v in pending]:
                future.result()  # results are read back from variants/<name>.json below
    results = {v: train_variant(cfg, v, train, val) for v in cfg.variants}
    summary = {"config": {**dataclasses.asdict(cfg), "data": str(path)}, "results": results,
               "table": report_table(results)}
    write_json_atomic(out / "results.json", summary)
    plot_curves(results, out / "parity_loss.png")
    return summary


def _set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mxfp8-parity", description=__doc__.split("\n\n")[0])
    defaults = ParityConfig()
    for f in dataclasses.fields(ParityConfig):
        if f.name in ("variants", "progress", "data"):
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    parser.add_argument("--data", default=None, help="text file (default: shared tinyshakespeare/input.txt)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--no-progress", action="store_true")
    args = vars(parser.parse_args(argv))
    args["variants"] = tuple(v for v in args.pop("variants").split(",") if v)
    args["progress"] = not args.pop("no_progress")
    args = {k: v for k, v in args.items()}
    cfg = ParityConfig(**{k.replace("-", "_"): v for k, v in args.items()})
    t0 = time.perf_counter()
    summary = run_parity(cfg)
    print(summary["table"])
    cpu = sum(r.get("cpu_seconds", float("nan")) for r in summary["results"].values())
    print(f"this command: {(time.perf_counter() - t0) / 60:.1f} min wall; variants' CPU time {cpu / 60:.1f} min "
          f"(jobs={cfg.jobs}, threads={cfg.threads})")
    print(f"results: {Path(cfg.out) / 'results.json'}  plot: {Path(cfg.out) / 'parity_loss.png'}")


if __name__ == "__main__":
    main()
