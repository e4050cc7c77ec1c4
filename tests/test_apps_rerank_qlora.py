"""rerank-qlora: shipped configs validate; the stdlib task is deterministic with gold relevance; a tiny run
of the whole pipeline (tiny base, SI p-RoPE, NF4 QLoRA, distillation, refinement, rerank, report) writes a
peft adapter that peft loads, a valid TREC run and a report, and a re-run resumes from its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rerank_qlora.cli import main
from rerank_qlora.config import RerankQLoRAConfig
from rerank_qlora.stdlib_task import build_stdlib_task
from shared_kernels.runconfig import ConfigError, load_config

APP = Path(__file__).resolve().parents[1] / "apps" / "rerank-qlora"
TINY = [
    "model.tiny_hidden_size=32", "model.tiny_layers=1", "model.tiny_heads=2",
    "model.tiny_pretrain_steps=3", "model.tiny_pretrain_seq_len=64", "task.max_train_queries=6",
    "task.max_eval_queries=3", "teacher.pairs_per_query=2", "lora.r=4", "train.steps=4", "train.batch_size=2",
    "train.micro_batch_size=1", "train.checkpoint_every=2", "train.log_every=1", "refine.pairs=2",
    "refine.samples=2", "refine.steps=2", "rerank.candidates=5", "rerank.k=3", "rerank.max_new_tokens=4",
    "train.max_length=1024", "trackers=[none]",
]


@pytest.mark.parametrize("path", sorted((APP / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "rerank-qlora --config" in first
    load_config(RerankQLoRAConfig, path)


def test_default_config_and_errors(capsys):
    cfg = load_config(RerankQLoRAConfig)
    assert cfg.model.name_or_path == "tiny" and cfg.teacher.kind == "offline-qrels" and cfg.quant.method == "nf4"
    with pytest.raises(ConfigError, match="task.path is required"):
        load_config(RerankQLoRAConfig, overrides=["task.name=beir"])
    with pytest.raises(ConfigError, match=r"rerank.k \(30\) must be <= rerank.candidates"):
        load_config(RerankQLoRAConfig, overrides=["rerank.k=30"])
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for key in ("lora.mxfp8", "attention.tau", "quant.double_quant", "refine.method", "teacher.kind"):
        assert key in out


def test_stdlib_task_is_deterministic_and_split_by_module():
    a, b = build_stdlib_task(), build_stdlib_task()
    assert a.corpus == b.corpus and a.queries == b.queries and a.eval_qids == b.eval_qids
    train_mods = {q[2:].rsplit(".", 1)[0] for q in a.train_qids}
    eval_mods = {q[2:].rsplit(".", 1)[0] for q in a.eval_qids}
    assert not train_mods & eval_mods and len(a.eval_qids) >= 16
    q = a.eval_qids[0]
    assert max(a.qrels[q].values()) == 2 and q[2:] in a.corpus
    name = q[2:].rsplit(".", 1)[1]
    assert f" {name}(" not in " " + a.queries[q]  # the function's own name is masked in its query


def test_tiny_pipeline_end_to_end_and_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([f"run_dir={run_dir}", "--no-progress", *TINY]) == 0
    out = capsys.readouterr().out
    for stage in range(1, 10):
        assert f"stage {stage}/9" in out
    assert "OFFLINE TEACHER" in out and "scale-invariant p-RoPE" in out and "NF4 + double quantization" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["scores"]) == {"BM25", "BM25 + rerank-qlora"}
    assert 0 <= results["scores"]["BM25"]["ndcg_cut_10"] <= 1
    report = (run_dir / "report.md").read_text()
    assert "OFFLINE stand-in" in report and "ndcg_cut_10" in report
    assert (run_dir / "training_curve.png").stat().st_size > 0
    lines = (run_dir / "reranked.run").read_text().splitlines()
    assert lines and all(len(x.split()) == 6 for x in lines)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(str(run_dir / "base-model"))
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())

    # Re-running the same command resumes: teacher labels and both training phases come from the run dir.
    assert main([f"run_dir={run_dir}", "--no-progress", *TINY]) == 0
    out = capsys.readouterr().out
    assert "0 new" in out and "resumed distill" in out and "resumed refine" in out


def test_two_ddp_processes_match_one_process(tmp_path):
    """Distillation under `accelerate launch` (2 gloo processes, 1 micro batch each) takes the same steps as
    one process accumulating 2 micro batches: same losses, logged through the JSONL tracker."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["--no-progress", *TINY, "refine.method=none", "train.steps=3"]
    single = subprocess.Popen([sys.executable, "-m", "rerank_qlora.cli", f"run_dir={tmp_path / 'one'}", *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ddp = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                            "-m", "rerank_qlora.cli", f"run_dir={tmp_path / 'two'}", *args],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outs = [p.communicate(timeout=900)[0] for p in (single, ddp)]
    for p, out in zip((single, ddp), outs):
        assert p.returncode == 0, out[-3000:]

    def losses(name):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["distill/loss"] for r in rows if "distill/loss" in r]

    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=2e-4, abs=2e-4)
