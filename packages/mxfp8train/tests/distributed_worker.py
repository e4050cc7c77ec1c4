"""Two CPU processes (gloo) train a converted tiny GPT under DDP and under FSDP2 `fully_shard`; rank 0 saves
the losses and final parameters for `test_mxfp8train_distributed.py` to compare with one process.

    python distributed_worker.py OUT.pt     # 2 ranks (shared_kernels.testing.gloo); not a test module

Each rank takes its half of the global batch (2 of 4 sequences of 32 tokens: 64 tokens, two whole 32-token
blocks along the weight-gradient GEMM's reduction axis, so the ranks' MX blocks are the global batch's).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

WORLD = 2
GLOBAL_BATCH, CONTEXT, STEPS, LR = 4, 32, 3, 0.5


def make_model() -> torch.nn.Module:
    from mxfp8train import convert
    from mxfp8train.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return convert(GPT(GPTConfig(n_layers=1, width=64, n_heads=2, context=CONTEXT)))


def batches() -> torch.Tensor:
    """(STEPS, GLOBAL_BATCH, CONTEXT + 1) byte windows, the same in every process."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (STEPS, GLOBAL_BATCH, CONTEXT + 1), generator=g)


def train(
    model: torch.nn.Module, rank: int = 0, world: int = 1
) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """SGD on this rank's shard of each global batch. Returns the global mean loss of each step and the
    gradients of the first step (full tensors)."""
    inner = getattr(model, "module", model)  # DDP wraps; FSDP2 shards in place
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    per_rank = GLOBAL_BATCH // world
    losses, first_grads = [], []
    for step, batch in enumerate(batches()):
        shard = batch[rank * per_rank : (rank + 1) * per_rank]
        logits = model(shard[:, :-1])  # through __call__, so DDP's and FSDP2's hooks run
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), shard[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            first_grads.append({n: full(p.grad) for n, p in inner.named_parameters()})
        opt.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    return losses, first_grads


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def checks(rank: int) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from mxfp8train import MXLinear

    result: dict[str, object] = {}
    model = make_model()
    ddp_losses, ddp_grads = train(DistributedDataParallel(model), rank, WORLD)
    result["ddp"] = {
        "losses": ddp_losses,
        "grads": ddp_grads[0],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }

    model = make_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fc = model.blocks[0].mlp.fc
    seen: dict[str, object] = {}

    def record(module, args):  # what the MX GEMMs get inside forward: the unsharded weight
        seen.update(dtensor=isinstance(module.weight, DTensor), shape=tuple(module.weight.shape))

    handle = fc.register_forward_pre_hook(record)
    fsdp_losses, fsdp_grads = train(model, rank, WORLD)
    handle.remove()
    result["fsdp2"] = {
        "losses": fsdp_losses,
        "grads": fsdp_grads[0],
        "params": {n: full(p) for n, p in model.named_parameters()},
        "is_mxlinear": isinstance(fc, MXLinear),
        "sharded": isinstance(fc.weight, DTensor) and str(fc.weight.placements) == "(Shard(dim=0),)",
        "local_shape": tuple(fc.weight.to_local().shape),
        "in_forward": seen,
    }
    return result


if __name__ == "__main__":
    from shared_kernels.testing.gloo import spawn_checks

    spawn_checks(checks, sys.argv[1], world=WORLD)
