"""Atomic training checkpoints: safetensors weights plus optimizer, scheduler, RNG and loop state.

Layout under a root directory:

    root/step-00000100/model.safetensors      weights (all, or only the trainable ones, e.g. LoRA adapters)
    root/step-00000100/trainer_state.pt       {"step", "optimizer", "scheduler", "extra", "world_size"}
    root/step-00000100/rng_state_<rank>.pt    python / numpy / torch (and CUDA) RNG state of each process
    root/latest                               name of the newest complete checkpoint

A checkpoint is written into `root/.tmp-step-...` and renamed into place with `os.replace` only once every
file (of every process) is on disk, then `latest` is replaced atomically: a process killed at any moment
leaves either the previous checkpoint or the new one, never a half-written one. A checkpoint damaged later
(a truncated copy, a full disk, a bad sync) is skipped on `load` with a warning naming its path, and the
previous good one is restored instead. Weights holding NaN/inf are never written (`shared_kernels.finite`).
Every `.pt` file holds only tensors and plain Python data, so it is read back with
`torch.load(weights_only=True)`.

In multi-process training every rank calls `save`/`load` with its `rank`, `world_size` and a `barrier`
(for instance `accelerator.wait_for_everyone`); rank 0 writes the shared files, each rank its RNG state.
A model sharded with FSDP2 (`fully_shard`, see `shared_kernels.distributed`) is saved as whole tensors,
gathered by every rank and written by rank 0, in the same format as an unsharded one; on `load` every rank
reads the checkpoint and keeps its shard, so checkpoints move between sharded and unsharded runs.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared_kernels.distributed import (
    full_optimizer_state_dict,
    full_state_dict,
    is_sharded,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)
from shared_kernels.errors import UserError
from shared_kernels.finite import check_finite_tensors

__all__ = ["CheckpointManager", "StaleCheckpointError", "capture_rng_state", "restore_rng_state"]

_PREFIX = "step-"

# what `CheckpointManager._read` returns: trainer state, weights, this rank's RNG state (None: not read)
_ReadCheckpoint = tuple[dict[str, Any], dict[str, torch.Tensor], Any]


class StaleCheckpointError(UserError, ValueError):
    """The run directory's checkpoint is past the configured number of steps (a resume that cannot be
    right)."""


def capture_rng_state() -> dict[str, Any]:
    """The RNG state of python's `random`, numpy's global generator, torch CPU (and every CUDA device)."""
    numpy_state = np.random.get_state()
    # numpy's global generator is an MT19937, whose legacy state is this tuple (never the dict form)
    assert isinstance(numpy_state, tuple), "numpy's global RandomState is not an MT19937"
    name, keys, pos, has_gauss, cached = numpy_state
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `capture_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Save, find and restore atomic checkpoints under `root`, keeping the newest `keep` of them.

    Args:
        root: directory holding the `step-*` checkpoints (created on first save).
        keep: how many complete checkpoints to keep (older ones are deleted after a save), >= 1.
        rank, world_size: this process and the number of processes (1 process by default).
        barrier: called where all processes must meet (required when world_size > 1).
    """

    def __init__(
        self,
        root: str | Path,
        keep: int = 2,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], Any] | None = None,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if world_size > 1 and barrier is None:
            raise ValueError("barrier is required when world_size > 1 (e.g. accelerator.wait_for_everyone)")
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self._barrier = barrier or (lambda: None)

    # ------------------------------------------------------------------------------------------ finding
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
        return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))

    def latest(self) -> Path | None:
        """The newest complete checkpoint (from the `latest` pointer, else the highest step), or None."""
        pointer = self.root / "latest"
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / "trainer_state.pt").is_file():
                return candidate
        done = self.checkpoints()
        return done[-1] if done else None

    def latest_extra(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete checkpoint and the `extra` it was saved with, read without loading anything
        (to check a run's settings before resuming it), or None. ValueError naming an unreadable file."""
        ckpt = self.latest()
        if ckpt is None:
            return None
        try:
            state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and OS errors of a truncated/corrupt file
            raise ValueError(f"{ckpt / 'trainer_state.pt'} cannot be read ({type(err).__name__})") from err
        return ckpt, state["extra"]

    # ------------------------------------------------------------------------------------------- saving
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        extra: Mapping[str, Any] | None = None,
        trainable_only: bool = False,
    ) -> Path:
        """Write checkpoint `step` atomically and return its directory (the same path on every rank).

        Args:
            step: the number of optimizer steps taken (the loop resumes at this step).
            model: the (unwrapped) model; its state dict is saved as safetensors (whole tensors when sharded).
            optimizer, scheduler: saved with `state_dict()` when given.
            extra: plain data (numbers, strings, lists, dicts, tensors) the loop needs to resume.
            trainable_only: save only parameters with requires_grad (adapters on a frozen base).
        """
        from safetensors.torch import save_file

        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        final = self.root / f"{_PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{_PREFIX}{step:08d}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self._barrier()
        torch.save(capture_rng_state(), tmp / f"rng_state_{self.rank}.pt")
        if self.rank == 0 or is_sharded(model):  # gathering shards is a collective: every rank takes part
            weights = full_state_dict(model, trainable_only)
            optimizer_state = full_optimizer_state_dict(optimizer) if optimizer is not None else None
        if self.rank == 0:
            check_finite_tensors(weights, f"checkpoint {final}")
            save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(step)})
            state = {
                "step": step,
                "world_size": self.world_size,
                "trainable_only": trainable_only,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "extra": dict(extra or {}),
            }
            torch.save(state, tmp / "trainer_state.pt")
        self._barrier()
        if self.rank == 0:
            _fsync_dir_files(tmp)
            if final.exists():  # re-saving a step (e.g. after resuming at it): replace the old copy
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_pointer(self.root / "latest", final.name)
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    # ------------------------------------------------------------------------------------------ loading
    def load(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        path: str | Path | None = None,
        restore_rng: bool = True,
        max_step: int | None = None,
    ) -> dict[str, Any] | None:
        """Restore the newest readable checkpoint (or `path`) into the given objects.

        A newest checkpoint that cannot be read (truncated or corrupt files) is skipped with a warning naming
        its path, and the previous one is tried; an explicit `path` that cannot be read raises. With
        `max_step` (the run's configured steps), a checkpoint past it raises `StaleCheckpointError` before
        anything is loaded: resuming a 24-step run with 10 steps would report 10 steps for a 24-step model.

        Returns:
            {"step": int, "extra": dict, "path": Path}, or None when there is no checkpoint.
        Raises:
            ValueError: when the checkpoint's tensors do not match the model's (names or shapes), when `path`
                cannot be read, or when no checkpoint under the root can be read.
        """
        if path is not None:
            ckpt = Path(path)
            if not (ckpt / "trainer_state.pt").is_file():
                raise ValueError(f"path {str(ckpt)!r} is not a complete checkpoint (no trainer_state.pt)")
            state, tensors, rng = self._read(ckpt, restore_rng)
        else:
            found = self._read_newest_readable(restore_rng)
            if found is None:
                return None
            ckpt, (state, tensors, rng) = found
        if max_step is not None and int(state["step"]) > max_step:
            raise StaleCheckpointError(
                f"checkpoint {ckpt} is at step {state['step']}, past the {max_step} steps configured now: "
                "raise the step count to continue it, "
                "or start over with resume=false or another run directory"
            )
        _apply(ckpt, state, tensors, model, optimizer, scheduler)
        if rng is not None:
            restore_rng_state(rng)
        return {"step": int(state["step"]), "extra": state["extra"], "path": ckpt}

    def _read_newest_readable(self, restore_rng: bool) -> tuple[Path, _ReadCheckpoint] | None:
        """The newest checkpoint whose files all read (the `latest` pointer's first, then by step, newest
        first), skipping unreadable ones with a warning; None when there is none; ValueError when none
        reads."""
        candidates = self.checkpoints()[::-1]
        newest = self.latest()
        if newest is not None and newest in candidates:
            candidates.remove(newest)
            candidates.insert(0, newest)
        if not candidates:
            return None
        for ckpt in candidates:
            try:
                return ckpt, self._read(ckpt, restore_rng, stacklevel=4)
            except ValueError as err:
                # stacklevel 3: the warning names the caller of `load`
                warnings.warn(f"skipping unreadable checkpoint: {err}; trying the previous one", stacklevel=3)
        raise ValueError(
            f"no readable checkpoint under {str(self.root)!r} (tried {', '.join(c.name for c in candidates)})"
        )

    def _read(self, ckpt: Path, restore_rng: bool, stacklevel: int = 3) -> _ReadCheckpoint:
        """Every file of checkpoint `ckpt` read into memory (nothing applied yet); ValueError naming the
        file. `stacklevel`: where a warning points (3: the caller of `load` when called from `load`)."""
        from safetensors.torch import load_file

        def read(name: str, fn: Callable[[Path], Any]) -> Any:
            try:
                return fn(ckpt / name)
            except Exception as err:  # safetensors, pickle, zip and OS errors of a truncated/corrupt file
                raise ValueError(
                    f"{ckpt / name} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
                ) from err

        state = read("trainer_state.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
        tensors = read("model.safetensors", lambda f: load_file(str(f)))
        rng = None
        if restore_rng:
            rng_name = f"rng_state_{self.rank}.pt"
            if not (ckpt / rng_name).is_file():
                warnings.warn(
                    f"checkpoint {ckpt.name} was written by {state['world_size']} process(es); "
                    f"no RNG state for rank {self.rank}, using rank 0's",
                    stacklevel=stacklevel,
                )
                rng_name = "rng_state_0.pt"
            rng = read(rng_name, lambda f: torch.load(f, map_location="cpu", weights_only=True))
        return state, tensors, rng


def _apply(
    ckpt: Path,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
) -> None:
    """Load a read checkpoint's weights into `model`, and its optimizer and scheduler states into those
    given; ValueError when the checkpoint lacks a state asked for."""
    load_full_state_dict(model, tensors, state["trainable_only"])
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"checkpoint {str(ckpt)!r} holds no optimizer state")
        load_full_optimizer_state_dict(optimizer, state["optimizer"])
    if scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError(f"checkpoint {str(ckpt)!r} holds no scheduler state")
        scheduler.load_state_dict(state["scheduler"])


def _fsync_dir_files(directory: Path) -> None:
    for f in directory.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


def _write_pointer(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
