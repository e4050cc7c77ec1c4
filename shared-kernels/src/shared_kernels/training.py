"""The workspace's one training loop: micro-batch accumulation, data parallelism (DDP or FSDP2 through
accelerate), atomic `CheckpointManager` checkpoints and resume, tracker rows, and a stop at the first
non-finite loss.

Every trainer (rerankdistill's SFT and reward-weighted fine-tuning, lm-pretrain, rerank-qlora's distillation
and refinement) supplies only what is its own:

  * `window(step)`: the *global* batch of optimizer step `step`, as a list of micro-batches (any objects),
    a function of the step alone (and the trainer's seed), so the schedule does not depend on the process
    count and a resumed run sees the batches an uninterrupted run sees;
  * `loss_fn(model, micro) -> scalar tensor`: the mean loss of one micro-batch;
  * the model, optimizer and LR scheduler (stepped here once per optimizer step, never by accelerate).

Data parallel: each of P processes takes its contiguous 1/P of the step's micro-batches (`shard_window`: P
must divide their number) and accumulates `loss / n_mine` over them, with the gradient all-reduce only on its
last micro-batch; DDP and FSDP2 average the gradients over the processes, so P processes take the same
optimizer steps as one process accumulating the whole window. The logged loss is the window's mean.

Weight averaging (`LoopSettings.average_from`): from that step on, the loop keeps the uniform running mean
of the trainable parameters after each optimizer step (stochastic weight averaging's tail average, in
`extra["weight_average"]` of every checkpoint so a resumed run continues it) and loads it into the model
when the last step is done. Checkpoints hold the raw weights, so resuming continues the same trajectory.

Non-finite loss: checked on the reduced (all processes) value *before* the optimizer step, so the weights
are never updated from it and no checkpoint of non-finite weights is written; `NonFiniteLossError` names the
phase, step and the checkpoint to resume from. Every process raises it at the same step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared_kernels.checkpoint import CheckpointManager
from shared_kernels.finite import NonFiniteLossError, check_finite_loss

__all__ = [
    "LoopSettings",
    "LoopState",
    "NonFiniteLossError",
    "WeightAverage",
    "check_finite_loss",
    "run_loop",
    "shard_window",
]


def shard_window(window: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """This process's contiguous share of a step's micro-batches (`len(window)` must divide by world_size)."""
    if not window or len(window) % world_size:
        raise ValueError(f"a step of {len(window)} micro-batches cannot be shared by {world_size} processes")
    share = len(window) // world_size
    return list(window[rank * share : (rank + 1) * share])


@dataclass
class LoopSettings:
    """What the loop does besides optimising.

    Args:
        steps: optimizer steps in all (a resumed run continues to this number).
        phase: name in logs, progress bars, tracker keys (`{phase}/loss`) and errors.
        log_every: optimizer steps between logged rows (the last step is always logged).
        checkpoint_every: optimizer steps between checkpoints (0: only the last step's).
        max_grad_norm: clip the gradient norm to this (0: no clipping).
        trainable_only: checkpoint only parameters with requires_grad (adapters on a frozen base).
        resume: continue from the newest checkpoint of the `CheckpointManager` when there is one.
        log_step_offset: added to the step on the tracker axis (phases of one run share it).
        progress: a tqdm bar on the main process.
        average_from: from this optimizer step (0-based, < steps) to the last, average the trainable weights
            uniformly and end with the average (None: end with the last step's weights).
    """

    steps: int
    phase: str = "train"
    log_every: int = 1
    checkpoint_every: int = 0
    max_grad_norm: float = 0.0
    trainable_only: bool = False
    resume: bool = True
    log_step_offset: int = 0
    progress: bool = True
    average_from: int | None = None

    def __post_init__(self) -> None:
        if self.average_from is not None and (
            isinstance(self.average_from, bool)
            or not isinstance(self.average_from, int)
            or not 0 <= self.average_from < max(1, self.steps)
        ):
            raise ValueError(
                f"average_from must be None or an integer in [0, steps), got {self.average_from!r}"
            )
        for name in ("steps", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name != "log_every" else 1)
            ):
                raise ValueError(
                    f"{name} must be an integer >= {0 if name != 'log_every' else 1}, got {value!r}"
                )
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm!r}")


@dataclass
class LoopState:
    """The result: the prepared model, where the run started and ended, and every logged row."""

    model: Any
    optimizer: Any
    start_step: int
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: Path | None = None
    average: WeightAverage | None = None


class WeightAverage:
    """The uniform running mean of a list of parameters, updated after each optimizer step (SWA's average).

    Under FSDP2 the parameters are DTensor shards and so is the mean: each rank averages its shard. The state
    a checkpoint keeps holds whole tensors (gathered, a collective every rank takes part in, as `save` is),
    and loading gives each rank its shard again, so it moves between sharded and unsharded runs."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        self.count = 0
        self.tensors = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        for mean, p in zip(self.tensors, self.params, strict=True):
            mean.lerp_(p.float(), 1.0 / self.count)  # mean += (p - mean) / count

    @torch.no_grad()
    def apply(self) -> None:
        """Load the mean into the parameters (nothing when no step was averaged)."""
        if self.count:
            for mean, p in zip(self.tensors, self.params, strict=True):
                p.copy_(mean.to(p.dtype))

    def state(self) -> dict[str, Any]:
        whole = [t.full_tensor() if hasattr(t, "full_tensor") else t.clone() for t in self.tensors]
        return {"count": self.count, "tensors": whole}

    @torch.no_grad()
    def load(self, state: dict[str, Any], where: str) -> None:
        tensors = state.get("tensors", [])
        saved_shapes = [tuple(t.shape) for t in tensors]
        if saved_shapes != [tuple(t.shape) for t in self.tensors]:  # a DTensor's shape is the whole one
            raise ValueError(f"{where}: its weight average does not match the trainable parameters")
        self.count = int(state["count"])
        for mean, saved in zip(self.tensors, tensors, strict=True):
            if hasattr(mean, "device_mesh"):  # a shard: this rank's part of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                mesh, placements = mean.device_mesh, mean.placements  # type: ignore[attr-defined]
                saved = distribute_tensor(saved.to(mean.device), mesh, placements)
            mean.copy_(saved)


def run_loop(
    acc: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    window: Callable[[int], Sequence[Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    settings: LoopSettings,
    checkpoints: CheckpointManager | None = None,
    *,
    metrics_file: str | Path | None = None,
    extra_metrics: Callable[[Any], dict[str, float]] | None = None,
    logger: logging.Logger | None = None,
) -> LoopState:
    """Prepare `model` and `optimizer` with `acc`, resume, and train to `settings.steps`.

    Args:
        acc: an `accelerate.Accelerator` (or an object with its `prepare`, `backward`, `no_sync`, `reduce`,
            `clip_grad_norm_`, `unwrap_model`, `log`, `process_index`, `num_processes`, `is_main_process`,
            `device`).
        model, optimizer, scheduler: not yet prepared; the scheduler steps once per optimizer step.
        window: step -> the global list of micro-batches of that step (see the module docstring).
        loss_fn: (prepared model, micro-batch) -> the micro-batch's mean loss (a scalar tensor).
        checkpoints: where checkpoints are written and resumed from (None: neither).
        metrics_file: the JSONL tracker's file: rows after the resumed step are dropped from it on resume.
        extra_metrics: (unwrapped model) -> more values for each logged row (e.g. quantisation statistics).
        logger: gets one line per logged row.
    Returns:
        `LoopState` with the prepared model and optimizer and the history (rows {"step", "phase",
        "<phase>/loss", "lr", "elapsed_s", ["grad_norm"], ...}); the history of a resumed run starts with the
        rows of the run it resumed.
    Raises:
        NonFiniteLossError: at the first NaN/inf loss (the weights are left as before that step).
    """
    s = settings
    rank, world = acc.process_index, acc.num_processes
    model, optimizer = acc.prepare(model, optimizer)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # after prepare: FSDP2's sharded ones
    if not params:
        raise ValueError(f"{s.phase}: the model has no trainable parameters")
    state = LoopState(model, optimizer, 0, 0)
    if s.average_from is not None:
        state.average = WeightAverage(params)
    if checkpoints is not None and s.resume:
        _resume(acc, state, checkpoints, inner_optimizer, scheduler, s, metrics_file, logger)
    bar = _progress_bar(acc, s, state.step)
    model.train()
    t0 = time.perf_counter()
    for step in range(state.step, s.steps):
        value = _window_loss(acc, model, loss_fn, shard_window(window(step), rank, world))
        done = step + 1
        _stop_if_non_finite(value, done, s.phase, optimizer, bar, checkpoints)
        grad_norm = _clip_gradients(acc, params, s.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = done
        if state.average is not None and step >= s.average_from:  # type: ignore[operator]
            state.average.update()
        if done % s.log_every == 0 or done == s.steps:
            row = _step_row(acc, model, scheduler, s.phase, done, value, grad_norm, t0, extra_metrics)
            _log_row(acc, row, s, state, logger, bar)
        if bar is not None:
            bar.update(1)
        if checkpoints is not None and _is_checkpoint_step(s, done):
            checkpoints.save(
                done,
                acc.unwrap_model(model),
                inner_optimizer,
                scheduler,
                extra=_extra(state, s),
                trainable_only=s.trainable_only,
            )
    if bar is not None:
        bar.close()
    if state.average is not None:
        state.average.apply()
    state.model, state.optimizer = model, optimizer
    return state


# The loop's steps, in the order it takes them.


def _extra(state: LoopState, s: LoopSettings) -> dict[str, Any]:
    """What a checkpoint keeps of the loop besides the weights: the history, and the weight average with
    the step it started at."""
    extra: dict[str, Any] = {"history": state.history}
    if state.average is not None:
        extra["weight_average"] = {**state.average.state(), "from": s.average_from}
    return extra


def _resume(
    acc: Any,
    state: LoopState,
    checkpoints: CheckpointManager,
    inner_optimizer: Any,
    scheduler: Any,
    s: LoopSettings,
    metrics_file: str | Path | None,
    logger: logging.Logger | None,
) -> None:
    """Restore the newest checkpoint (if any) into the model, optimizer, scheduler and `state`, and drop the
    metrics file's rows of this phase after the resumed step (they are logged again)."""
    from shared_kernels.runconfig import JSONLTracker

    loaded = checkpoints.load(acc.unwrap_model(state.model), inner_optimizer, scheduler, max_step=s.steps)
    if loaded is None:
        return
    state.start_step = state.step = loaded["step"]
    state.history = list(loaded["extra"].get("history", []))
    state.resumed_from = loaded["path"]
    if state.average is not None:
        saved = loaded["extra"].get("weight_average")
        if saved is None and state.step > s.average_from:  # type: ignore[operator]
            raise ValueError(
                f"{s.phase}: checkpoint {loaded['path']} is past step {s.average_from}, where weight "
                "averaging starts, but holds no average (it was written without averaging): start over with "
                "resume=false or another run directory"
            )
        if saved is not None and saved.get("from", s.average_from) != s.average_from:
            raise ValueError(
                f"{s.phase}: checkpoint {loaded['path']} averages the weights from step {saved['from']}, not "
                f"from step {s.average_from} as set now: keep the setting, or start over with resume=false "
                "or another run directory"
            )
        if saved is not None:
            state.average.load(saved, f"checkpoint {loaded['path']}")
    if logger is not None and acc.is_main_process:
        logger.info("resumed %s from %s at step %d", s.phase, loaded["path"], state.step)
    if metrics_file is not None and acc.is_main_process:
        # this phase's rows after the resumed step go (they are logged again); other phases' stay
        JSONLTracker.truncate_after(metrics_file, s.log_step_offset + state.step, s.log_step_offset + s.steps)


def _progress_bar(acc: Any, s: LoopSettings, start: int) -> Any | None:
    """A tqdm bar on the main process when asked for, steps remain and tqdm is installed; else None."""
    if not (s.progress and acc.is_main_process and start < s.steps and importlib.util.find_spec("tqdm")):
        return None
    from tqdm.auto import tqdm  # not a dependency of shared-kernels: a bar only where it is installed

    return tqdm(total=s.steps, initial=start, desc=s.phase, dynamic_ncols=True)


def _window_loss(
    acc: Any, model: Any, loss_fn: Callable[[Any, Any], torch.Tensor], mine: Sequence[Any]
) -> float:
    """Accumulate the gradients of this process's micro-batches; the window's mean loss over all ranks."""
    total = torch.zeros((), device=acc.device)
    for i, micro in enumerate(mine):
        # the gradient all-reduce runs once, on this process's last micro-batch of the step
        sync = contextlib.nullcontext() if i == len(mine) - 1 else acc.no_sync(model)
        with sync:
            loss = loss_fn(model, micro) / len(mine)
            acc.backward(loss)
        total += loss.detach()
    return float(acc.reduce(total, reduction="mean").item())  # the same on every rank


def _stop_if_non_finite(
    value: float,
    done: int,
    phase: str,
    optimizer: Any,
    bar: Any | None,
    checkpoints: CheckpointManager | None,
) -> None:
    """At a NaN/inf loss: drop the gradients (the weights stay as before the step), close the bar, and raise
    `NonFiniteLossError` naming the checkpoint to resume from."""
    if math.isfinite(value):
        return
    optimizer.zero_grad(set_to_none=True)
    if bar is not None:
        bar.close()
    check_finite_loss(value, done, phase, checkpoints.latest() if checkpoints is not None else None)


def _clip_gradients(acc: Any, params: list[torch.nn.Parameter], max_grad_norm: float) -> float | None:
    """Clip the gradient norm to `max_grad_norm` and return the norm before clipping (None: no clipping)."""
    if not max_grad_norm:
        return None
    grad_norm = acc.clip_grad_norm_(params, max_grad_norm)
    # under FSDP2 a DTensor: take the whole value
    return float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)


def _step_row(
    acc: Any,
    model: Any,
    scheduler: Any,
    phase: str,
    done: int,
    value: float,
    grad_norm: float | None,
    t0: float,
    extra_metrics: Callable[[Any], dict[str, float]] | None,
) -> dict[str, Any]:
    """The history row of optimizer step `done`."""
    row: dict[str, Any] = {
        "step": done,
        "phase": phase,
        f"{phase}/loss": value,
        "lr": scheduler.get_last_lr()[0],
        "elapsed_s": time.perf_counter() - t0,
    }
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    if extra_metrics is not None:
        row.update(extra_metrics(acc.unwrap_model(model)))
    return row


def _log_row(
    acc: Any,
    row: dict[str, Any],
    s: LoopSettings,
    state: LoopState,
    logger: logging.Logger | None,
    bar: Any | None,
) -> None:
    """Append `row` to the history and send it to the trackers, the logger and the progress bar."""
    state.history.append(row)
    done, value = row["step"], row[f"{s.phase}/loss"]
    acc.log({k: v for k, v in row.items() if k not in ("step", "phase")}, step=s.log_step_offset + done)
    if logger is not None and acc.is_main_process:
        logger.info("%s step %d loss %.4f", s.phase, done, value)
    if bar is not None:
        bar.set_postfix(loss=f"{value:.4f}")


def _is_checkpoint_step(s: LoopSettings, done: int) -> bool:
    """Every `checkpoint_every` steps (when set) and the last step."""
    return bool(s.checkpoint_every and done % s.checkpoint_every == 0) or done == s.steps
