"""The shipped FSDP2 accelerate configs, run by `accelerate launch` itself on 2 CPU processes (gloo).

accelerate enables FSDP only on accelerator devices; `shared_kernels.testing.accelerate_fsdp2_cpu` makes the
real `Accelerator` honour the launcher's FSDP settings on CPU, and from there on it is accelerate's own FSDP2
preparation (wrap policy from the config, `fully_shard`, optimizer parameter swap, rank-0 weight broadcast).
Each app: the launched run is sharded, takes the same steps as one process with the same global batch,
and a re-run of the same command resumes from its checkpoints into the freshly sharded model. rerank-qlora
also runs quant.method=nf4 (FSDP-QLoRA: the packed 4-bit weights sharded) and matches one process.
Not covered: GPUs, NCCL, bf16 kernels.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
TARGET = ["-m", "shared_kernels.testing.accelerate_fsdp2_cpu"]


def _tiny(test_module: str) -> list[str]:
    spec = importlib.util.spec_from_file_location(
        f"_afsdp2_{test_module}", Path(__file__).with_name(f"{test_module}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.TINY)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )


def _finish(proc: subprocess.Popen, what: str) -> str:
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, f"{what}: {out[-4000:]}"
    return out


def _metric(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def _launch_and_single(config: Path, module: str, args: list[str], root: Path) -> tuple[str, str]:
    fsdp = _start(
        [*LAUNCH, "--config_file", str(config), *TARGET, module, *args, f"run_dir={root / 'fsdp2'}"]
    )
    single = _start([sys.executable, "-m", module, *args, f"run_dir={root / 'single'}"])
    return _finish(fsdp, "accelerate launch (FSDP2)"), _finish(single, "one process")


def test_lm_pretrain_fsdp2_config_under_accelerate_launch(tmp_path):
    config = ROOT / "apps" / "lm-pretrain" / "configs" / "accelerate" / "fsdp2.yaml"
    args = ["--no-progress", *_tiny("test_apps_lm_pretrain"), "train.steps=6", "train.checkpoint_every=3"]
    out, _ = _launch_and_single(config, "lm_pretrain.cli", args, tmp_path)
    assert "2 process(es) (FSDP2: parameters sharded)" in out
    sharded = json.loads((tmp_path / "fsdp2" / "results.json").read_text())
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    assert sharded["distributed"] == {"type": "FSDP", "processes": 2, "sharded": True}
    assert single["distributed"] == {"type": "NO", "processes": 1, "sharded": False}
    losses = _metric(tmp_path / "fsdp2", "train/loss")
    assert len(losses) == 6 and losses == pytest.approx(_metric(tmp_path / "single", "train/loss"), rel=2e-4)
    assert list(sharded["val_loss"].values()) == pytest.approx(list(single["val_loss"].values()), rel=2e-4)

    # resume: drop the final checkpoint, re-run the same command; it continues from step 3 in the sharded
    # model
    ckpts = tmp_path / "fsdp2" / "checkpoints"
    steps = sorted(p.name for p in ckpts.glob("step-*"))
    assert len(steps) >= 2
    shutil.rmtree(ckpts / steps[-1])
    (ckpts / "latest").write_text(steps[-2] + "\n")
    again = _finish(
        _start(
            [
                *LAUNCH,
                "--config_file",
                str(config),
                *TARGET,
                "lm_pretrain.cli",
                *args,
                f"run_dir={tmp_path / 'fsdp2'}",
            ]
        ),
        "resumed launch",
    )
    assert f"resumed from {ckpts / steps[-2]} at step 3" in again
    assert _metric(tmp_path / "fsdp2", "train/loss") == pytest.approx(losses, rel=1e-6)
    resumed = json.loads((tmp_path / "fsdp2" / "results.json").read_text())
    assert list(resumed["val_loss"].values()) == pytest.approx(list(sharded["val_loss"].values()), rel=1e-6)


@pytest.mark.slow
def test_rerank_qlora_fsdp2_config_under_accelerate_launch(tmp_path):
    config = ROOT / "apps" / "rerank-qlora" / "configs" / "accelerate" / "fsdp2-gpu.yaml"
    args = [
        "--no-progress",
        *_tiny("test_apps_rerank_qlora"),
        "quant.method=none",
        "task.max_eval_queries=2",
        "task.max_validation_queries=1",
        "rerank.k=2",
        "rerank.judge=generate",
        "teacher.offline_explanation=fixed",
    ]  # generate() under FSDP2 too
    out, _ = _launch_and_single(config, "rerank_qlora.cli", args, tmp_path)
    assert "2 process(es), FSDP (FSDP2: parameters sharded)" in out
    sharded = json.loads((tmp_path / "fsdp2" / "results.json").read_text())
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    assert sharded["distributed"] == {"type": "FSDP", "processes": 2, "sharded": True}
    assert set(sharded["scores"]) == set(single["scores"]) and sharded["judged"] == single["judged"]
    losses = _metric(tmp_path / "fsdp2", "distill/loss")
    assert len(losses) == 4 and losses == pytest.approx(
        _metric(tmp_path / "single", "distill/loss"), rel=2e-4
    )
    assert _metric(tmp_path / "fsdp2", "refine/loss") == pytest.approx(
        _metric(tmp_path / "single", "refine/loss"), rel=2e-4
    )
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "fsdp2" / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == reference.keys()  # whole LoRA tensors, gathered from the shards
    assert all(adapter[k].shape == reference[k].shape for k in adapter)

    again = _finish(
        _start(
            [
                *LAUNCH,
                "--config_file",
                str(config),
                *TARGET,
                "rerank_qlora.cli",
                *args,
                f"run_dir={tmp_path / 'fsdp2'}",
            ]
        ),
        "resumed launch",
    )
    assert "resumed distill" in again and "resumed refine" in again
    resumed = json.loads((tmp_path / "fsdp2" / "results.json").read_text())
    assert resumed["scores"] == sharded["scores"]  # the resumed adapter reranks exactly as the trained one


@pytest.mark.slow
def test_rerank_qlora_nf4_under_fsdp2_matches_one_process(tmp_path):
    # FSDP-QLoRA: nf4lora's packed 4-bit weights are frozen parameters that fully_shard shards
    config = ROOT / "apps" / "rerank-qlora" / "configs" / "accelerate" / "fsdp2-gpu.yaml"
    args = [
        "--no-progress",
        *_tiny("test_apps_rerank_qlora"),
        "quant.method=nf4",
        "task.max_eval_queries=2",
        "task.max_validation_queries=1",
        "rerank.k=2",
    ]
    out, _ = _launch_and_single(config, "rerank_qlora.cli", args, tmp_path)
    assert "2 process(es), FSDP (FSDP2: parameters sharded)" in out and "NF4 + double quantization" in out
    losses = _metric(tmp_path / "fsdp2", "distill/loss")
    assert len(losses) == 4 and losses == pytest.approx(
        _metric(tmp_path / "single", "distill/loss"), rel=2e-4
    )
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "fsdp2" / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == reference.keys() and adapter  # whole LoRA tensors, gathered from the shards
    for k in adapter:
        assert adapter[k].shape == reference[k].shape
        assert (adapter[k] - reference[k]).abs().max() <= 1e-3 * reference[k].abs().max() + 1e-6, k
