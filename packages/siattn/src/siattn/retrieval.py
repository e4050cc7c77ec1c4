"""Retrieval at length: tiny LMs trained on a synthetic key-value recall task at one length, then probed
with the stored pairs far back in windows 4x, 16x and 32x longer.

Task (tokens): filler ids [0, n_filler); one "pair" token per (key, value); a query token per key and a
value token per value. A training window of length T is filler with the n_keys pairs (every key once,
random values) at random positions of its first half, and the n_keys queries, each followed by its value,
in random two-token slots of its second half. The loss is on the value after each query only (n_keys
targets per window), so nothing but retrieval lowers it: the query must find, by content, the one pair
token carrying its key among T filler tokens. Probe at length T: the pairs in the first quarter, filler, the
n_keys queries with their values as the last 2 n_keys tokens; top-1 accuracy on the values (chance
1 / n_values).

Every trained variant gets the same tuning budget: two settings (`GRIDS`), trained on seed 0 and chosen on
in-distribution validation loss; the other seeds train the chosen setting, and SI p-RoPE's tau = 10 (the
paper's) is trained on every seed beside the tuned tau. RoPE+NTK and RoPE+YaRN are the chosen RoPE weights
rescaled at evaluation for each length (`siattn.rope_scaling`, shared with `siattn.lengthgen`).

    python -m siattn.retrieval --out runs/retrieval                  # default study (see README for timing)
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from shared_kernels.errors import OneLineParser, positive
from shared_kernels.runconfig import save_figure_atomic, write_text_atomic
from siattn.lengthgen import (
    TrainConfig,
    claim_run,
    format_tests,
    paired_window_test,
    sample_sd,
    set_warmup_cosine_lr,
)
from siattn.models import GPT, GPTConfig
from siattn.rope_scaling import RESCALED, q_gains, rescale_rope


@dataclass(frozen=True)
class KVTask:
    """Token layout: filler [0, n_filler), pairs (key k, value v) at pair_id(k, v), queries at query0 + k,
    values at value0 + v."""

    n_filler: int = 32
    n_keys: int = 8
    n_values: int = 16

    def __post_init__(self) -> None:
        for name in ("n_filler", "n_keys", "n_values"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def query0(self) -> int:
        return self.n_filler + self.n_keys * self.n_values

    @property
    def value0(self) -> int:
        return self.query0 + self.n_keys

    @property
    def vocab(self) -> int:
        return self.value0 + self.n_values

    def pair_ids(self, values: torch.Tensor) -> torch.Tensor:
        """The pair token of key k with value values[k], for every key k."""
        return self.n_filler + torch.arange(self.n_keys) * self.n_values + values

    def min_length(self) -> int:
        """Shortest window holding the pairs in its first quarter and the queries in its second half."""
        return 4 * self.n_keys


def kv_batch(
    task: KVTask, batch: int, length: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows. Returns tokens (batch, length + 1) int64 and a loss mask (batch, length) bool, True
    at each query (whose next token is its value); deterministic given `gen`'s state."""
    if length < task.min_length():
        raise ValueError(f"length must be >= 4 * n_keys = {task.min_length()}, got {length}")
    tokens = torch.randint(0, task.n_filler, (batch, length + 1), generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    half = length // 2
    for b in range(batch):
        values = torch.randint(0, task.n_values, (task.n_keys,), generator=gen)
        tokens[b, torch.randperm(half, generator=gen)[: task.n_keys]] = task.pair_ids(values)
        slots = half + 2 * torch.randperm((length - half) // 2, generator=gen)[: task.n_keys]
        order = torch.randperm(task.n_keys, generator=gen)
        tokens[b, slots] = task.query0 + order
        tokens[b, slots + 1] = task.value0 + values[order]
        mask[b, slots] = True
    return tokens, mask


def kv_probe(task: KVTask, length: int, trials: int, seed: int) -> torch.Tensor:
    """Probe windows (trials, length): the pairs in the first quarter, filler, then the queries and their
    values as the last 2 n_keys tokens (deterministic in seed and length)."""
    if length < task.min_length():
        raise ValueError(f"length must be >= 4 * n_keys = {task.min_length()}, got {length}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
    tokens = torch.randint(0, task.n_filler, (trials, length), generator=gen)
    slots = _probe_slots(task, length)
    for b in range(trials):
        values = torch.randint(0, task.n_values, (task.n_keys,), generator=gen)
        tokens[b, torch.randperm(length // 4, generator=gen)[: task.n_keys]] = task.pair_ids(values)
        order = torch.randperm(task.n_keys, generator=gen)
        tokens[b, slots] = task.query0 + order
        tokens[b, slots + 1] = task.value0 + values[order]
    return tokens


def _probe_slots(task: KVTask, length: int) -> torch.Tensor:
    return length - 2 * task.n_keys + 2 * torch.arange(task.n_keys)


def probe_window_accuracy(task: KVTask, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy on the values of each `kv_probe` window: logits (trials, length, vocab) -> (trials,)."""
    slots = _probe_slots(task, tokens.shape[1])
    return (logits[:, slots].argmax(-1) == tokens[:, slots + 1]).float().mean(1)


def probe_accuracy(task: KVTask, logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Top-1 accuracy on the values of all `kv_probe` windows."""
    return probe_window_accuracy(task, logits, tokens).mean().item()


# Trained variants (GPTConfig overrides) and their tuning grids: two settings each.
VARIANTS: dict[str, dict[str, str]] = {
    "rope": {"position": "rope", "attention": "softmax"},
    "p-rope": {"position": "p-rope", "attention": "softmax"},
    "logn-learned+p-rope": {"position": "p-rope", "attention": "logn-learned"},
    "si-p-rope": {"position": "p-rope", "attention": "si"},
}
GRIDS: dict[str, list[dict[str, float]]] = {
    "rope": [{"rope_base": 10000.0}, {"rope_base": 500.0}],
    "p-rope": [{"p_rope_base": 8.0}, {"p_rope_base": 32.0}],
    "logn-learned+p-rope": [{"p_rope_base": 8.0}, {"p_rope_base": 32.0}],
    "si-p-rope": [{"tau": 1.0}, {"tau": 10.0}],
}
ALL_VARIANTS = (*VARIANTS, *RESCALED)  # RESCALED: the chosen RoPE weights rescaled at evaluation
PAPER_TAU = 10.0


@dataclass
class RetrievalConfig(TrainConfig):
    out: str = "runs/retrieval"
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_multiples: tuple[int, ...] = (1, 4, 16, 32)  # probes at 128 / 512 / 2048 / 4096
    variants: tuple[str, ...] = ALL_VARIANTS
    p_rope_base: float = 8.0
    trials: int = 64
    val_batches: int = 4
    workers: int = 1


def run_name(variant: str, setting: dict[str, float], seed: int) -> str:
    return "_".join([variant, *(f"{k}={v:g}" for k, v in sorted(setting.items())), f"seed={seed}"])


def _model(cfg: RetrievalConfig, task: KVTask, variant: str, setting: dict[str, float]) -> GPT:
    gpt: dict[str, Any] = {"p_rope_base": cfg.p_rope_base, **VARIANTS[variant], **setting}
    return GPT(
        GPTConfig(
            vocab_size=task.vocab,
            n_layer=cfg.n_layer,
            d_model=cfg.d_model,
            n_head=cfg.n_head,
            train_length=cfg.train_length,
            si_backend="chunked",
            **gpt,
        )
    )


def train_model(
    cfg: RetrievalConfig, task: KVTask, variant: str, setting: dict[str, float], seed: int
) -> tuple[GPT, list[float]]:
    """Train one model; returns it and the retrieval accuracy of every 100th training batch."""
    torch.manual_seed(seed)
    model = _model(cfg, task, variant, setting)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(10_000 + seed)
    accs = []
    for step in range(cfg.steps):
        set_warmup_cosine_lr(opt, cfg.lr, step, cfg.warmup, cfg.steps)
        tokens, mask = kv_batch(task, cfg.batch_size, cfg.train_length, gen)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits[mask], tokens[:, 1:][mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 99 or step == cfg.steps - 1:
            accs.append((logits[mask].argmax(-1) == tokens[:, 1:][mask]).float().mean().item())
            print(f"  {run_name(variant, setting, seed)} step {step + 1}: acc {accs[-1]:.3f}", flush=True)
    return model, accs


@torch.no_grad()
def validation_loss(model: GPT, cfg: RetrievalConfig, task: KVTask) -> float:
    """Mean loss on the values of held-out training-length windows (one fixed generator for every run)."""
    model.eval()
    gen = torch.Generator().manual_seed(999_999)
    losses = []
    for _ in range(cfg.val_batches):
        tokens, mask = kv_batch(task, cfg.batch_size, cfg.train_length, gen)
        logits = model(tokens[:, :-1])
        losses.append(F.cross_entropy(logits[mask], tokens[:, 1:][mask]).item())
    return statistics.fmean(losses)


@torch.no_grad()
def evaluate(
    model: GPT, cfg: RetrievalConfig, task: KVTask, variant: str, multiples: tuple[int, ...]
) -> dict[str, list[float]]:
    """Per-window probe accuracy at each of `multiples` x the training length: {str(length): [accuracy of
    window i]} (the windows depend on the length only, so lengths evaluated later add to earlier ones)."""
    model.eval()
    out = {}
    gains = q_gains(model) if variant in RESCALED else []
    for mult in multiples:
        length = cfg.train_length * mult
        if variant in RESCALED:
            rescale_rope(model, variant, mult, gains)
        tokens = kv_probe(task, length, cfg.trials, seed=0)
        chunks = tokens.split(max(1, 8192 // length))  # logits of ~8k tokens at a time
        out[str(length)] = torch.cat([probe_window_accuracy(task, model(c), c) for c in chunks]).tolist()
    return out


def _missing_multiples(cfg: RetrievalConfig, result: dict[str, Any] | None) -> tuple[int, ...]:
    """The evaluation multiples a stored result lacks (all of them when there is none)."""
    if result is None:
        return cfg.eval_multiples
    return tuple(m for m in cfg.eval_multiples if str(cfg.train_length * m) not in result["needle_windows"])


def _trained_model(
    cfg: RetrievalConfig, task: KVTask, variant: str, setting: dict[str, float], seed: int
) -> tuple[GPT, dict[str, Any]]:
    """A finished run's weights (the chosen RoPE weights for RoPE+NTK / +YaRN) and its training record."""
    runs = Path(cfg.out) / "runs"
    trained = "rope" if variant in RESCALED else variant
    model = _model(cfg, task, trained, setting)
    model.load_state_dict(load_file(str(runs / f"{run_name(trained, setting, seed)}.safetensors")))
    base = json.loads((runs / f"{run_name(trained, setting, seed)}.json").read_text())
    return model, {"train_acc": base["train_acc"], "val_loss": base["val_loss"]}


def _train_and_record(
    cfg: RetrievalConfig, task: KVTask, variant: str, setting: dict[str, float], seed: int
) -> tuple[GPT, dict[str, Any]]:
    """Train one model, save its weights, and measure its validation loss."""
    model, accs = train_model(cfg, task, variant, setting, seed)
    save_file(
        model.state_dict(), str(Path(cfg.out) / "runs" / f"{run_name(variant, setting, seed)}.safetensors")
    )
    return model, {"train_acc": accs, "val_loss": validation_loss(model, cfg, task)}


def run_one(cfg: RetrievalConfig, variant: str, setting: dict[str, float], seed: int) -> dict[str, Any]:
    """Train (or, for RoPE+NTK / +YaRN, load the RoPE weights of) one run and probe it; resumable: a
    finished run's json is read back, a finished run probed at fewer lengths than cfg.eval_multiples is
    reloaded and probed at the missing ones only, and a run another live process holds (its lock file) is
    waited for, so several processes may share cfg.out."""
    torch.set_num_threads(1)
    task = KVTask()
    name = run_name(variant, setting, seed)
    path, lock = Path(cfg.out) / "runs" / f"{name}.json", Path(cfg.out) / "runs" / f"{name}.lock"
    stored, finished = claim_run(path, lock, lambda r: not _missing_multiples(cfg, r))
    if finished:
        return stored
    missing = _missing_multiples(cfg, stored)
    start = time.process_time()
    if stored is None and variant not in RESCALED:
        model, record = _train_and_record(cfg, task, variant, setting, seed)
    else:
        model, record = _trained_model(cfg, task, variant, setting, seed)
    result = stored or {"variant": variant, "setting": setting, "seed": seed, **record, "needle_windows": {}}
    result["needle_windows"].update(evaluate(model, cfg, task, variant, missing))
    result["needle"] = {n: statistics.fmean(w) for n, w in result["needle_windows"].items()}
    result["cpu_seconds"] = result.get("cpu_seconds", 0.0) + time.process_time() - start
    write_text_atomic(path, json.dumps(result))
    lock.unlink(missing_ok=True)
    print(name, f"val loss {result['val_loss']:.3f}", result["needle"], flush=True)
    return result


def _run_jobs(cfg: RetrievalConfig, jobs: list[tuple[str, dict[str, float], int]]) -> list[dict[str, Any]]:
    if cfg.workers <= 1 or len(jobs) <= 1:
        return [run_one(cfg, *job) for job in jobs]
    with ProcessPoolExecutor(min(cfg.workers, len(jobs))) as pool:
        return list(pool.map(run_one, *zip(*[(cfg, *job) for job in jobs], strict=True)))


def _trained(cfg: RetrievalConfig) -> list[str]:
    """Variants that train weights: the selected ones, plus RoPE when only its rescalings are asked for."""
    needed = {v for v in cfg.variants if v in VARIANTS}
    if any(v in RESCALED for v in cfg.variants):
        needed.add("rope")
    return [v for v in VARIANTS if v in needed]


def run(cfg: RetrievalConfig) -> dict[str, Any]:
    """Tune every trained variant on seed 0 (GRIDS, in-distribution validation loss), train the chosen
    settings (and SI's tau = 10) on the other seeds, evaluate the RoPE rescalings on the chosen RoPE weights,
    and write results.json / table.md / needle.png in cfg.out (finished runs are read back)."""
    (Path(cfg.out) / "runs").mkdir(parents=True, exist_ok=True)
    trained = _trained(cfg)
    sweep = _run_jobs(cfg, [(v, s, cfg.seeds[0]) for v in trained for s in GRIDS[v]])
    chosen = {
        v: min((r for r in sweep if r["variant"] == v), key=lambda r: r["val_loss"])["setting"]
        for v in trained
    }
    jobs = [(v, chosen[v], seed) for v in trained for seed in cfg.seeds[1:]]
    if "si-p-rope" in trained and chosen["si-p-rope"]["tau"] != PAPER_TAU:
        jobs += [("si-p-rope", {"tau": PAPER_TAU}, seed) for seed in cfg.seeds[1:]]
    results = sweep + _run_jobs(cfg, jobs)
    rescaled = [(v, chosen["rope"], seed) for v in cfg.variants if v in RESCALED for seed in cfg.seeds]
    results += _run_jobs(cfg, rescaled)
    summary = summarise(cfg, results, chosen)
    out = Path(cfg.out)
    write_text_atomic(out / "results.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "table.md", format_table(cfg, summary))
    plot(cfg, summary, out / "needle.png")
    return summary


def _rows(
    cfg: RetrievalConfig, chosen: dict[str, dict[str, float]]
) -> list[tuple[str, str, dict[str, float]]]:
    """(row label, variant, setting) in table order: each variant at its chosen setting, and SI at tau = 10
    beside its tuned tau."""
    rows = []
    for v in cfg.variants:
        setting = chosen["rope" if v in RESCALED else v]
        rows.append((v, v, setting))
        if v == "si-p-rope" and setting["tau"] != PAPER_TAU:
            rows.append((f"si-p-rope (paper tau={PAPER_TAU:g})", v, {"tau": PAPER_TAU}))
    return rows


def _paired_test(a: list[dict[str, Any]], b: list[dict[str, Any]], length: str) -> dict[str, float]:
    """Paired t-test of per-window probe accuracy, a minus b, over probe windows x seeds (the same windows
    for both)."""
    return paired_window_test(
        {r["seed"]: r["needle_windows"][length] for r in a},
        {r["seed"]: r["needle_windows"][length] for r in b},
    )


def summarise(cfg: RetrievalConfig, results: list[dict[str, Any]], chosen: dict[str, dict[str, float]]):
    lengths = [str(cfg.train_length * m) for m in cfg.eval_multiples]
    rows, runs_by_label = {}, {}
    for label, variant, setting in _rows(cfg, chosen):
        runs = [r for r in results if r["variant"] == variant and r["setting"] == setting]
        runs_by_label[label] = runs
        rows[label] = {
            "setting": setting,
            "seeds": [r["seed"] for r in runs],
            "val_loss": [r["val_loss"] for r in runs],
            "train_acc": [r["train_acc"][-1] for r in runs],
            "needle": {n: [r["needle"][n] for r in runs] for n in lengths},
            "needle_mean": {n: statistics.fmean(r["needle"][n] for r in runs) for n in lengths},
            "needle_sd": {n: sample_sd([r["needle"][n] for r in runs]) for n in lengths},
        }
    tests: dict[str, dict[str, dict[str, float]]] = {}  # length -> "si-p-rope - other" -> test
    if "si-p-rope" in rows:
        for n in lengths[1:]:  # beyond the training length
            tests[n] = {
                f"si-p-rope - {other}": _paired_test(runs_by_label["si-p-rope"], runs_by_label[other], n)
                for other in rows
                if other != "si-p-rope"
            }
    sweep = [
        {"variant": r["variant"], "setting": r["setting"], "val_loss": r["val_loss"], "needle": r["needle"]}
        for r in results
        if r["seed"] == cfg.seeds[0] and r["variant"] in VARIANTS
    ]
    cpu = sum(r["cpu_seconds"] for r in results)
    return {
        "config": asdict(cfg),
        "task": asdict(KVTask()),
        "chosen": chosen,
        "rows": rows,
        "tests": tests,
        "sweep": sweep,
        "cpu_seconds": cpu,
    }


def format_table(cfg: RetrievalConfig, summary: dict[str, Any]) -> str:
    lengths = [str(cfg.train_length * m) for m in cfg.eval_multiples]
    lines = [
        "| variant | setting | val loss | " + " | ".join(f"acc@{n}" for n in lengths) + " |",
        "|" + "---|" * (3 + len(lengths)),
    ]
    for label, row in summary["rows"].items():
        setting = ", ".join(f"{k}={v:g}" for k, v in row["setting"].items())
        cells = [
            f"{row['needle_mean'][n]:.3f} ± {row['needle_sd'][n]:.3f} "
            f"({', '.join(f'{x:.2f}' for x in row['needle'][n])})"
            for n in lengths
        ]
        val = statistics.fmean(row["val_loss"])
        lines.append(f"| {label} | {setting} | {val:.3f} | " + " | ".join(cells) + " |")
    chance = 1 / KVTask().n_values
    lines += [
        "",
        f"Probe accuracy: mean ± sample sd over seeds {list(cfg.seeds)} (per seed); chance {chance:.3f}.",
        "",
        *format_tests(summary["tests"], "per-window probe accuracy", 3),
        "",
    ]
    lines += [f"Tuning sweep (seed {cfg.seeds[0]}, chosen on validation loss at {cfg.train_length}):", ""]
    for s in summary["sweep"]:
        setting = ", ".join(f"{k}={v:g}" for k, v in s["setting"].items())
        lines.append(f"- {s['variant']} ({setting}): val loss {s['val_loss']:.4f}")
    return "\n".join(lines) + "\n"


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot(cfg: RetrievalConfig, summary: dict[str, Any], path: Path) -> None:
    """Probe accuracy against evaluation length: one line per row (mean over seeds, shifted sideways a little
    so equal rows stay visible), seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [cfg.train_length * m for m in cfg.eval_multiples]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows = summary["rows"]
    for i, (label, row) in enumerate(rows.items()):
        # rows that coincide (several at 1.0) stay visible: a small sideways shift and their own marker each
        shift = 2 ** (0.04 * (i - (len(rows) - 1) / 2))
        xs = [n * shift for n in lengths]
        means = [row["needle_mean"][str(n)] for n in lengths]
        line = ax.plot(xs, means, marker=_MARKERS[i % len(_MARKERS)], label=label)[0]
        for x, n in zip(xs, lengths, strict=True):
            seeds = row["needle"][str(n)]
            ax.scatter([x] * len(seeds), seeds, s=12, alpha=0.5, color=line.get_color())
    ax.axhline(1 / KVTask().n_values, color="gray", linestyle=":", label="chance")
    ax.axvline(cfg.train_length, color="gray", linestyle="--", linewidth=0.8, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("key-value retrieval accuracy (top-1)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Retrieval beyond the training length ({cfg.train_length} tokens), seeds {list(cfg.seeds)}")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def parse_args(argv: list[str] | None = None) -> RetrievalConfig:
    d = RetrievalConfig()
    doc = (__doc__ or "").split("\n\n")[0]
    p = OneLineParser(prog="python -m siattn.retrieval", description=doc)
    p.add_argument("--out", default=d.out)
    p.add_argument("--steps", type=positive(int), default=d.steps)
    p.add_argument("--seeds", type=positive(int, 0), nargs="+", default=list(d.seeds))
    p.add_argument("--variants", nargs="+", default=list(d.variants), choices=list(ALL_VARIANTS))
    p.add_argument("--eval-multiples", type=positive(int), nargs="+", default=list(d.eval_multiples))
    p.add_argument("--lr", type=positive(float), default=d.lr)
    p.add_argument("--p-rope-base", type=positive(float), default=d.p_rope_base)
    p.add_argument("--trials", type=positive(int), default=d.trials)
    p.add_argument("--workers", type=positive(int), default=d.workers, help="parallel runs, one thread each")
    a = p.parse_args(argv)
    if a.p_rope_base <= 1:
        p.error(f"--p-rope-base must be > 1, got {a.p_rope_base}")
    if len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds must be distinct, got {a.seeds}")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        p.error(f"--out {a.out} exists and is not a folder")
    return RetrievalConfig(
        out=a.out,
        steps=a.steps,
        seeds=tuple(a.seeds),
        variants=tuple(a.variants),
        eval_multiples=tuple(a.eval_multiples),
        lr=a.lr,
        p_rope_base=a.p_rope_base,
        trials=a.trials,
        workers=a.workers,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    run(cfg)
    print((Path(cfg.out) / "table.md").read_text())


if __name__ == "__main__":
    main()
