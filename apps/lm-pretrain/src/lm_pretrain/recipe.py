"""The pretraining recipe: setup() -> train() -> evaluate() -> cleanup().

Runs unchanged in one process or under `accelerate launch` (DDP): the global batch of step s is a function of
(seed, s) only; each of the P processes takes its contiguous 1/P of it and accumulates gradients over micro
batches, DDP averages the gradients, so P processes take the same optimizer steps as one process with the
same global batch. Checkpoints (`shared_kernels.checkpoint`) are atomic and hold the optimizer, scheduler and
RNG states, so a killed run resumes at the last checkpoint and ends where an uninterrupted run ends.

Under accelerate's FSDP2 (`configs/accelerate/fsdp2.yaml`) the parameters are DTensor shards: checkpoints and
model.safetensors are gathered into whole tensors by every rank (`shared_kernels.distributed`) and written by
the main process, in the same format as above, and every rank runs the evaluation's forward passes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lm_pretrain.config import PretrainConfig
from lm_pretrain.data import (
    batch_offsets,
    check_corpus_fits,
    eval_offsets,
    load_corpus,
    split_corpus,
    windows,
)
from shared_kernels.checkpoint import CheckpointManager
from shared_kernels.distributed import full_state_dict, is_sharded
from shared_kernels.finite import check_finite_loss, check_finite_tensors
from shared_kernels.runconfig import (
    JSONLTracker,
    config_to_dict,
    make_trackers,
    write_json_atomic,
    write_yaml_atomic,
)

log = logging.getLogger("lm_pretrain")

# Precision name -> mxfp8train recipe preset name.
MX_PRESETS = {"mxfp8-rceil": "mxfp8-rceil", "mxfp8-floor": "mxfp8-floor", "mxfp8-e5m2-grad": "mxfp8-rceil-e5m2-grads"}


def apply_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Swap the block linears for mxfp8train's MXLinear under an MXFP8 preset, with clip / flush statistics on.

    The embedding, norms and the LM head (`head` in siattn's GPT) stay in high precision, as in the paper.
    """
    if precision not in MX_PRESETS:
        return model
    import mxfp8train

    preset = mxfp8train.recipe_from_name(MX_PRESETS[precision])
    recipe = preset.replace(skip_modules=(*preset.skip_modules, "head"), track_stats=True)
    return mxfp8train.convert(model, recipe)


def mx_clip_stats(model: torch.nn.Module) -> dict[str, float]:
    """Pooled clip and flush-to-zero fractions per tensor role since the last call (empty without MX layers)."""
    import mxfp8train

    if not mxfp8train.mx_layers(model):
        return {}
    pooled = mxfp8train.collect_stats(model)["__all__"]
    mxfp8train.reset_stats(model)
    out = {}
    for role, s in pooled.items():
        out[f"mx/{role}/clip_fraction"] = s["clip_fraction"]
        out[f"mx/{role}/flush_fraction"] = s["flush_fraction"]
    return out


def _lr_lambda(warmup: int, total: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


class PretrainRecipe:
    """One pretraining run of siattn's small GPT, configured by a `PretrainConfig`."""

    def __init__(self, cfg: PretrainConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.run_dir = Path(cfg.run_dir)
        self.start_step = 0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator

        from siattn.models import GPT, GPTConfig

        cfg, tc = self.cfg, self.cfg.train
        self.acc = Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision="no", log_with=make_trackers(self.run_dir, cfg.trackers, "lm-pretrain"),
            project_dir=str(self.run_dir),
        )
        _require_fsdp2(self.acc)
        world = self.acc.num_processes
        if tc.batch_size % (tc.micro_batch_size * world):
            raise ValueError(
                f"train.batch_size ({tc.batch_size}) must be a multiple of train.micro_batch_size x processes "
                f"({tc.micro_batch_size} x {world})"
            )
        self.per_rank = tc.batch_size // world
        self.accum = self.per_rank // tc.micro_batch_size
        self.train_tokens, self.val_tokens = split_corpus(load_corpus(cfg.data.corpus, cfg.data.max_bytes),
                                                          cfg.data.val_fraction)
        check_corpus_fits(len(self.train_tokens), len(self.val_tokens), tc.seq_len,
                          tc.seq_len * max(cfg.eval.length_multipliers))

        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_yaml_atomic(self.run_dir / "config.yaml", cfg)
            _log_to_file(self.run_dir / "train.log")
        self.acc.wait_for_everyone()
        m = cfg.model
        gpt_cfg = GPTConfig(
            vocab_size=256, n_layer=m.n_layer, d_model=m.d_model, n_head=m.n_head, n_kv_head=m.n_kv_head,
            mlp_ratio=m.mlp_ratio, position=m.position, attention=m.attention, rope_base=m.rope_base,
            p_rope_fraction=m.p_rope_fraction, p_rope_base=m.p_rope_base, tau=m.tau, train_length=tc.seq_len,
            qk_norm=m.qk_norm,
        )
        torch.manual_seed(tc.seed)
        model = apply_precision(GPT(gpt_cfg), tc.precision)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr, betas=(0.9, 0.95),
        )
        # Stepped by hand once per optimizer step (accelerate's wrapper would step it once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(tc.warmup_steps, tc.steps))
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints", keep=tc.keep_checkpoints, rank=self.acc.process_index,
            world_size=world, barrier=self.acc.wait_for_everyone,
        )
        self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        if cfg.resume:  # after prepare, so that a sharded (FSDP2) model and its optimizer take their shards
            state = self.ckpt.load(self.acc.unwrap_model(self.model), self.optimizer.optimizer, self.scheduler,
                                   max_step=tc.steps)
            if state is not None:
                self.start_step = state["step"]
                self.history = list(state["extra"].get("history", []))
                self._print(f"resumed from {state['path']} at step {self.start_step}")
                if self.acc.is_main_process:
                    JSONLTracker.truncate_after(self.run_dir / "metrics.jsonl", self.start_step)
        elif self.acc.is_main_process:
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        self.acc.init_trackers("lm-pretrain", config=_flat(config_to_dict(cfg)))
        n_params = sum(p.numel() for p in model.parameters())
        sharded = is_sharded(self.acc.unwrap_model(self.model))
        self.distributed = {"type": str(self.acc.distributed_type.value), "processes": world, "sharded": sharded}
        self._print(
            f"model: {m.n_layer} layers, width {m.d_model}, {m.position} + {m.attention} attention, "
            f"{n_params / 1e6:.2f}M params, precision {tc.precision}; {world} process(es)"
            f"{' (FSDP2: parameters sharded)' if sharded else ''}, "
            f"{self.accum} micro batch(es) of {tc.micro_batch_size} per step; corpus {cfg.data.corpus!r} "
            f"{len(self.train_tokens):,} train / {len(self.val_tokens):,} val bytes"
        )

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> list[dict[str, Any]]:
        """Train from `start_step` to `train.steps`; returns the logged history ({"step", "train/loss", ...})."""
        tc, acc = self.cfg.train, self.acc
        rank = acc.process_index
        autocast = (torch.autocast(acc.device.type, dtype=torch.bfloat16) if tc.precision == "bf16"
                    else contextlib.nullcontext())
        bar = tqdm(range(self.start_step, tc.steps), desc="train", initial=self.start_step, total=tc.steps,
                   disable=not (self.progress and acc.is_main_process), dynamic_ncols=True)
        self.model.train()
        t0 = time.perf_counter()
        for step in bar:
            offsets = batch_offsets(step, tc.seed, len(self.train_tokens), tc.seq_len, tc.batch_size)
            mine = offsets[rank * self.per_rank:(rank + 1) * self.per_rank]
            total = torch.zeros((), device=acc.device)
            for i, micro in enumerate(mine.split(tc.micro_batch_size)):
                x, y = windows(self.train_tokens, micro, tc.seq_len)
                x, y = x.to(acc.device), y.to(acc.device)
                sync = contextlib.nullcontext() if i == self.accum - 1 else acc.no_sync(self.model)
                with sync, autocast:
                    loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten()) / self.accum
                    acc.backward(loss)
                total += loss.detach()
            done = step + 1
            loss_value = acc.reduce(total, reduction="mean").item()
            check_finite_loss(loss_value, done)  # every process sees the reduced loss: all stop here together
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), tc.grad_clip) if tc.grad_clip > 0 else None
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if done % tc.log_every == 0 or done == tc.steps:
                row = {"step": done, "train/loss": loss_value, "lr": self.scheduler.get_last_lr()[0],
                       "elapsed_s": time.perf_counter() - t0}
                if grad_norm is not None:  # under FSDP2 a DTensor (possibly a partial norm): take the whole value
                    row["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                row.update(mx_clip_stats(acc.unwrap_model(self.model)))
                self.history.append(row)
                acc.log({k: v for k, v in row.items() if k != "step"}, step=done)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                log.info("step %d loss %.4f", done, loss_value)
            if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.steps:
                self.ckpt.save(done, acc.unwrap_model(self.model), self.optimizer.optimizer, self.scheduler,
                               extra={"history": self.history})
        bar.close()
        model = acc.unwrap_model(self.model)
        if acc.is_main_process or is_sharded(model):  # FSDP2: every rank gathers, the main process gets the weights
            state = full_state_dict(model)
        if acc.is_main_process:
            from safetensors.torch import save_file

            check_finite_tensors(state, str(self.run_dir / "model.safetensors"))
            save_file(state, str(self.run_dir / "model.safetensors.tmp"))
            (self.run_dir / "model.safetensors.tmp").replace(self.run_dir / "model.safetensors")
        acc.wait_for_everyone()
        return self.history

    # ---------------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss (nats/byte) at seq_len x each multiplier, and loss by position at the longest.

        Runs on the main process (the others wait), or on every rank when the model is sharded (FSDP2: each
        forward needs all ranks); the main process writes results.json, loss_by_position.png, report.md.
        """
        cfg, acc = self.cfg, self.acc
        results: dict[str, Any] = {}
        model = acc.unwrap_model(self.model)
        if acc.is_main_process or is_sharded(model):
            model.eval()
            autocast = (torch.autocast(acc.device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                        else contextlib.nullcontext())
            losses, curves = {}, {}
            for mult in tqdm(cfg.eval.length_multipliers, desc="evaluate",
                             disable=not (self.progress and acc.is_main_process)):
                length = cfg.train.seq_len * mult
                per_pos = torch.zeros(length, dtype=torch.float64)
                offsets = eval_offsets(len(self.val_tokens), length, cfg.eval.windows)
                for off in offsets:
                    x, y = windows(self.val_tokens, off[None], length)
                    with autocast:
                        logits = model(x.to(acc.device))
                    per_pos += F.cross_entropy(logits.float().flatten(0, 1), y.to(acc.device).flatten(),
                                               reduction="none").double().cpu()
                per_pos /= len(offsets)
                losses[length] = per_pos.mean().item()
                curves[length] = per_pos
            model.train()
        if acc.is_main_process:
            longest = max(curves)
            buckets = torch.tensor_split(curves[longest], cfg.eval.position_buckets)
            ends = torch.cumsum(torch.tensor([len(b) for b in buckets]), 0).tolist()
            results = {
                "val_loss": {str(k): v for k, v in losses.items()},
                "loss_by_position": {"length": longest, "bucket_end": ends, "loss": [b.mean().item() for b in buckets]},
                "final_train_loss": self.history[-1]["train/loss"] if self.history else None,
                "mx_stats": {k: v for k, v in (self.history[-1] if self.history else {}).items() if k.startswith("mx/")},
                "steps": cfg.train.steps,
                "distributed": self.distributed,
            }
            write_json_atomic(self.run_dir / "results.json", results)
            acc.log({f"val/loss@{k}": v for k, v in losses.items()}, step=cfg.train.steps)
            self._plot(results)
            self._report(results)
        acc.wait_for_everyone()
        return results

    def cleanup(self) -> None:
        self.acc.end_training()

    # ------------------------------------------------------------------------------------------ output
    def _plot(self, results: dict[str, Any]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        ax1.plot([r["step"] for r in self.history], [r["train/loss"] for r in self.history])
        ax1.set(xlabel="step", ylabel="train loss (nats/byte)", title="training")
        lp = results["loss_by_position"]
        ax2.plot(lp["bucket_end"], lp["loss"], marker="o")
        ax2.axvline(self.cfg.train.seq_len, color="grey", ls="--", label="training context")
        ax2.set(xscale="log", xlabel="position (bucket end)", ylabel="val loss", title="loss by position")
        ax2.legend()
        fig.tight_layout()
        fig.savefig(self.run_dir / "curves.png", dpi=110)
        plt.close(fig)

    def _report(self, results: dict[str, Any]) -> None:
        m, tc = self.cfg.model, self.cfg.train
        lines = [
            "# lm-pretrain report", "",
            f"{m.position} + {m.attention} attention, precision {tc.precision}, {tc.steps} steps at context "
            f"{tc.seq_len}, corpus {self.cfg.data.corpus!r}, seed {tc.seed}.", "",
            "| eval length | val loss (nats/byte) |", "|---|---|",
        ]
        lines += [f"| {k} | {v:.4f} |" for k, v in results["val_loss"].items()]
        if results["mx_stats"]:
            lines += ["", "MX diagnostics over the last logging interval (rank 0):", ""]
            lines += [f"- {k}: {v:.3g}" for k, v in results["mx_stats"].items()]
        lines += ["", "![curves](curves.png)", ""]
        (self.run_dir / "report.md").write_text("\n".join(lines))

    def _print(self, text: str) -> None:
        if self.acc.is_main_process:
            tqdm.write(f"[lm-pretrain] {text}")
            log.info(text)


def run(cfg: PretrainConfig, progress: bool = True) -> dict[str, Any]:
    """setup -> train -> evaluate -> cleanup; returns the evaluation results (main process)."""
    recipe = PretrainRecipe(cfg, progress=progress)
    recipe.setup()
    try:
        recipe.train()
        results = recipe.evaluate()
    finally:
        recipe.cleanup()
    return results


def _require_fsdp2(acc: Any) -> None:
    """FSDP (version 1) wraps parameters in flat buffers that the recipe cannot gather; FSDP2 shards DTensors."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise ValueError("FSDP version 1 is not supported: set fsdp_config.fsdp_version: 2 (configs/accelerate/fsdp2.yaml)")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, int | float | str | bool) or v is None else json.dumps(v)
    return out


def _log_to_file(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("lm_pretrain")
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            root.removeHandler(h)
            h.close()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
