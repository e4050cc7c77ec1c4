"""Length-generalisation study: byte-level LMs trained at a short context, evaluated at 1x / 4x / 16x.

Variants (REFERENCE section 1): RoPE, RoPE+NTK and RoPE+YaRN (the chosen RoPE weights with NTK-aware / YaRN
frequencies for each evaluation length, `siattn.rope_scaling`, as in `siattn.retrieval`), NoPE, ALiBi,
p-RoPE, LogN+p-RoPE (the p-RoPE models with the fixed LogN scale at evaluation: it is the identity up to the
training length, so training is the same),
learned-LogN p-RoPE (the paper's LogN baseline: Scalable-Softmax with a learned per-head scale, trained with
it, `GPTConfig(attention="logn-learned")` as in `siattn.retrieval`), SI p-RoPE. Every trained variant gets
the same tuning budget: one knob, the same number of settings (`run_grid`: RoPE's theta, NoPE's and ALiBi's
learning rate, p-RoPE's and learned-LogN p-RoPE's base, SI's tau at a fixed p-RoPE base), trained on seed 0
and chosen on in-distribution validation loss only; the other seeds then train the chosen setting, and SI at
the paper's tau = 10 is trained on every seed beside the tuned tau. Every run sees the same batches (one data
seed); seeds change the initialisation only.

Outputs in --out: runs/<run>.json (+ .safetensors weights; finished runs are skipped on restart, so the study
is resumable run by run), results.json, table.md, loss_by_position.png.

    siattn-lengthgen --out runs/lengthgen            # default config (README: time on 2 free cores)
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from shared_kernels.errors import OneLineParser, positive
from shared_kernels.runconfig import save_figure_atomic, write_text_atomic
from shared_kernels.significance import paired_t_test
from siattn.models import GPT, GPTConfig
from siattn.rope_scaling import RESCALED, q_gains, rescale_rope

# Trained variants -> GPTConfig overrides; the rows of `EVALUATED` are evaluated from their runs.
VARIANTS: dict[str, dict] = {
    "rope": {"position": "rope", "attention": "softmax"},
    "nope": {"position": "nope", "attention": "softmax"},
    "alibi": {"position": "alibi", "attention": "softmax"},
    "p-rope": {"position": "p-rope", "attention": "softmax"},
    "logn-learned+p-rope": {"position": "p-rope", "attention": "logn-learned"},
    "si-p-rope": {"position": "p-rope", "attention": "si"},
}
# Rows with no training of their own: label -> (the trained variant whose runs they evaluate, result key).
EVALUATED: dict[str, tuple[str, str]] = {
    "rope+ntk": ("rope", "eval_ntk"),
    "rope+yarn": ("rope", "eval_yarn"),
    "logn+p-rope": ("p-rope", "eval_logn"),
}
TABLE_ORDER = [
    "rope",
    "rope+ntk",
    "rope+yarn",
    "nope",
    "p-rope",
    "logn+p-rope",
    "logn-learned+p-rope",
    "alibi",
    "si-p-rope",
]
PAPER_TAU = 10.0
PAPER_TAU_ROW = f"si-p-rope (paper tau={PAPER_TAU:g})"


@dataclass
class TrainConfig:
    """What every study of tiny LMs trained at one length and evaluated at multiples of it shares (the
    length-generalisation study here, the retrieval study in `siattn.retrieval`)."""

    out: str = "runs/lengthgen"
    train_length: int = 128
    eval_multiples: tuple[int, ...] = (1, 4, 16)
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    seeds: tuple[int, ...] = (0, 1)


@dataclass
class StudyConfig(TrainConfig):
    """Everything a run depends on (stored with each result)."""

    data: str = ""
    data_seed: int = 1234
    # The tuning grid: the same number of settings for every trained variant (parse_args enforces it).
    rope_bases: tuple[float, ...] = (1e4, 500.0)  # RoPE theta
    lrs: tuple[float, ...] = (3e-3, 6e-3)  # NoPE and ALiBi: no positional knob, so the learning rate
    p_rope_bases: tuple[float, ...] = (8.0, 32.0)  # p-RoPE (LogN+p-RoPE: the same weights), learned LogN
    taus: tuple[float, ...] = (1.0, 10.0)  # SI p-RoPE, at si_p_rope_base
    si_p_rope_base: float = 8.0
    eval_tokens: int = 8192
    needle_trials: int = 16
    variants: tuple[str, ...] = ("rope", "nope", "alibi", "p-rope", "logn-learned+p-rope", "si-p-rope")
    workers: int = 2
    extra: dict = field(default_factory=dict)


def load_bytes(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The corpus as int64 byte ids, split 90% train / 10% validation (the tail)."""
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8).long()
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def sample_batch(data: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, length + 1) windows at random offsets drawn from `gen`."""
    starts = torch.randint(0, len(data) - length - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()])


def run_grid(cfg: StudyConfig, variant: str) -> list[dict]:
    """The settings swept for a variant on seed 0: one knob per variant, as many values for each ("lr" is
    the optimiser's learning rate, every other key a GPTConfig field)."""
    if variant == "rope":
        return [{"rope_base": b} for b in cfg.rope_bases]
    if variant in ("nope", "alibi"):
        return [{"lr": lr} for lr in cfg.lrs]
    if variant in ("p-rope", "logn-learned+p-rope"):
        return [{"p_rope_base": b} for b in cfg.p_rope_bases]
    if variant == "si-p-rope":
        return [{"p_rope_base": cfg.si_p_rope_base, "tau": t} for t in cfg.taus]
    raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")


def paper_tau_setting(cfg: StudyConfig) -> dict:
    """SI p-RoPE at the paper's tau = 10, reported beside the tuned tau."""
    return {"p_rope_base": cfg.si_p_rope_base, "tau": PAPER_TAU}


def run_name(variant: str, setting: dict, seed: int) -> str:
    parts = [variant] + [f"{k}={v:g}" for k, v in sorted(setting.items())] + [f"seed={seed}"]
    return "_".join(parts)


def model_config(cfg: StudyConfig, variant: str, setting: dict) -> GPTConfig:
    return GPTConfig(
        vocab_size=256,
        n_layer=cfg.n_layer,
        d_model=cfg.d_model,
        n_head=cfg.n_head,
        train_length=cfg.train_length,
        si_backend="chunked",
        **VARIANTS[variant],
        **{k: v for k, v in setting.items() if k != "lr"},
    )


@torch.no_grad()
def evaluate(model: GPT, val: torch.Tensor, cfg: StudyConfig, rescale: str | None = None) -> dict:
    """Mean loss (nats/byte), loss by position and loss by window over non-overlapping validation windows
    at each length (the same windows for every run: paired tests compare runs window by window), plus the
    needle-copy probe. rescale: "rope+ntk" | "rope+yarn" to rescale a RoPE model's frequencies for each
    length (`siattn.rope_scaling`; the model is left as trained afterwards)."""
    model.eval()
    out = {}
    gains = q_gains(model) if rescale else []
    for mult in cfg.eval_multiples:
        length = cfg.train_length * mult
        if rescale:
            rescale_rope(model, rescale, mult, gains)
        n_windows = max(1, min(cfg.eval_tokens // length, (len(val) - 1) // length))
        windows = torch.stack([val[i * length : i * length + length + 1] for i in range(n_windows)])
        per_pos, per_window = torch.zeros(length), []
        for chunk in windows.split(max(1, 16384 // length)):
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="none")
            per_pos += loss.view(len(chunk), length).sum(0)
            per_window += loss.view(len(chunk), length).mean(1).tolist()
        per_pos /= n_windows
        out[str(length)] = {
            "loss": per_pos.mean().item(),
            "loss_by_position": per_pos.tolist(),
            "loss_by_window": per_window,
            "needle": needle_accuracy(model, val, length, cfg.needle_trials),
        }
    if rescale:
        rescale_rope(model, rescale, 1, gains)
    return out


def needle_accuracy(model: GPT, val: torch.Tensor, length: int, trials: int, needle_len: int = 12) -> float:
    """Synthetic retrieval: a random lowercase string placed in the first quarter of a validation window is
    repeated at its end; the score is top-1 accuracy on the repeat's bytes 2..needle_len (the first byte is
    unpredictable), which only copying across ~3/4 of the window can give. Chance is about 1/26."""
    gen = torch.Generator().manual_seed(length)
    correct = total = 0
    for _ in range(trials):
        start = int(torch.randint(0, len(val) - length, (1,), generator=gen))
        seq = val[start : start + length].clone()
        needle = torch.randint(ord("a"), ord("z") + 1, (needle_len,), generator=gen)
        pos = int(torch.randint(1, max(2, length // 4 - needle_len), (1,), generator=gen))
        seq[pos : pos + needle_len] = needle
        seq[length - needle_len :] = needle
        logits = model(seq[None, :-1])[0]
        pred = logits[length - needle_len : length - 1].argmax(-1)  # predicts bytes at length-needle_len+1 ..
        correct += int((pred == seq[length - needle_len + 1 :]).sum())
        total += needle_len - 1
    return correct / total


def set_warmup_cosine_lr(opt: torch.optim.Optimizer, lr: float, step: int, warmup: int, steps: int) -> None:
    """Linear warmup over `warmup` steps, cosine decay over `steps`, floored at 5% of `lr`."""
    scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    for group in opt.param_groups:
        group["lr"] = lr * max(scale, 0.05)


def read_json_or_none(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def eval_keys(variant: str) -> list[str]:
    """The evaluations a trained variant's runs hold: "eval", plus one per row of `EVALUATED` read from it."""
    return ["eval", *(key for base, key in EVALUATED.values() if base == variant)]


def _missing(cfg: StudyConfig, result: dict) -> list[str]:
    """The evaluations (`eval_keys`) a stored result lacks or holds incompletely: without some evaluation
    length or per-window losses (such runs are reloaded and evaluated again for those only, not retrained)."""
    lengths = [str(cfg.train_length * m) for m in cfg.eval_multiples]
    return [
        key
        for key in eval_keys(result["variant"])
        if not all(n in result.get(key, {}) and "loss_by_window" in result[key][n] for n in lengths)
    ]


def _train(cfg: StudyConfig, variant: str, setting: dict, seed: int) -> tuple[GPT, dict]:
    """Train one model; returns it and its training record."""
    train, _ = load_bytes(cfg.data)
    mcfg = model_config(cfg, variant, setting)
    torch.manual_seed(seed)
    model = GPT(mcfg)
    lr = setting.get("lr", cfg.lr)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(cfg.data_seed)  # same batches for every variant and seed
    start = time.time()
    name = run_name(variant, setting, seed)
    for step in tqdm(range(cfg.steps), desc=name, leave=False, mininterval=10):
        set_warmup_cosine_lr(opt, lr, step, cfg.warmup, cfg.steps)
        batch = sample_batch(train, cfg.batch_size, cfg.train_length, gen)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    record = {
        "name": name,
        "variant": variant,
        "setting": setting,
        "seed": seed,
        "model": asdict(mcfg),
        "train_seconds": time.time() - start,
        "final_train_loss": loss.item(),
    }
    return model, record


def _evaluate_run(model: GPT, cfg: StudyConfig, keys: list[str]) -> dict:
    """The evaluations `keys` of one run: "eval" as trained; "eval_logn" (p-RoPE) the same weights with
    LogN scaling beyond the training length; "eval_ntk" / "eval_yarn" (RoPE) the same weights with NTK-aware
    / YaRN frequencies for each length."""
    _, val = load_bytes(cfg.data)
    rescales = {EVALUATED[label][1]: label for label in RESCALED}  # "eval_ntk" -> "rope+ntk", ...
    out = {}
    for key in keys:
        if key == "eval_logn":
            model.cfg.attention = "logn"
            out[key] = evaluate(model, val, cfg)
            model.cfg.attention = "softmax"
        else:
            out[key] = evaluate(model, val, cfg, rescale=rescales.get(key))
    return out


def train_one(cfg: StudyConfig, variant: str, setting: dict, seed: int) -> dict:
    """Train and evaluate one model. Resumable: a finished run's result is read back (reloaded and evaluated
    again when it lacks an evaluation, see `_complete`), and a run another live process holds (its lock
    file) is waited for, so several processes may share cfg.out."""
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    runs = Path(cfg.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    name = run_name(variant, setting, seed)
    result_path, lock, weights = runs / f"{name}.json", runs / f"{name}.lock", runs / f"{name}.safetensors"
    stored, finished = claim_run(result_path, lock, lambda r: not _missing(cfg, r))
    if finished:
        return stored
    cpu_start = time.process_time()
    if stored is None:
        model, result = _train(cfg, variant, setting, seed)
        save_file(model.state_dict(), str(weights))
    else:
        model, result = GPT(model_config(cfg, variant, setting)), stored
        model.load_state_dict(load_file(str(weights)))
    result.update(_evaluate_run(model, cfg, _missing(cfg, result)))
    result["cpu_seconds"] = result.get("cpu_seconds", 0.0) + time.process_time() - cpu_start
    write_text_atomic(result_path, json.dumps(result))
    lock.unlink(missing_ok=True)
    return result


def claim_run(path: Path, lock: Path, finished: Callable[[dict], bool]) -> tuple[Any, bool]:
    """A run's stored result and whether it is finished. Finished: returned as stored, no lock taken.
    Otherwise this process waits for any other live process holding the run's lock (then looks again),
    takes the lock and returns what is stored (None or an unfinished result); the caller completes the run
    and removes the lock."""
    stored = read_json_or_none(path)
    if stored is not None and finished(stored):
        return stored, True
    while not claim_lock(lock):  # another live process holds this run: wait for it, then look again
        time.sleep(10)
    stored = read_json_or_none(path)
    if stored is not None and finished(stored):
        lock.unlink(missing_ok=True)
        return stored, True
    return stored, False


def claim_lock(lock: Path) -> bool:
    """Take the run's lock file unless a live process holds it (several processes may share --out)."""
    try:
        holder = int(lock.read_text())
        os.kill(holder, 0)
        return holder == os.getpid()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        write_text_atomic(lock, str(os.getpid()))
        return True
    except PermissionError:
        return False


def _run_jobs(cfg: StudyConfig, jobs: list[tuple[str, dict, int]]) -> list[dict]:
    if cfg.workers <= 1:
        return [train_one(cfg, *job) for job in tqdm(jobs, desc="runs")]
    with ProcessPoolExecutor(cfg.workers) as pool:
        futures = [pool.submit(train_one, cfg, *job) for job in jobs]
        return [f.result() for f in tqdm(futures, desc="runs")]


def run_study(cfg: StudyConfig) -> dict:
    """Sweep on seed 0, select on in-distribution validation loss, train the other seeds, aggregate."""
    first = [(v, s, cfg.seeds[0]) for v in cfg.variants for s in run_grid(cfg, v)]
    results = _run_jobs(cfg, first)
    in_dist = str(cfg.train_length)
    chosen = {}
    for v in cfg.variants:
        candidates = [r for r in results if r["variant"] == v]
        chosen[v] = min(candidates, key=lambda r: r["eval"][in_dist]["loss"])["setting"]
    rest = [(v, chosen[v], seed) for v in cfg.variants for seed in cfg.seeds[1:]]
    paper = paper_tau_setting(cfg)
    if "si-p-rope" in chosen and chosen["si-p-rope"] != paper:  # then tau = 10 trains on every seed too
        swept = paper in run_grid(cfg, "si-p-rope")
        rest += [("si-p-rope", paper, seed) for seed in (cfg.seeds[1:] if swept else cfg.seeds)]
    results += _run_jobs(cfg, rest)
    summary = summarise(cfg, results, chosen)
    out = Path(cfg.out)
    write_text_atomic(out / "results.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "table.md", format_table(cfg, summary))
    plot_loss_by_position(cfg, summary, out / "loss_by_position.png")
    return summary


def table_rows(cfg: StudyConfig, chosen: dict) -> list[tuple[str, str, dict, str]]:
    """(row label, trained variant, setting, eval key) in table order: each variant at its chosen setting,
    the `EVALUATED` rows from the chosen runs of theirs (RoPE+NTK / +YaRN from RoPE's, LogN+p-RoPE from
    p-RoPE's), and SI at the paper's tau = 10 beside its tuned tau."""
    rows = []
    for name in TABLE_ORDER:
        base, key = EVALUATED.get(name, (name, "eval"))
        if base not in chosen:
            continue
        rows.append((name, base, chosen[base], key))
        if name == "si-p-rope" and chosen[name] != paper_tau_setting(cfg):
            rows.append((PAPER_TAU_ROW, name, paper_tau_setting(cfg), "eval"))
    return rows


def paired_window_test(a: dict[int, list[float]], b: dict[int, list[float]]) -> dict[str, float]:
    """Paired t-test (`shared_kernels.significance`) of a per-window score, a minus b, over evaluation
    windows x seeds. a, b: seed -> the score of each window (the same windows, in the same order, for both);
    seeds in only one of them are left out."""
    pairs = [(x, y) for seed in a if seed in b for x, y in zip(a[seed], b[seed], strict=True)]
    if not pairs:
        return {"difference": math.nan, "p": math.nan, "n": 0}
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    mean = statistics.fmean(x - y for x, y in pairs)
    p = paired_t_test(xs, ys)[1] if len(pairs) > 1 else (1.0 if mean == 0.0 else 0.0)
    return {"difference": mean, "p": p, "n": len(pairs)}


def sample_sd(xs: list[float]) -> float:
    """Sample standard deviation over seeds (0 for a single seed)."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _row(cfg: StudyConfig, runs: list[dict], key: str, setting: dict) -> dict[str, Any]:
    """One table row: per length, loss mean / sd / per seed, needle accuracy, the mean loss curve."""
    row: dict[str, Any] = {"setting": setting, "seeds": [r["seed"] for r in runs], "by_length": {}}
    for mult in cfg.eval_multiples:
        length = str(cfg.train_length * mult)
        losses = [r[key][length]["loss"] for r in runs]
        needles = [r[key][length]["needle"] for r in runs]
        curves = torch.tensor([r[key][length]["loss_by_position"] for r in runs]).mean(0)
        row["by_length"][length] = {
            "loss_mean": statistics.fmean(losses),
            "loss_sd": sample_sd(losses),
            "loss_min": min(losses),
            "loss_max": max(losses),
            "needle_mean": statistics.fmean(needles),
            "losses": losses,
            "needles": needles,
            "loss_by_position": curves.tolist(),
        }
    return row


def _tests(cfg: StudyConfig, runs: dict[str, tuple[list[dict], str]]) -> dict[str, dict[str, dict]]:
    """Tuned SI p-RoPE minus every other row, per-window loss, at each length beyond training (negative:
    SI lower). runs: row label -> (its runs, the eval key they are read from)."""
    if "si-p-rope" not in runs:
        return {}

    def windows(label: str, n: str) -> dict[int, list[float]]:
        rows, key = runs[label]
        return {r["seed"]: r[key][n]["loss_by_window"] for r in rows}

    tests: dict[str, dict[str, dict]] = {}
    for mult in cfg.eval_multiples[1:]:
        n = str(cfg.train_length * mult)
        tests[n] = {
            f"si-p-rope - {label}": paired_window_test(windows("si-p-rope", n), windows(label, n))
            for label in runs
            if label != "si-p-rope"
        }
    return tests


def summarise(cfg: StudyConfig, results: list[dict], chosen: dict) -> dict:
    rows, runs_by_label = {}, {}
    for name, base, setting, key in table_rows(cfg, chosen):
        runs = [r for r in results if r["variant"] == base and r["setting"] == setting]
        runs_by_label[name] = (runs, key)
        rows[name] = _row(cfg, runs, key, setting)
    sweep = [
        {
            "variant": r["variant"],
            "setting": r["setting"],
            "seed": r["seed"],
            "loss_in_dist": r["eval"][str(cfg.train_length)]["loss"],
            "loss": {n: e["loss"] for n, e in r["eval"].items()},
        }
        for r in results
    ]
    cpu = sum(r.get("cpu_seconds", 0.0) for r in results)
    return {
        "config": asdict(cfg),
        "chosen": chosen,
        "rows": rows,
        "tests": _tests(cfg, runs_by_label),
        "sweep": sweep,
        "cpu_seconds": cpu,
    }


def format_tests(tests: dict[str, dict[str, dict]], what: str, digits: int) -> list[str]:
    """Markdown lines for paired tests by length: {length: {"a - b": paired_window_test result}}."""
    lines = [f"Paired t-tests of {what} over windows x seeds:", ""]
    for n, by_name in tests.items():
        for name, t in by_name.items():
            lines.append(f"- {name} at {n}: {t['difference']:+.{digits}f}, n = {t['n']}, p = {t['p']:.2g}")
    return lines


def format_table(cfg: StudyConfig, summary: dict) -> str:
    lengths = [str(cfg.train_length * m) for m in cfg.eval_multiples]
    head = (
        "| variant | setting | "
        + " | ".join(f"loss@{n}" for n in lengths)
        + " | "
        + " | ".join(f"needle@{n}" for n in lengths)
        + " |"
    )
    lines = [head, "|" + "---|" * (2 + 2 * len(lengths))]
    for name, row in summary["rows"].items():
        setting = ", ".join(f"{k}={v:g}" for k, v in row["setting"].items()) or "-"
        cells = [
            f"{row['by_length'][n]['loss_mean']:.3f} ± {row['by_length'][n]['loss_sd']:.3f}" for n in lengths
        ]
        cells += [f"{row['by_length'][n]['needle_mean']:.2f}" for n in lengths]
        lines.append(f"| {name} | {setting} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Loss in nats/byte, mean ± sample sd over seeds {list(cfg.seeds)}; needle = copy accuracy.",
        "",
        *format_tests(summary["tests"], "per-window validation loss (negative: SI p-RoPE lower)", 4),
        "",
    ]
    lines += [f"Selection sweep (seed {cfg.seeds[0]}, chosen on validation loss at {lengths[0]}):", ""]
    for s in summary["sweep"]:
        if s["seed"] == cfg.seeds[0]:
            setting = ", ".join(f"{k}={v:g}" for k, v in s["setting"].items())
            at = " / ".join(f"{s['loss'][n]:.4f}" for n in lengths)
            lines.append(
                f"- {s['variant']} ({setting}): {s['loss_in_dist']:.4f} (at {' / '.join(lengths)}: {at})"
            )
    return "\n".join(lines) + "\n"


def plot_loss_by_position(cfg: StudyConfig, summary: dict, path: Path, bin_size: int = 32) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    length = str(cfg.train_length * max(cfg.eval_multiples))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, row in summary["rows"].items():
        curve = torch.tensor(row["by_length"][length]["loss_by_position"])
        n = len(curve) // bin_size * bin_size
        binned = curve[:n].view(-1, bin_size).mean(1)
        style = "--" if name in EVALUATED else "-"  # evaluated from another row's weights: dashed
        ax.plot((torch.arange(len(binned)) + 0.5) * bin_size, binned, style, label=name)
    ax.axvline(cfg.train_length, color="gray", linestyle=":", label="training length")
    ax.set_xlabel("position in window (bytes)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"Loss by position at evaluation length {length} (mean over seeds, bins of {bin_size})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)  # outside: never over the curves
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


MIN_TRAIN_LENGTH = 16  # the needle probe places a 12-byte needle in the first quarter and at the end


def parse_args(argv: list[str] | None = None) -> StudyConfig:
    """The study's options, validated before any work starts (a user error exits 2 with one line)."""
    d = StudyConfig()
    p = OneLineParser(prog="siattn-lengthgen", description=__doc__.split("\n\n")[0])
    pos_int, pos_float = positive(int), positive(float)
    p.add_argument(
        "--data", default=None, help="text file (default: <shared data>/tinyshakespeare/input.txt)"
    )
    p.add_argument("--out", default=d.out)
    p.add_argument("--train-length", type=positive(int, MIN_TRAIN_LENGTH), default=d.train_length)
    p.add_argument("--eval-multiples", type=pos_int, nargs="+", default=list(d.eval_multiples))
    p.add_argument("--steps", type=pos_int, default=d.steps)
    p.add_argument("--batch-size", type=pos_int, default=d.batch_size)
    p.add_argument("--lr", type=pos_float, default=d.lr)
    p.add_argument("--warmup", type=pos_int, default=d.warmup)
    p.add_argument("--n-layer", type=pos_int, default=d.n_layer)
    p.add_argument("--d-model", type=pos_int, default=d.d_model)
    p.add_argument("--n-head", type=pos_int, default=d.n_head)
    p.add_argument("--seeds", type=positive(int, 0), nargs="+", default=list(d.seeds))
    p.add_argument("--rope-bases", type=pos_float, nargs="+", default=list(d.rope_bases), help="RoPE grid")
    p.add_argument("--lrs", type=pos_float, nargs="+", default=list(d.lrs), help="NoPE and ALiBi grid")
    p.add_argument("--p-rope-bases", type=pos_float, nargs="+", default=list(d.p_rope_bases))
    p.add_argument("--taus", type=pos_float, nargs="+", default=list(d.taus), help="SI p-RoPE grid")
    p.add_argument("--si-p-rope-base", type=pos_float, default=d.si_p_rope_base)
    p.add_argument("--eval-tokens", type=pos_int, default=d.eval_tokens)
    p.add_argument("--needle-trials", type=pos_int, default=d.needle_trials)
    p.add_argument("--variants", nargs="+", default=list(d.variants), choices=list(VARIANTS))
    p.add_argument("--workers", type=pos_int, default=d.workers, help="parallel runs (one CPU thread each)")
    a = p.parse_args(argv)
    if a.d_model % a.n_head or (a.d_model // a.n_head) % 2:
        p.error(
            f"--d-model {a.d_model} must be a multiple of --n-head {a.n_head} with an even head width "
            "(rotary pairs)"
        )
    for option, bases in (("--rope-bases", a.rope_bases), ("--p-rope-bases", a.p_rope_bases)):
        if any(b <= 1 for b in bases):
            p.error(f"{option} must be > 1, got {bases}")
    if a.si_p_rope_base <= 1:
        p.error(f"--si-p-rope-base must be > 1, got {a.si_p_rope_base}")
    grids = {"--rope-bases": a.rope_bases, "--lrs": a.lrs, "--p-rope-bases": a.p_rope_bases, "--taus": a.taus}
    if len({len(g) for g in grids.values()}) > 1:
        sizes = ", ".join(f"{k} {len(g)}" for k, g in grids.items())
        p.error(f"the tuning grids must have the same number of values (one budget per variant), got {sizes}")
    if len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds must be distinct, got {a.seeds}")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        p.error(f"--out {a.out} exists and is not a folder")
    data = a.data
    if data is None:
        from shared_kernels.testing import shared_data_dir

        root = shared_data_dir()
        if root is None:
            p.error("no --data given and the shared data folder was not found")
        else:
            data = str(root / "tinyshakespeare" / "input.txt")
    if not Path(data).is_file():
        p.error(f"--data {data} is not a file")
    size = Path(data).stat().st_size
    longest = a.train_length * max(a.eval_multiples)
    if size - int(0.9 * size) < longest + 2 or int(0.9 * size) < a.train_length + 2:
        p.error(
            f"--data {data} has {size} bytes: its 10% validation tail must hold one window of "
            f"{longest} + 1 bytes (--train-length x the largest --eval-multiples)"
        )
    return StudyConfig(
        data=data,
        out=a.out,
        train_length=a.train_length,
        eval_multiples=tuple(a.eval_multiples),
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup=a.warmup,
        n_layer=a.n_layer,
        d_model=a.d_model,
        n_head=a.n_head,
        seeds=tuple(a.seeds),
        rope_bases=tuple(a.rope_bases),
        lrs=tuple(a.lrs),
        p_rope_bases=tuple(a.p_rope_bases),
        taus=tuple(a.taus),
        si_p_rope_base=a.si_p_rope_base,
        eval_tokens=a.eval_tokens,
        needle_trials=a.needle_trials,
        variants=tuple(a.variants),
        workers=a.workers,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    summary = run_study(cfg)
    print(format_table(cfg, summary))
    print(f"results in {cfg.out}/results.json, plot in {cfg.out}/loss_by_position.png")


if __name__ == "__main__":
    main()
