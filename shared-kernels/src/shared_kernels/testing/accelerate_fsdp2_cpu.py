"""Run an app under `accelerate launch` with an FSDP2 config on CPU processes (gloo), for tests.

accelerate (1.x) turns FSDP on only for accelerator devices: launched with an FSDP config on a machine
without GPUs, each process gets `DistributedType.MULTI_CPU` (plain DDP over gloo) although the launcher
exported the FSDP settings (`ACCELERATE_USE_FSDP=true`, `FSDP_VERSION=2`, `FSDP_*`). This launch target makes
`accelerate.Accelerator` honour them on CPU: after the real `Accelerator.__init__`, a MULTI_CPU state with
`ACCELERATE_USE_FSDP=true` gets the `FullyShardedDataParallelPlugin` accelerate builds from that environment
and `DistributedType.FSDP` (in the accelerator's and the process's shared state, as accelerate sets them on
GPUs). Everything after that is accelerate's own code: `prepare` shards the model with
`fully_shard` per the config's wrap policy, swaps the optimizer's parameters, broadcasts rank 0's weights
(`fsdp_cpu_ram_efficient_loading`), and so on.

    accelerate launch --config_file apps/rerank-qlora/configs/accelerate/fsdp2-gpu.yaml \\
        -m shared_kernels.testing.accelerate_fsdp2_cpu rerank_qlora.cli quant.method=none ...

What it cannot show: NCCL, GPU memory, bf16 kernels. It is a test device, not a way to train: FSDP on CPU
processes only pays communication.
"""

from __future__ import annotations

import os
import runpy
import sys


def enable_fsdp_on_cpu() -> None:
    """Replace `accelerate.Accelerator` by a subclass that turns a MULTI_CPU state into FSDP when the
    launcher asked for FSDP (the apps import `Accelerator` from `accelerate` at setup, after this runs)."""
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if getattr(accelerate.Accelerator, "_fsdp_on_cpu", False):
        return

    class Accelerator(accelerate.Accelerator):
        _fsdp_on_cpu = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            if wants_fsdp and self.state.distributed_type == DistributedType.MULTI_CPU:
                self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* env
                self.state.distributed_type = DistributedType.FSDP
                # as AcceleratorState.__init__ does on GPUs: the shared process state says FSDP too
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate.Accelerator = Accelerator


def main(argv: list[str] | None = None) -> None:
    """`python -m shared_kernels.testing.accelerate_fsdp2_cpu MODULE [ARGS...]`: run MODULE as __main__."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m shared_kernels.testing.accelerate_fsdp2_cpu MODULE [ARGS...]")
    enable_fsdp_on_cpu()
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
