"""The FSDP2 code paths of lm-pretrain and rerank-qlora, on 2 gloo CPU processes with the models sharded by
`fully_shard` (fsdp2_apps_worker.py replaces accelerate.Accelerator by a stub that shards like accelerate's
FSDP2 plugin; accelerate itself enables FSDP only on GPUs): checkpoints and final weights are gathered whole,
evaluation and generation run on every rank, a run resumes into a freshly sharded model, and lm-pretrain under
FSDP2 takes the same steps as one process. accelerate's own FSDP2 preparation: test_apps_accelerate_fsdp2.py.
Not covered: GPUs, NCCL."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared_kernels.testing.gloo import run_worker

WORKER = Path(__file__).with_name("fsdp2_apps_worker.py")


def _tiny(test_module: str) -> list[str]:
    """The TINY overrides of a sibling app test module (one tiny configuration per app)."""
    spec = importlib.util.spec_from_file_location(
        f"_fsdp2_{test_module}", Path(__file__).with_name(f"{test_module}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.TINY)


LM_TINY = [*_tiny("test_apps_lm_pretrain"), "train.steps=8", "train.checkpoint_every=4"]
RERANK_TINY = [
    *_tiny("test_apps_rerank_qlora"),
    "quant.method=none",
    "task.max_eval_queries=2",
    "task.max_validation_queries=1",
    "rerank.k=2",
    "rerank.judge=generate",
    "teacher.offline_explanation=fixed",
]  # generate() under FSDP2 too


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def lm_pretrain(tmp_path_factory):
    """The FSDP2 run (2 ranks) and a one-process run of the same tiny config, at once."""
    root = tmp_path_factory.mktemp("lm-fsdp2")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    single = subprocess.Popen(
        [sys.executable, "-m", "lm_pretrain.cli", "--no-progress", *LM_TINY, f"run_dir={root / 'single'}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    checks = run_worker(WORKER, "lm-pretrain", root, *LM_TINY)
    out = single.communicate(timeout=600)[0]
    assert single.returncode == 0, out[-3000:]
    return root, checks


def test_lm_pretrain_under_fsdp2_matches_one_process(lm_pretrain):
    root, (zero, one) = lm_pretrain
    assert zero["sharded"] and one["sharded"]
    assert zero["final_weights_gathered"]  # model.safetensors holds the whole tensors of the sharded model
    assert one["other_rank_results"] == {}  # every rank evaluated; only the main process reports
    single = json.loads((root / "single" / "results.json").read_text())["val_loss"]
    assert zero["val_loss"].keys() == single.keys()
    assert list(zero["val_loss"].values()) == pytest.approx(list(single.values()), rel=2e-4)
    losses = _losses(root / "fsdp2")
    assert len(losses) == 8 and losses == pytest.approx(_losses(root / "single"), rel=2e-4, abs=2e-4)


def test_lm_pretrain_resumes_into_a_sharded_model_exactly(lm_pretrain):
    root, (zero, one) = lm_pretrain
    assert zero["resumed_at"] == one["resumed_at"] == 4
    assert zero["resumed_weights_equal"] and zero["resumed_val_loss"] == zero["val_loss"]
    assert _losses(root / "resumed") == _losses(root / "fsdp2")


@pytest.mark.slow
def test_rerank_qlora_under_fsdp2(tmp_path):
    zero, one = run_worker(WORKER, "rerank-qlora", tmp_path, *RERANK_TINY)
    assert zero["sharded"] and one["sharded"]
    assert zero["adapter_is_gathered_lora"]  # adapter_model.safetensors: the whole LoRA tensors
    assert one["other_rank_results"] == {}
    assert set(zero["results"]["scores"]) == {
        "BM25 (plain)",
        "BM25 (identifier-aware)",
        "BM25 + rerank-qlora",
        "BM25 + rerank-qlora, fused",
    }
    assert zero["results"]["judged"] > 0
    assert len(zero["refine_samples"]) == 2 and all(len(g) == 2 for g in zero["refine_samples"])
    assert "resumed distill" in zero["log"] and "resumed refine" in zero["log"]
    assert (
        zero["resumed_results"] == zero["results"]
    )  # the resumed adapter reranks exactly as the trained one
