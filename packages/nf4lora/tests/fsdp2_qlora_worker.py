"""Two gloo processes: a QLoRA model (nf4lora.prepare_model) under FSDP2 `fully_shard` and under DDP, against
the same model in one process. Run by test_nf4lora_distributed.py through shared_kernels.testing.gloo."""

from __future__ import annotations

import sys

import torch
from torch import nn

from shared_kernels.testing.gloo import spawn_checks


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width + 6)
        self.down = nn.Linear(2 * width + 6, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class _Tiny(nn.Module):
    def __init__(self, width: int = 72, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _prepared(quant_storage: torch.dtype):
    import nf4lora

    torch.manual_seed(0)
    model = _Tiny()
    nf4lora.prepare_model(
        model,
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=["up", "down"],
        skip=("head",),
        quant_storage=quant_storage,
        gradient_checkpointing=False,
    )
    return model


def _train(model, steps: int = 3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(6, 72, generator=g), torch.randint(0, 5, (6,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def checks(rank: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from nf4lora.weight import NF4Weight
    from shared_kernels.distributed import full_state_dict

    out: dict = {}
    for storage in (torch.uint8, torch.bfloat16):
        name = str(storage).removeprefix("torch.")
        reference = _prepared(storage)
        ref_losses = _train(reference)
        model = _prepared(storage)
        whole = {n: m.n_bytes for n, m in model.named_modules() if isinstance(m, NF4Weight)}
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        local = {}
        for n, m in model.named_modules():
            if isinstance(m, NF4Weight):
                shard = m.packed.to_local()
                local[n] = (shard.numel() * shard.element_size(), type(m.packed).__name__)
        out[f"{name}_whole_bytes"] = whole
        out[f"{name}_local_bytes"] = local
        out[f"{name}_losses"] = _train(model)
        out[f"{name}_ref_losses"] = ref_losses
        state = full_state_dict(model)
        ref_state = reference.state_dict()
        out[f"{name}_adapters_equal"] = rank != 0 or all(
            torch.equal(state[k], ref_state[k]) for k in ref_state if "lora_" in k
        )
        out[f"{name}_adapter_count"] = sum("lora_" in k for k in state) if rank == 0 else None
    # DDP: the frozen 4-bit tensors are neither broadcast at construction nor re-sent at each forward
    model = _prepared(torch.uint8)
    sent: list[int] = []
    original = dist._broadcast_coalesced

    def counting(group, tensors, *args, **kwargs):
        sent.append(sum(t.numel() * t.element_size() for t in tensors))
        return original(group, tensors, *args, **kwargs)

    dist._broadcast_coalesced = counting
    try:
        ddp = DistributedDataParallel(model)
        construction = list(sent)
        sent.clear()
        out["ddp_losses"] = _train(ddp)
    finally:
        dist._broadcast_coalesced = original
    out["ddp_ref_losses"] = _train(_prepared(torch.uint8))
    out["ddp_sync_buffers"] = ddp.will_sync_module_buffers()
    out["ddp_bytes_at_construction"] = sum(construction)
    out["ddp_bytes_per_step"] = sum(sent)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    out["ignored_are_4bit"] = ignored and all(".weight." in n for n in ignored)
    out["other_bytes"] = sum(
        t.numel() * t.element_size()
        for n, t in (*model.named_parameters(), *model.named_buffers())
        if n not in ignored
    )
    return out


if __name__ == "__main__":
    spawn_checks(checks, sys.argv[1], *sys.argv[2:])
