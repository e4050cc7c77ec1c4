"""Retrieval at length: a synthetic copy task in which a tiny LM learns to copy in distribution (an induction
task), then a needle probe at 1x / 4x / 16x the training length.

Task (tokens, not bytes): a window of `filler` tokens drawn uniformly from ids [0, n_filler); a string of
`min_len..max_len` symbols drawn from ids [n_filler, vocab) (distinct, and never in the filler, so each
occurrence is unambiguous) is placed at a random position in the window's first half and repeated at a random later
position. The loss is on the repeat's symbols 2..L only (the first is unpredictable): nothing but copying
lowers it. Probe: a `needle_len` string in the first quarter of a window of length T, repeated as the
window's last tokens; top-1 accuracy on needle symbols 2..needle_len. Chance is 1 / (vocab - n_filler).

    python -m siattn.retrieval --out runs/retrieval                  # default study (see README for timing)
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from shared_kernels.errors import OneLineParser, positive
from siattn.lengthgen import set_warmup_cosine_lr
from siattn.models import GPT, GPTConfig
from siattn.positional import rope_frequencies


@dataclass(frozen=True)
class CopyTask:
    """vocab: all token ids; ids < n_filler are filler, the rest are string symbols."""

    vocab: int = 96
    n_filler: int = 32
    min_len: int = 16
    max_len: int = 48
    needle_len: int = 12

    def __post_init__(self) -> None:
        if not 0 < self.n_filler < self.vocab:
            raise ValueError(f"n_filler must be in (0, vocab={self.vocab}), got {self.n_filler}")
        if not 2 <= self.min_len <= self.max_len:
            raise ValueError(f"need 2 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if (
            not 2 <= self.needle_len <= self.vocab - self.n_filler
            or self.max_len > self.vocab - self.n_filler
        ):
            raise ValueError(
                f"needle_len and max_len must be in [2, {self.vocab - self.n_filler}] (distinct "
                f"symbols), got {self.needle_len}, {self.max_len}"
            )


def copy_batch(
    task: CopyTask, batch: int, length: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows. Returns tokens (batch, length + 1) int64 and a loss mask (batch, length) bool that is
    True where the next token is a copied symbol 2..L (deterministic given `gen`'s state)."""
    if length < 2 * task.max_len + 2:
        raise ValueError(f"length must be >= 2 * max_len + 2 = {2 * task.max_len + 2}, got {length}")
    tokens = torch.randint(0, task.n_filler, (batch, length + 1), generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        n = int(torch.randint(task.min_len, task.max_len + 1, (1,), generator=gen))
        s = task.n_filler + torch.randperm(task.vocab - task.n_filler, generator=gen)[:n]  # distinct symbols
        p1 = int(torch.randint(0, (length + 1) // 2 - n + 1, (1,), generator=gen))
        p2 = int(torch.randint(p1 + n, length + 1 - n + 1, (1,), generator=gen))
        tokens[b, p1 : p1 + n] = s
        tokens[b, p2 : p2 + n] = s
        mask[b, p2 : p2 + n - 1] = True  # inputs p2 .. p2+n-2 predict symbols 2..n
    return tokens, mask


def needle_probe(task: CopyTask, length: int, trials: int, seed: int) -> torch.Tensor:
    """Probe windows (trials, length): filler, a needle in the first quarter, the needle again at the end."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
    n = task.needle_len
    if length < 4 * n:
        raise ValueError(f"length must be >= 4 * needle_len = {4 * n}, got {length}")
    tokens = torch.randint(0, task.n_filler, (trials, length), generator=gen)
    for b in range(trials):
        needle = task.n_filler + torch.randperm(task.vocab - task.n_filler, generator=gen)[:n]
        pos = int(torch.randint(0, length // 4 - n + 1, (1,), generator=gen))
        tokens[b, pos : pos + n] = needle
        tokens[b, length - n :] = needle
    return tokens


def probe_accuracy(task: CopyTask, logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Top-1 accuracy on needle symbols 2..needle_len: logits (trials, length, vocab) of `needle_probe` windows."""
    n, length = task.needle_len, tokens.shape[1]
    pred = logits[:, length - n : length - 1].argmax(-1)
    return (pred == tokens[:, length - n + 1 :]).float().mean().item()


def _ntk_base(base: float, head_dim: int, factor: float) -> float:
    """NTK-aware RoPE: theta scaled by factor^(d / (d - 2)) (REFERENCE section 1)."""
    return base * factor ** (head_dim / (head_dim - 2))


def _yarn_frequencies(
    inv_freq: torch.Tensor, train_length: int, factor: float, alpha: float = 1.0, beta: float = 32.0
) -> torch.Tensor:
    """YaRN (Peng et al. 2023) "NTK-by-parts": dimensions whose wavelength fits fewer than `alpha` times in
    the training length are interpolated by `factor`, those fitting more than `beta` times are kept, a linear
    ramp in between."""
    ratio = train_length * inv_freq / (2 * math.pi)  # training length / wavelength
    keep = ((ratio - alpha) / (beta - alpha)).clamp(0.0, 1.0)
    return (1 - keep) * inv_freq / factor + keep * inv_freq


VARIANTS: dict[str, dict] = {
    "rope": {"position": "rope", "attention": "softmax"},
    "rope+ntk": {"position": "rope", "attention": "softmax"},  # rope weights, NTK theta at evaluation
    "rope+yarn": {"position": "rope", "attention": "softmax"},  # rope weights, YaRN at evaluation
    "p-rope": {"position": "p-rope", "attention": "softmax"},
    "logn-learned+p-rope": {"position": "p-rope", "attention": "logn-learned"},
    "si-p-rope": {"position": "p-rope", "attention": "si"},
}


@dataclass
class RetrievalConfig:
    out: str = "runs/retrieval"
    train_length: int = 128
    eval_multiples: tuple[int, ...] = (1, 4, 16)
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    seeds: tuple[int, ...] = (0, 1)
    variants: tuple[str, ...] = ("rope", "p-rope", "si-p-rope")
    p_rope_base: float = 8.0
    tau: float = 10.0
    trials: int = 64


def _model(cfg: RetrievalConfig, task: CopyTask, variant: str) -> GPT:
    return GPT(
        GPTConfig(
            vocab_size=task.vocab,
            n_layer=cfg.n_layer,
            d_model=cfg.d_model,
            n_head=cfg.n_head,
            train_length=cfg.train_length,
            si_backend="chunked",
            p_rope_base=cfg.p_rope_base,
            tau=cfg.tau,
            **VARIANTS[variant],
        )
    )


def train_model(cfg: RetrievalConfig, task: CopyTask, variant: str, seed: int) -> tuple[GPT, list[float]]:
    """Train one model on copy windows; returns it and the copy accuracy on each 50-step training batch."""
    torch.manual_seed(seed)
    model = _model(cfg, task, variant)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(10_000 + seed)
    accs = []
    for step in range(cfg.steps):
        set_warmup_cosine_lr(opt, cfg.lr, step, cfg.warmup, cfg.steps)
        tokens, mask = copy_batch(task, cfg.batch_size, cfg.train_length, gen)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits[mask], tokens[:, 1:][mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 49 or step == cfg.steps - 1:
            accs.append((logits[mask].argmax(-1) == tokens[:, 1:][mask]).float().mean().item())
            print(
                f"  {model.cfg.position}/{model.cfg.attention} seed {seed} step {step + 1}: "
                f"copy acc {accs[-1]:.3f} loss {loss.item():.3f}",
                flush=True,
            )
    return model, accs


@torch.no_grad()
def evaluate(model: GPT, cfg: RetrievalConfig, task: CopyTask, variant: str) -> dict:
    model.eval()
    out = {}
    head_dim = cfg.d_model // cfg.n_head
    q_gains = [block.attn.q_norm.weight.clone() for block in model.blocks]
    for mult in cfg.eval_multiples:
        length = cfg.train_length * mult
        if variant == "rope+ntk":
            inv = rope_frequencies(head_dim, _ntk_base(model.cfg.rope_base, head_dim, float(mult)))
            for block in model.blocks:
                block.attn.inv_freq = inv
        if (
            variant == "rope+yarn"
        ):  # frequencies by parts, and logits x (0.1 ln s + 1)^2 via the q norm's gain
            inv = _yarn_frequencies(
                rope_frequencies(head_dim, model.cfg.rope_base), cfg.train_length, float(mult)
            )
            gain = (0.1 * math.log(mult) + 1.0) ** 2
            for block, w in zip(model.blocks, q_gains):
                block.attn.inv_freq = inv
                block.attn.q_norm.weight.copy_(w * gain)
        tokens = needle_probe(task, length, cfg.trials, seed=0)
        logits = torch.cat([model(chunk) for chunk in tokens.split(max(1, 8192 // length))])
        out[str(length)] = probe_accuracy(task, logits, tokens)
    return out


def _load(cfg: RetrievalConfig, task: CopyTask, variant: str, path: Path) -> GPT:
    model = _model(cfg, task, variant)
    model.load_state_dict(load_file(str(path)))
    return model


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run(cfg: RetrievalConfig) -> dict:
    """Train every (variant, seed) (rope+ntk reuses the rope weights), probe, and write results.json /
    table.md / needle.png in cfg.out; finished runs are read back, so the study resumes run by run."""
    torch.set_num_threads(1)
    task = CopyTask()
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results = []
    for variant in cfg.variants:
        for seed in cfg.seeds:
            path = out / "runs" / f"{variant}_seed={seed}.json"
            if path.exists():
                results.append(json.loads(path.read_text()))
                continue
            start = time.process_time()
            trained = "rope" if variant.startswith("rope+") else variant  # +ntk / +yarn: rope's weights
            weights = out / "runs" / f"{trained}_seed={seed}.safetensors"
            if trained != variant and weights.exists():
                model, accs = (
                    _load(cfg, task, trained, weights),
                    json.loads((out / "runs" / f"{trained}_seed={seed}.json").read_text())["train_copy_acc"],
                )
            else:
                model, accs = train_model(cfg, task, trained, seed)
                save_file(model.state_dict(), str(weights))
            result = {
                "variant": variant,
                "seed": seed,
                "train_copy_acc": accs,
                "cpu_seconds": time.process_time() - start,
                "needle": evaluate(model, cfg, task, variant),
            }
            atomic_write(path, json.dumps(result))
            results.append(result)
            print(variant, seed, f"train copy acc {accs[-1]:.3f}", result["needle"], flush=True)
    summary = {"config": asdict(cfg), "task": asdict(task), "runs": results}
    atomic_write(out / "results.json", json.dumps(summary, indent=1))
    atomic_write(out / "table.md", format_table(cfg, results))
    plot(cfg, results, out / "needle.png")
    return summary


def format_table(cfg: RetrievalConfig, results: list[dict]) -> str:
    lengths = [str(cfg.train_length * m) for m in cfg.eval_multiples]
    lines = [
        "| variant | train copy acc | " + " | ".join(f"needle@{n}" for n in lengths) + " |",
        "|" + "---|" * (2 + len(lengths)),
    ]
    for variant in cfg.variants:
        runs = [r for r in results if r["variant"] == variant]
        train = ", ".join(f"{r['train_copy_acc'][-1]:.2f}" for r in runs)
        cells = []
        for n in lengths:
            vals = [r["needle"][n] for r in runs]
            cells.append(f"{statistics.fmean(vals):.3f} ({', '.join(f'{x:.2f}' for x in vals)})")
        lines.append(f"| {variant} | {train} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(cfg: RetrievalConfig, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [cfg.train_length * m for m in cfg.eval_multiples]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant in cfg.variants:
        runs = [r for r in results if r["variant"] == variant]
        mean = [statistics.fmean(r["needle"][str(n)] for r in runs) for n in lengths]
        ax.plot(lengths, mean, marker="o", label=variant)
        for r in runs:
            ax.scatter(lengths, [r["needle"][str(n)] for n in lengths], s=10, alpha=0.4)
    ax.axhline(1 / (CopyTask().vocab - CopyTask().n_filler), color="gray", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel(f"evaluation length (tokens; trained at {cfg.train_length})")
    ax.set_ylabel("needle copy accuracy (top-1)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    d = RetrievalConfig()
    p = OneLineParser(prog="python -m siattn.retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=d.out)
    p.add_argument("--steps", type=positive(int), default=d.steps)
    p.add_argument("--seeds", type=positive(int, 0), nargs="+", default=list(d.seeds))
    p.add_argument("--variants", nargs="+", default=list(d.variants), choices=list(VARIANTS))
    p.add_argument("--eval-multiples", type=positive(int), nargs="+", default=list(d.eval_multiples))
    p.add_argument("--lr", type=positive(float), default=d.lr)
    p.add_argument("--p-rope-base", type=positive(float), default=d.p_rope_base)
    p.add_argument("--tau", type=positive(float), default=d.tau)
    p.add_argument("--trials", type=positive(int), default=d.trials)
    a = p.parse_args(argv)
    if a.p_rope_base <= 1:
        p.error(f"--p-rope-base must be > 1, got {a.p_rope_base}")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        p.error(f"--out {a.out} exists and is not a folder")
    cfg = RetrievalConfig(
        out=a.out,
        steps=a.steps,
        seeds=tuple(a.seeds),
        variants=tuple(a.variants),
        eval_multiples=tuple(a.eval_multiples),
        lr=a.lr,
        p_rope_base=a.p_rope_base,
        tau=a.tau,
        trials=a.trials,
    )
    run(cfg)
    print((Path(cfg.out) / "table.md").read_text())


if __name__ == "__main__":
    main()
