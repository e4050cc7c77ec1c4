"""Two CPU processes (gloo) check `shared_kernels.distributed` and `CheckpointManager` on models sharded with
FSDP2 `fully_shard`; rank 0 saves every rank's named checks for `test_distributed.py`.

    python fsdp2_checkpoint_worker.py OUT.pt ROOT  # 2 gloo ranks (shared_kernels.testing.gloo); not a test

ROOT is a directory both ranks write their checkpoints under.

The dim-0 sizes (11, 23, 5) are odd, so the shards are uneven (torch.chunk semantics: rank 0 holds one row
more than rank 1); the model has a buffer, and a variant a frozen parameter (an adapter-style checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

WORLD = 2


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 3 * width - 1)
        self.down = nn.Linear(3 * width - 1, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, vocab: int = 11, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(2)])
        self.head = nn.Linear(width, 5)
        self.register_buffer("scale", torch.tensor([1.5, 0.5]))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x) * self.scale[0]


def make(seed: int, frozen_embed: bool = False) -> Net:
    torch.manual_seed(seed)
    model = Net()
    model.embed.weight.requires_grad_(not frozen_embed)
    return model


def shard(model: Net) -> Net:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def optimizer(model: nn.Module):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return opt, sched


def step(model: nn.Module, opt, sched, seed: int, rank: int) -> float:
    """One optimizer step on this rank's half of a global batch of 4 sequences; returns the clipped grad
    norm."""
    ids = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(seed))
    mine = ids[rank * 2 : (rank + 1) * 2]
    loss = nn.functional.cross_entropy(model(mine[:, :-1]).flatten(0, 1), mine[:, 1:].flatten() % 5)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.5)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def my_chunk(full: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's dim-0 chunk of a whole tensor, computed without DTensor (torch.chunk semantics)."""
    chunks = torch.chunk(full, WORLD, dim=0)
    return chunks[rank] if rank < len(chunks) else full[:0]


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def checks_of_rank(rank: int, root: str) -> dict[str, object]:
    from safetensors.torch import load_file

    from shared_kernels.checkpoint import CheckpointManager
    from shared_kernels.distributed import (
        full_optimizer_state_dict,
        full_state_dict,
        is_sharded,
        load_full_state_dict,
    )

    c: dict[str, object] = {}
    root = Path(root)
    barrier = dist.barrier

    # 1. gathering: the sharded model's whole state dict is the unsharded model's, bit for bit
    reference = make(0)
    model = shard(make(0))
    c["is_sharded"] = (is_sharded(model), is_sharded(reference))
    c["uneven_local_rows"] = local(model.head.weight).shape[0]  # 5 rows over 2 ranks: 3 and 2
    gathered = full_state_dict(model)
    if rank == 0:
        expected = reference.state_dict()
        c["gathered_equals_unsharded"] = list(gathered) == list(expected) and all(
            bitwise(gathered[k], expected[k]) for k in expected
        )
        c["gathered_on_cpu"] = all(t.device.type == "cpu" for t in gathered.values())
    else:
        c["other_rank_gets_empty"] = gathered == {}

    # 2. train, save a checkpoint: the file holds the whole tensors; this rank's shards are its chunks of them
    opt, sched = optimizer(model)
    c["grad_norms"] = [step(model, opt, sched, seed, rank) for seed in (1, 2)]
    manager = CheckpointManager(root / "sharded", rank=rank, world_size=WORLD, barrier=barrier)
    path = manager.save(2, model, opt, sched, extra={"note": "fsdp2"})
    weights = load_file(str(path / "model.safetensors"))
    trainer = torch.load(path / "trainer_state.pt", weights_only=True)
    sd = model.state_dict()
    c["file_shards_match"] = all(
        bitwise(my_chunk(weights[k], rank), local(v)) for k, v in sd.items() if hasattr(v, "to_local")
    ) and bitwise(weights["scale"], sd["scale"])
    params = [p for g in opt.param_groups for p in g["params"]]
    c["file_optimizer_shards_match"] = (
        sorted(trainer["optimizer"]["state"]) == list(range(len(params)))
        and all(
            bitwise(my_chunk(trainer["optimizer"]["state"][i][key], rank), local(opt.state[p][key]))
            for i, p in enumerate(params)
            for key in ("exp_avg", "exp_avg_sq")
        )
        and all(
            bitwise(trainer["optimizer"]["state"][i]["step"], opt.state[p]["step"])
            for i, p in enumerate(params)
        )
    )
    osd = full_optimizer_state_dict(opt)
    c["optimizer_format"] = (
        sorted(osd["param_groups"][0]) == sorted(opt.state_dict()["param_groups"][0])
        if rank == 0
        else osd == {}
    )

    # 3. resume into a freshly sharded model (other initial values): identical shards, optimizer and scheduler
    fresh = shard(make(7))
    fresh_opt, fresh_sched = optimizer(fresh)
    info = manager.load(fresh, fresh_opt, fresh_sched)
    c["resume_step"] = info["step"]
    c["resumed_params_equal"] = all(
        bitwise(local(a), local(b)) for a, b in zip(model.parameters(), fresh.parameters())
    )
    c["resumed_params_are_dtensors"] = all(hasattr(p, "to_local") for p in fresh.parameters())
    fresh_params = [p for g in fresh_opt.param_groups for p in g["params"]]
    c["resumed_optimizer_equal"] = all(
        bitwise(local(opt.state[p][k]), local(fresh_opt.state[q][k]))
        for p, q in zip(params, fresh_params)
        for k in ("step", "exp_avg", "exp_avg_sq")
    )
    c["resumed_scheduler_equal"] = (
        fresh_sched.state_dict() == sched.state_dict()
        and fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    )
    # the next step is the same on both: nothing of the state was lost
    step(model, opt, sched, 3, rank)
    step(fresh, fresh_opt, fresh_sched, 3, rank)
    c["step_after_resume_equal"] = all(
        bitwise(local(a), local(b)) for a, b in zip(model.parameters(), fresh.parameters())
    )

    # 4. the checkpoint moves between sharded and unsharded: rank 0 loads it into one process's model, saves
    #    it from there, and the weights file is byte-identical to the sharded run's
    if rank == 0:
        plain = make(7)
        plain_opt, plain_sched = optimizer(plain)
        single = CheckpointManager(root / "unsharded")
        single.load(plain, plain_opt, plain_sched, path=path)
        again = single.save(2, plain, plain_opt, plain_sched, extra={"note": "fsdp2"})
        c["unsharded_weights_file_identical"] = (again / "model.safetensors").read_bytes() == (
            path / "model.safetensors"
        ).read_bytes()
        plain_state = torch.load(again / "trainer_state.pt", weights_only=True)["optimizer"]
        c["unsharded_optimizer_equal"] = plain_state["param_groups"] == trainer["optimizer"][
            "param_groups"
        ] and all(
            bitwise(plain_state["state"][i][k], trainer["optimizer"]["state"][i][k])
            for i in trainer["optimizer"]["state"]
            for k in ("step", "exp_avg", "exp_avg_sq")
        )
    barrier()
    # ... and an unsharded checkpoint loads into a sharded model
    back = shard(make(3))
    back_opt, back_sched = optimizer(back)
    CheckpointManager(root / "unsharded", rank=rank, world_size=WORLD, barrier=barrier).load(
        back, back_opt, back_sched, path=root / "unsharded" / "step-00000002"
    )
    plain_weights = load_file(str(root / "unsharded" / "step-00000002" / "model.safetensors"))
    c["unsharded_checkpoint_into_sharded"] = all(
        bitwise(my_chunk(plain_weights[n], rank), local(p)) for n, p in back.named_parameters()
    )

    # 5. adapters: trainable_only saves and loads only the trainable parameters; frozen ones stay as they are
    adapter = shard(make(0, frozen_embed=True))
    a_opt, a_sched = optimizer(adapter)
    step(adapter, a_opt, a_sched, 4, rank)
    a_manager = CheckpointManager(root / "adapter", rank=rank, world_size=WORLD, barrier=barrier)
    a_path = a_manager.save(1, adapter, a_opt, a_sched, trainable_only=True)
    names = sorted(load_file(str(a_path / "model.safetensors")))
    c["trainable_only_names"] = names
    target = shard(make(5, frozen_embed=True))
    t_opt, t_sched = optimizer(target)
    frozen_before = local(target.embed.weight).clone()
    a_manager.load(target, t_opt, t_sched)
    c["trainable_only_loaded"] = all(
        bitwise(local(a), local(b))
        for (n, a), (_, b) in zip(adapter.named_parameters(), target.named_parameters())
        if a.requires_grad
    )
    c["frozen_untouched"] = bitwise(local(target.embed.weight), frozen_before)

    # 6. a mismatched checkpoint fails on every rank (no rank waits for the others in a collective)
    class Wider(Net):
        def __init__(self):
            super().__init__(width=10)

    torch.manual_seed(0)
    wider = shard(Wider())
    try:
        load_full_state_dict(wider, load_file(str(path / "model.safetensors")))
        c["mismatch_raises"] = False
    except ValueError as e:
        c["mismatch_raises"] = "shape" in str(e)
    return c


if __name__ == "__main__":
    from shared_kernels.testing.gloo import spawn_checks

    spawn_checks(checks_of_rank, sys.argv[1], sys.argv[2], world=WORLD)
