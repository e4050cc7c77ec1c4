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
import logging
import math
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
from lm_pretrain.plots import plot_curves
from shared_kernels.app import flat_config, log_to_file, make_accelerator, require_fsdp2, run_recipe
from shared_kernels.checkpoint import CheckpointManager
from shared_kernels.distributed import full_state_dict, is_sharded
from shared_kernels.finite import check_finite_tensors
from shared_kernels.runconfig import config_to_dict, write_json_atomic, write_yaml_atomic
from shared_kernels.training import LoopSettings, run_loop

log = logging.getLogger("lm_pretrain")

# Precision name -> mxfp8train recipe preset name.
MX_PRESETS = {
    "mxfp8-rceil": "mxfp8-rceil",
    "mxfp8-floor": "mxfp8-floor",
    "mxfp8-e5m2-grad": "mxfp8-rceil-e5m2-grads",
}


def apply_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Swap the block linears for mxfp8train's MXLinear under an MXFP8 preset, with clip / flush statistics
    on.

    The embedding, norms and the LM head (`head` in siattn's GPT) stay in high precision, as in the paper.
    """
    if precision not in MX_PRESETS:
        return model
    import mxfp8train

    preset = mxfp8train.recipe_from_name(MX_PRESETS[precision])
    recipe = preset.replace(skip_modules=(*preset.skip_modules, "head"), track_stats=True)
    return mxfp8train.convert(model, recipe)


def mx_clip_stats(model: torch.nn.Module) -> dict[str, float]:
    """Pooled clip and flush-to-zero fractions per tensor role since the last call (empty without MX
    layers)."""
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
        from siattn.models import GPT, GPTConfig

        cfg, tc = self.cfg, self.cfg.train
        self.acc = make_accelerator(self.run_dir, cfg.trackers, "lm-pretrain")
        require_fsdp2(self.acc, "configs/accelerate/fsdp2.yaml")
        world = self.acc.num_processes
        if tc.batch_size % (tc.micro_batch_size * world):
            raise ValueError(
                f"train.batch_size ({tc.batch_size}) must be a multiple of "
                f"train.micro_batch_size x processes ({tc.micro_batch_size} x {world})"
            )
        self.per_rank = tc.batch_size // world
        self.accum = self.per_rank // tc.micro_batch_size
        self.train_tokens, self.val_tokens = split_corpus(
            load_corpus(cfg.data.corpus, cfg.data.max_bytes), cfg.data.val_fraction
        )
        check_corpus_fits(
            len(self.train_tokens),
            len(self.val_tokens),
            tc.seq_len,
            tc.seq_len * max(cfg.eval.length_multipliers),
        )

        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_yaml_atomic(self.run_dir / "config.yaml", cfg)
            log_to_file(self.run_dir / "train.log", "lm_pretrain")
        self.acc.wait_for_everyone()
        m = cfg.model
        gpt_cfg = GPTConfig(
            vocab_size=256,
            n_layer=m.n_layer,
            d_model=m.d_model,
            n_head=m.n_head,
            n_kv_head=m.n_kv_head,
            mlp_ratio=m.mlp_ratio,
            position=m.position,
            attention=m.attention,
            rope_base=m.rope_base,
            p_rope_fraction=m.p_rope_fraction,
            p_rope_base=m.p_rope_base,
            tau=m.tau,
            train_length=tc.seq_len,
            qk_norm=m.qk_norm,
        )
        torch.manual_seed(tc.seed)
        self.model = apply_precision(GPT(gpt_cfg), tc.precision)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr,
            betas=(0.9, 0.95),
        )
        # Stepped by the loop once per optimizer step (accelerate's wrapper would step it once per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(tc.warmup_steps, tc.steps)
        )
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints",
            keep=tc.keep_checkpoints,
            rank=self.acc.process_index,
            world_size=world,
            barrier=self.acc.wait_for_everyone,
        )
        if not cfg.resume and self.acc.is_main_process:
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        self.acc.init_trackers("lm-pretrain", config=flat_config(config_to_dict(cfg)))
        n_params = sum(p.numel() for p in self.model.parameters())
        self._print(
            f"model: {m.n_layer} layers, width {m.d_model}, {m.position} + {m.attention} attention, "
            f"{n_params / 1e6:.2f}M params, precision {tc.precision}; {world} process(es)"
            f"{' (FSDP2: parameters sharded)' if self.acc.distributed_type.value == 'FSDP' else ''}, "
            f"{self.accum} micro batch(es) of {tc.micro_batch_size} per step; corpus {cfg.data.corpus!r} "
            f"{len(self.train_tokens):,} train / {len(self.val_tokens):,} val bytes"
        )

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> list[dict[str, Any]]:
        """Train to `train.steps` (resuming from the latest checkpoint when `resume`) with the shared loop;
        returns the logged history ({"step", "train/loss", "lr", "grad_norm", mx statistics, ...})."""
        tc, acc = self.cfg.train, self.acc
        autocast = (
            torch.autocast(acc.device.type, dtype=torch.bfloat16)
            if tc.precision == "bf16"
            else contextlib.nullcontext()
        )

        def window(step: int) -> list[torch.Tensor]:  # the global batch of `step`, in micro batches
            offsets = batch_offsets(step, tc.seed, len(self.train_tokens), tc.seq_len, tc.batch_size)
            return list(offsets.split(tc.micro_batch_size))

        def loss_fn(model: torch.nn.Module, micro: torch.Tensor) -> torch.Tensor:
            x, y = windows(self.train_tokens, micro, tc.seq_len)
            with autocast:
                return F.cross_entropy(model(x.to(acc.device)).flatten(0, 1), y.to(acc.device).flatten())

        settings = LoopSettings(
            steps=tc.steps,
            phase="train",
            log_every=tc.log_every,
            checkpoint_every=tc.checkpoint_every,
            max_grad_norm=tc.grad_clip,
            resume=self.cfg.resume,
            progress=self.progress,
        )
        state = run_loop(
            acc,
            self.model,
            self.optimizer,
            self.scheduler,
            window,
            loss_fn,
            settings,
            self.ckpt,
            metrics_file=self.run_dir / "metrics.jsonl",
            extra_metrics=mx_clip_stats,
            logger=log,
        )
        self.model, self.optimizer = state.model, state.optimizer
        self.start_step, self.history = state.start_step, state.history
        if state.resumed_from is not None:
            self._print(f"resumed from {state.resumed_from} at step {self.start_step}")
        model = acc.unwrap_model(self.model)
        sharded = is_sharded(model)
        self.distributed = {
            "type": str(acc.distributed_type.value),
            "processes": acc.num_processes,
            "sharded": sharded,
        }
        if acc.is_main_process or sharded:  # FSDP2: every rank gathers, the main process gets the weights
            weights = full_state_dict(model)
        if acc.is_main_process:
            from safetensors.torch import save_file

            check_finite_tensors(weights, str(self.run_dir / "model.safetensors"))
            save_file(weights, str(self.run_dir / "model.safetensors.tmp"))
            (self.run_dir / "model.safetensors.tmp").replace(self.run_dir / "model.safetensors")
        acc.wait_for_everyone()
        return self.history

    # ---------------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss (nats/byte) at seq_len x each multiplier, and loss by position at the longest.

        Runs on the main process (the others wait), or on every rank when the model is sharded (FSDP2: each
        forward needs all ranks); the main process writes results.json, curves.png, report.md.
        """
        cfg, acc = self.cfg, self.acc
        results: dict[str, Any] = {}
        model = acc.unwrap_model(self.model)
        if acc.is_main_process or is_sharded(model):
            model.eval()
            autocast = (
                torch.autocast(acc.device.type, dtype=torch.bfloat16)
                if cfg.train.precision == "bf16"
                else contextlib.nullcontext()
            )
            losses, curves = {}, {}
            for mult in tqdm(
                cfg.eval.length_multipliers,
                desc="evaluate",
                disable=not (self.progress and acc.is_main_process),
            ):
                length = cfg.train.seq_len * mult
                per_pos = torch.zeros(length, dtype=torch.float64)
                offsets = eval_offsets(len(self.val_tokens), length, cfg.eval.windows)
                for off in offsets:
                    x, y = windows(self.val_tokens, off[None], length)
                    with autocast:
                        logits = model(x.to(acc.device))
                    per_pos += (
                        F.cross_entropy(
                            logits.float().flatten(0, 1), y.to(acc.device).flatten(), reduction="none"
                        )
                        .double()
                        .cpu()
                    )
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
                "loss_by_position": {
                    "length": longest,
                    "bucket_end": ends,
                    "loss": [b.mean().item() for b in buckets],
                },
                "final_train_loss": self.history[-1]["train/loss"] if self.history else None,
                "mx_stats": {
                    k: v for k, v in (self.history[-1] if self.history else {}).items() if k.startswith("mx/")
                },
                "steps": cfg.train.steps,
                "distributed": self.distributed,
            }
            write_json_atomic(self.run_dir / "results.json", results)
            acc.log({f"val/loss@{k}": v for k, v in losses.items()}, step=cfg.train.steps)
            plot_curves(
                self.history, results["loss_by_position"], cfg.train.seq_len, self.run_dir / "curves.png"
            )
            self._report(results)
        acc.wait_for_everyone()
        return results

    def cleanup(self) -> None:
        self.acc.end_training()

    # ------------------------------------------------------------------------------------------ output
    def _report(self, results: dict[str, Any]) -> None:
        m, tc = self.cfg.model, self.cfg.train
        lines = [
            "# lm-pretrain report",
            "",
            f"{m.position} + {m.attention} attention, precision {tc.precision}, {tc.steps} steps at context "
            f"{tc.seq_len}, corpus {self.cfg.data.corpus!r}, seed {tc.seed}.",
            "",
            "| eval length | val loss (nats/byte) |",
            "|---|---|",
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
    return run_recipe(PretrainRecipe(cfg, progress=progress))
