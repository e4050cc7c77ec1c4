"""A tiny regression trained by `shared_kernels.training.run_loop`, for test_training.py.

python training_worker.py OUT.pt ddp ROOT          # 2 gloo processes under accelerate (spawn_checks)
python training_worker.py - single ROOT SLEEP      # one process; SLEEP seconds per step (to be killed)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

STEPS, MICRO, MICRO_BATCH = 12, 4, 3


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(61, 5, generator=g)
    return x, (x @ torch.randn(5, 1, generator=g)).tanh() + 0.1 * torch.randn(61, 1, generator=g)


def window(step: int) -> list[torch.Tensor]:
    """Step `step`'s global batch: MICRO micro-batches of MICRO_BATCH row indices, a function of the step."""
    idx = torch.randperm(61, generator=torch.Generator().manual_seed(1000 + step))[: MICRO * MICRO_BATCH]
    return list(idx.split(MICRO_BATCH))


def train(
    acc,
    root: Path,
    sleep: float = 0.0,
    nan_at: int | None = None,
    dropout: float = 0.1,
    average_from: int | None = None,
    fail_at: int | None = None,
    trace: list | None = None,
):
    """Returns (history, final weights {name: tensor}); checkpoints every 2 steps under root.

    average_from: LoopSettings.average_from; fail_at: raise RuntimeError in the loss of that (1-based) step;
    trace: gets the weights after every optimizer step."""
    from shared_kernels.checkpoint import CheckpointManager
    from shared_kernels.training import LoopSettings, run_loop

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(7, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    x, y = data()

    def loss_fn(m, micro):
        if fail_at is not None and torch.equal(micro, window(fail_at - 1)[0]):
            raise RuntimeError(f"failed at step {fail_at}")
        if sleep:
            time.sleep(sleep)
        loss = torch.nn.functional.mse_loss(m(x[micro]), y[micro])  # dropout: the RNG state matters on resume
        return (
            loss * float("nan") if nan_at is not None and torch.equal(micro, window(nan_at - 1)[0]) else loss
        )

    ckpt = CheckpointManager(
        root, keep=2, rank=acc.process_index, world_size=acc.num_processes, barrier=acc.wait_for_everyone
    )
    settings = LoopSettings(
        steps=STEPS, checkpoint_every=2, max_grad_norm=1.0, progress=False, average_from=average_from
    )

    def record(m) -> dict[str, float]:
        if trace is not None:
            trace.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return {}

    state = run_loop(acc, model, optimizer, scheduler, window, loss_fn, settings, ckpt, extra_metrics=record)
    return state, {k: v.detach().clone() for k, v in acc.unwrap_model(state.model).state_dict().items()}


def ddp_checks(rank: int, root: str) -> dict:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    state, weights = train(acc, Path(root), dropout=0.0)  # dropout draws differ between 1 and 2 processes
    return {"type": str(acc.distributed_type), "history": state.history, "weights": weights}


if __name__ == "__main__":
    if sys.argv[2] == "ddp":
        from shared_kernels.testing.gloo import spawn_checks

        spawn_checks(ddp_checks, sys.argv[1], sys.argv[3])
    else:
        from accelerate import Accelerator

        torch.set_num_threads(1)
        state, weights = train(Accelerator(cpu=True), Path(sys.argv[3]), float(sys.argv[4]))
        torch.save(
            {"history": state.history, "weights": weights, "start": state.start_step},
            Path(sys.argv[3]) / "result.pt",
        )
