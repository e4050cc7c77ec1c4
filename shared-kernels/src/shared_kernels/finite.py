"""Training stops at the first non-finite loss, and non-finite weights are never saved.

A learning rate that is too high (or `inf`) turns the loss into NaN/inf within a step or two; from then on
every update writes NaN into the weights. Training loops call `check_finite_loss` on each step's loss BEFORE
`optimizer.step()` (the loss value is the all-reduced one, so every process stops at the same step), and
whatever saves weights calls `check_finite_tensors` first: a checkpoint or adapter of NaNs is never written,
so a resumed run starts from the last good one. Torch is not imported here (tensors bring their methods).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from shared_kernels.errors import UserError

__all__ = ["NonFiniteError", "NonFiniteLossError", "check_finite_loss", "check_finite_tensors"]


class NonFiniteError(UserError, FloatingPointError):
    """A NaN/inf loss or weight: the run's settings (learning rate, precision, data) cannot train this
    model."""


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or infinite; the weights were not updated from it."""


def check_finite_loss(
    loss: float, step: int, phase: str = "train", resume_from: str | os.PathLike | None = None
) -> None:
    """Raise `NonFiniteLossError` when `loss` (a float: `.item()` of the step's reduced loss) is NaN or inf.

    Args:
        loss: the loss of optimizer step `step`.
        step: the 1-based optimizer step it belongs to (named in the message).
        phase: what is being trained (named in the message).
        resume_from: the last checkpoint (named in the message as the place to resume from), if any.
    """
    if math.isfinite(loss):
        return
    where = (
        f"resume from {os.fspath(resume_from)!r} with a lower learning rate or other data"
        if resume_from
        else "no checkpoint was written yet"
    )
    raise NonFiniteLossError(
        f"{phase}: the loss is {loss} at step {step}; stopped before the optimizer step, so "
        f"no weight was updated from it ({where})"
    )


def check_finite_tensors(tensors: Mapping[str, Any], what: str) -> None:
    """Raise `NonFiniteError` naming the first floating-point tensor of `tensors` holding NaN or inf.

    Args:
        tensors: name -> torch.Tensor (a state dict); non-float tensors are skipped.
        what: what would have been written (e.g. the checkpoint path), named in the message.
    """
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise NonFiniteError(
            f"{what}: {len(bad)} of {len(tensors)} tensors hold NaN/inf (first: {bad[0]!r}); "
            "refusing to save non-finite weights. Lower the learning rate or check the precision"
        )
