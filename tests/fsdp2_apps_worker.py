"""Two CPU processes (gloo) run the lm-pretrain and rerank-qlora recipes with their models sharded by FSDP2
`fully_shard`, for `test_apps_fsdp2.py`; rank 0 saves every rank's named checks.

    python fsdp2_apps_worker.py OUT.pt APP ROOT KEY=VALUE...   # APP: lm-pretrain | rerank-qlora; 2 ranks

accelerate 1.15 enables FSDP only on GPU devices, so `accelerate.Accelerator` is replaced here by `Stub`: the
methods the recipes call, with accelerate's FSDP2 preparation done by hand (fully_shard on each transformer
block, then on the root; the optimizer's parameters swapped for the sharded ones, by name). This exercises the
recipes' FSDP2 code paths (gathered checkpoints and weights, every rank in evaluation and generation, resume
into a sharded model), not accelerate's own FSDP2 integration.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

WORLD = 2
BLOCKS = ("Block", "LlamaDecoderLayer")  # accelerate's TRANSFORMER_BASED_WRAP classes in the shipped configs


class _Optimizer:
    """What accelerate's AcceleratedOptimizer offers the recipes."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


class Stub:
    """accelerate.Accelerator as the recipes use it, under FSDP2 on gloo CPU processes."""

    def __init__(self, *args, **kwargs):
        from accelerate.utils import DistributedType

        self.process_index, self.num_processes = dist.get_rank(), dist.get_world_size()
        self.is_main_process = self.process_index == 0
        self.device = torch.device("cpu")
        self.distributed_type, self.is_fsdp2 = DistributedType.FSDP, True
        self.metrics = Path(kwargs["project_dir"]) / "metrics.jsonl"

    def prepare(self, model, optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        names = {id(p): n for n, p in model.named_parameters()}
        groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        if not isinstance(model, FSDPModule):
            mesh = init_device_mesh("cpu", (self.num_processes,))
            for module in list(model.modules()):
                if type(module).__name__ in BLOCKS:
                    fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
        sharded = dict(model.named_parameters())
        for group, group_names in zip(optimizer.param_groups, groups, strict=True):
            group["params"] = [sharded[n] for n in group_names]
        return model, _Optimizer(optimizer)

    def unwrap_model(self, model):
        return model

    @contextlib.contextmanager
    def no_sync(self, model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def backward(self, loss) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)

    def reduce(self, tensor, reduction="mean"):
        out = tensor.clone()
        dist.all_reduce(out)
        return out / self.num_processes

    def wait_for_everyone(self) -> None:
        dist.barrier()

    def log(self, values: dict, step: int | None = None) -> None:
        """The rows the apps' JSONL tracker writes (only that tracker: the runs use trackers=[none])."""
        if self.is_main_process:
            row = {"step": step, **{k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()}}
            with self.metrics.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    def init_trackers(self, *args, **kwargs) -> None:
        pass

    def end_training(self) -> None:
        pass


def checks(rank: int, app: str, root: str, *overrides: str) -> dict[str, object]:
    import accelerate

    accelerate.Accelerator = Stub  # the recipes import it in setup()
    return (lm_pretrain_checks if app == "lm-pretrain" else rerank_checks)(Path(root), list(overrides))


def run_recipe(recipe_cls, config_cls, overrides: list[str]):
    """setup -> train -> evaluate -> cleanup, as the apps' `run` does; returns (recipe, results)."""
    from shared_kernels.runconfig import load_config

    recipe = recipe_cls(load_config(config_cls, overrides=overrides), progress=False)
    recipe.setup()
    recipe.train()
    results = recipe.evaluate()
    recipe.cleanup()
    return recipe, results


def lm_pretrain_checks(root: Path, overrides: list[str]) -> dict[str, object]:
    from safetensors.torch import load_file

    from lm_pretrain.config import PretrainConfig
    from lm_pretrain.recipe import PretrainRecipe
    from shared_kernels.distributed import full_state_dict, is_sharded

    c: dict[str, object] = {}

    def run(run_dir: Path, resume: bool):
        return run_recipe(
            PretrainRecipe,
            PretrainConfig,
            [*overrides, f"run_dir={run_dir}", f"resume={str(resume).lower()}"],
        )

    recipe, results = run(root / "fsdp2", resume=False)
    model = recipe.acc.unwrap_model(recipe.model)
    c["sharded"] = is_sharded(model)
    whole = full_state_dict(model)
    if dist.get_rank() == 0:
        saved = load_file(str(root / "fsdp2" / "model.safetensors"))
        c["final_weights_gathered"] = saved.keys() == whole.keys() and all(
            torch.equal(saved[k], whole[k]) for k in whole
        )
        c["val_loss"] = results["val_loss"]
    else:
        c["other_rank_results"] = results
    dist.barrier()
    # a resumed run: drop the last checkpoint, resume from the one before it into a freshly sharded model
    if dist.get_rank() == 0:
        shutil.copytree(root / "fsdp2", root / "resumed")
        ckpts = sorted((root / "resumed" / "checkpoints").glob("step-*"))
        shutil.rmtree(ckpts[-1])
        (root / "resumed" / "checkpoints" / "latest").write_text(ckpts[-2].name + "\n")
        (root / "resumed" / "model.safetensors").unlink()
    dist.barrier()
    resumed, resumed_results = run(root / "resumed", resume=True)
    c["resumed_at"] = resumed.start_step
    if dist.get_rank() == 0:
        a = load_file(str(root / "fsdp2" / "model.safetensors"))
        b = load_file(str(root / "resumed" / "model.safetensors"))
        c["resumed_weights_equal"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        c["resumed_val_loss"] = resumed_results["val_loss"]
    return c


def rerank_checks(root: Path, overrides: list[str]) -> dict[str, object]:
    from safetensors.torch import load_file

    from rerank_qlora.config import RerankQLoRAConfig
    from rerank_qlora.recipe import RerankQLoRARecipe
    from shared_kernels.distributed import full_state_dict, is_sharded

    c: dict[str, object] = {}

    def run(resume: bool):
        return run_recipe(
            RerankQLoRARecipe,
            RerankQLoRAConfig,
            [*overrides, f"run_dir={root / 'fsdp2'}", f"resume={str(resume).lower()}"],
        )

    recipe, results = run(resume=False)
    c["sharded"] = is_sharded(recipe.model)
    whole = full_state_dict(recipe.model, trainable_only=True)
    if dist.get_rank() == 0:
        adapter = load_file(str(root / "fsdp2" / "adapter" / "adapter_model.safetensors"))
        lora = {k.replace(".default", ""): v for k, v in whole.items() if "lora_" in k}
        c["adapter_is_gathered_lora"] = adapter.keys() == lora.keys() and all(
            torch.equal(adapter[k], lora[k]) for k in lora
        )
        c["results"] = {"scores": results["scores"], "judged": results["judged"]}
        c["refine_samples"] = json.loads((root / "fsdp2" / "refine_samples.json").read_text())
    else:
        c["other_rank_results"] = results
    _, again = run(resume=True)
    if dist.get_rank() == 0:
        c["resumed_results"] = {"scores": again["scores"], "judged": again["judged"]}
        c["log"] = (root / "fsdp2" / "run.log").read_text()
    return c


if __name__ == "__main__":
    from shared_kernels.testing.gloo import spawn_checks

    spawn_checks(checks, sys.argv[1], *sys.argv[2:], world=WORLD)
