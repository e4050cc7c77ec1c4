"""lm-pretrain: shipped configs validate; a tiny run trains and reports; 2 DDP processes (gloo) take the same
steps as one process with the same global batch; a run killed with SIGKILL resumes from its last checkpoint
and ends at exactly the loss of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm_pretrain.cli import main
from lm_pretrain.config import PretrainConfig, StudyConfig
from shared_kernels.runconfig import ConfigError, load_config

APP = Path(__file__).resolve().parents[1] / "apps" / "lm-pretrain"
TINY = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "train.seq_len=32",
    "train.batch_size=4",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "train.warmup_steps=2",
    "eval.length_multipliers=[1,4]",
    "eval.windows=2",
    "data.max_bytes=200000",
    "trackers=[none]",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("path", sorted((APP / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "lm-pretrain" in first, f"{path.name}: header must show the command"
    cls = StudyConfig if "study" in first else PretrainConfig
    cfg = load_config(cls, path)
    if cls is StudyConfig:
        from lm_pretrain.study import variant_configs

        assert len(variant_configs(cfg)) == len(cfg.variants) * len(cfg.seeds)


def test_cli_help_and_bad_config(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for key in ("train.precision", "model.attention", "eval.length_multipliers", "trackers", "resume"):
        assert key in out
    assert main(["train.precision=fp16"]) == 2
    assert "train.precision" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size"):
        load_config(PretrainConfig, overrides=["train.batch_size=6", "train.micro_batch_size=4"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs at once: uninterrupted (1 process), DDP (2 processes), and one killed after a checkpoint."""
    root = tmp_path_factory.mktemp("lmp")
    steps = ["train.steps=40", "train.checkpoint_every=4"]
    single = [sys.executable, "-m", "lm_pretrain.cli", "--no-progress", *TINY, *steps]
    ddp = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "lm_pretrain.cli",
        "--no-progress",
        *TINY,
        *steps,
    ]
    procs = {
        "single": subprocess.Popen(
            [*single, f"run_dir={root / 'single'}"],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ),
        "ddp": subprocess.Popen(
            [*ddp, f"run_dir={root / 'ddp'}"],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ),
    }
    killed = subprocess.Popen(
        [*single, f"run_dir={root / 'killed'}"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = root / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    finished_before_kill = (root / "killed" / "results.json").exists()
    out = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, out[name][-3000:]
    resumed = subprocess.run(
        [*single, f"run_dir={root / 'killed'}"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    return {"root": root, "finished_before_kill": finished_before_kill, "resumed_out": resumed.stdout, **out}


def test_single_process_run_trains_and_reports(runs):
    run_dir = runs["root"] / "single"
    losses = _losses(run_dir)
    assert len(losses) == 40 and losses[-1] < losses[0] - 0.5
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["val_loss"]) == {"32", "128"}
    assert len(results["loss_by_position"]["loss"]) == 16
    for name in ("config.yaml", "train.log", "curves.png", "report.md", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("step-*"))] == [
        "step-00000036",
        "step-00000040",
    ]
    assert "report:" in runs["single"]


def test_two_ddp_processes_match_one_process(runs):
    assert "2 process(es), 1 micro batch(es)" in runs["ddp"]
    assert "1 process(es), 2 micro batch(es)" in runs["single"]
    single, ddp = _losses(runs["root"] / "single"), _losses(runs["root"] / "ddp")
    assert len(ddp) == len(single) == 40
    assert ddp == pytest.approx(single, rel=2e-4, abs=2e-4)
    # the losses move: equality is not two constant curves
    assert single[0] - single[-1] > 0.5


def test_killed_run_resumes_and_ends_at_the_same_loss(runs):
    assert not runs["finished_before_kill"], "the run finished before it could be killed: make it longer"
    assert "resumed from" in runs["resumed_out"]
    step = int(runs["resumed_out"].split("at step ")[1].split()[0])
    assert 4 <= step < 40 and step % 4 == 0
    killed, single = runs["root"] / "killed", runs["root"] / "single"
    assert _losses(killed) == _losses(single)  # bitwise: same thread count, same batches, restored RNG
    assert (
        json.loads((killed / "results.json").read_text())["val_loss"]
        == json.loads((single / "results.json").read_text())["val_loss"]
    )


def test_accelerate_fsdp2_config_parses_into_an_fsdp2_plugin(monkeypatch):
    """configs/accelerate/fsdp2.yaml (for GPU machines; not run here) goes through accelerate's own launch
    path: the parsed command, the environment `accelerate launch` would export, and the plugin built from
    it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    import siattn.models

    path = APP / "configs" / "accelerate" / "fsdp2.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "lm_pretrain.cli"])
    args, defaults, _ = _validate_launch_command(args)
    assert defaults.distributed_type == DistributedType.FSDP and args.use_fsdp and int(args.fsdp_version) == 2
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["Block"]
    assert isinstance(getattr(siattn.models, "Block", None), type)  # the class the policy wraps exists
    assert path.read_text().startswith(
        "# accelerate launch --config_file apps/lm-pretrain/configs/accelerate/fsdp2.yaml"
    )
