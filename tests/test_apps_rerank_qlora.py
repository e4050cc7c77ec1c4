"""rerank-qlora: shipped configs validate; the stdlib task is deterministic with gold relevance; a tiny run
of the whole pipeline (tiny base, SI p-RoPE, NF4 QLoRA, distillation, refinement, rerank, report) writes a
peft adapter that peft loads, a valid TREC run and a report, and a re-run resumes from its checkpoints; 2 DDP
processes (gloo) take the same steps as one; a run SIGKILLed mid-distillation resumes to the same losses."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rerank_qlora_tiny import TINY as SHARED_TINY

from rerank_qlora.cli import main
from rerank_qlora.config import RerankQLoRAConfig
from rerankdistill.fusion import smoothed_scores
from shared_kernels.runconfig import ConfigError, load_config

APP = Path(__file__).resolve().parents[1] / "apps" / "rerank-qlora"
TINY = [
    *SHARED_TINY,
    "model.tiny_pretrain_steps=3",
    "task.max_train_queries=6",
    "task.max_eval_queries=3",
    "task.max_validation_queries=3",
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "refine.pairs=2",
    "refine.samples=2",
    "refine.steps=2",
    "rerank.max_new_tokens=4",
]


@pytest.mark.parametrize("path", sorted((APP / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "rerank-qlora --config" in first
    load_config(RerankQLoRAConfig, path)


@pytest.mark.parametrize(
    "path", sorted((APP / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name
)
def test_accelerate_configs_resolve(path, monkeypatch):
    """The FSDP2 config for GPU users goes through accelerate's own launch-time resolution (the environment
    `accelerate launch` would hand the processes) into a valid FSDP plugin (test_apps_accelerate_fsdp2.py
    runs it on CPU processes)."""
    import transformers
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch --config_file") and "rerank_qlora.cli" in first
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "rerank_qlora.cli"])
    args, *_ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    layer_classes = {
        name
        for module in (transformers.models.llama.modeling_llama, transformers.models.qwen2.modeling_qwen2)
        for name in dir(module)
    }
    assert set(plugin.transformer_cls_names_to_wrap) <= layer_classes


def test_default_config_and_errors(capsys):
    cfg = load_config(RerankQLoRAConfig)
    assert (
        cfg.model.name_or_path == "tiny" and cfg.teacher.kind == "offline-qrels" and cfg.quant.method == "nf4"
    )
    with pytest.raises(ConfigError, match="task.path is required"):
        load_config(RerankQLoRAConfig, overrides=["task.name=beir"])
    with pytest.raises(ConfigError, match=r"rerank.k \(30\) must be <= rerank.candidates"):
        load_config(RerankQLoRAConfig, overrides=["rerank.k=30"])
    with pytest.raises(ConfigError, match=r"rerank.fusion_weight must be in \[0, 1\]"):
        load_config(RerankQLoRAConfig, overrides=["rerank.fusion_weight=1.5"])
    with pytest.raises(ConfigError, match="task.validation_fraction"):
        load_config(RerankQLoRAConfig, overrides=["task.validation_fraction=0.8"])
    with pytest.raises(ConfigError, match="needs a label-free explanation"):
        load_config(
            RerankQLoRAConfig, overrides=["rerank.judge=forced", "teacher.offline_explanation=per-label"]
        )
    with pytest.raises(ConfigError, match="needs teacher.kind=offline-qrels"):
        load_config(RerankQLoRAConfig, overrides=["rerank.judge=forced", "teacher.kind=openai"])
    with pytest.raises(ConfigError, match="rerank.bm25_b must be >= 0"):
        load_config(RerankQLoRAConfig, overrides=["rerank.bm25_b=-1"])
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for key in (
        "lora.mxfp8",
        "attention.tau",
        "quant.double_quant",
        "refine.method",
        "teacher.kind",
        "rerank.fusion_weight",
        "teacher.offline_explanation",
    ):
        assert key in out


def test_collection_split_has_disjoint_validation(shared_data):
    from rerank_qlora.config import TaskConfig
    from rerank_qlora.stages import load_task

    task = load_task(
        TaskConfig(
            name="cranfield",
            path=shared_data / "cranfield",
            eval_fraction=0.25,
            validation_fraction=0.1,
            max_train_queries=1000,
            max_eval_queries=1000,
            max_validation_queries=1000,
        )
    )
    train, val, ev = set(task.train_qids), set(task.validation_qids), set(task.eval_qids)
    n = len(train | val | ev)
    assert not train & val and not train & ev and not val & ev
    assert len(ev) == int(n * 0.25) and len(val) == int(n * 0.1) and len(train) == n - len(ev) - len(val)


def test_training_pairs_strategies():
    from rerank_qlora.stages import training_pairs
    from rerank_qlora.stdlib_task import RetrievalTask

    corpus = {d: d for d in ("gold", "mod", "n1", "n2", "n3", "n4")}
    task = RetrievalTask("t", corpus, {"q": "query"}, {"q": {"gold": 2, "mod": 1}}, ["q"], [])
    first = {"q": {"n1": 9.0, "mod": 8.0, "n2": 7.0, "n3": 6.0, "gold": 5.0, "n4": 4.0}}
    docs = lambda pairs: [p.docid for p in pairs]  # noqa: E731
    assert docs(training_pairs(task, first, 3)) == ["gold", "mod", "n1"]  # judged first, then hard negatives
    assert docs(training_pairs(task, first, 3, "bm25")) == [
        "n1",
        "mod",
        "n2",
        "gold",
    ]  # BM25 order + best gold
    assert docs(training_pairs(task, first, 5, "bm25")) == ["n1", "mod", "n2", "n3", "gold"]
    with pytest.raises(ValueError, match="strategy"):
        training_pairs(task, first, 3, "random")


def test_tiny_pipeline_end_to_end_and_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([f"run_dir={run_dir}", "--no-progress", *TINY]) == 0
    out = capsys.readouterr().out
    for stage in range(1, 10):
        assert f"stage {stage}/9" in out
    assert "OFFLINE TEACHER" in out and "scale-invariant p-RoPE" in out and "NF4 + double quantization" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["scores"]) == {
        "BM25 (plain)",
        "BM25 (identifier-aware)",
        "BM25 + rerank-qlora",
        "BM25 + rerank-qlora, fused",
    }
    assert 0 <= results["scores"]["BM25 (plain)"]["ndcg_cut_10"] <= 1
    assert results["first_stage"]["chosen"] == "chosen on 3 validation queries"
    assert "identifier-aware k1=" in out
    fusion = results["fusion"]
    assert fusion["chosen"].startswith("chosen on 3 validation queries") and 0 <= fusion["weight"] <= 1
    by_weight = fusion["validation"]["by_weight"]
    smoothed = smoothed_scores({float(w): s for w, s in by_weight.items()}, 0.1)
    assert len(by_weight) == 21 and smoothed[fusion["weight"]] == max(smoothed.values())
    assert by_weight["0.0"] == pytest.approx(fusion["validation"]["bm25"])
    assert by_weight["1.0"] == pytest.approx(fusion["validation"]["reranked"])
    report = (run_dir / "report.md").read_text()
    assert "OFFLINE stand-in" in report and "ndcg_cut_10" in report and "3 validation queries" in report
    assert (run_dir / "fused.run").is_file()
    assert (run_dir / "training_curve.png").stat().st_size > 0
    lines = (run_dir / "reranked.run").read_text().splitlines()
    assert lines and all(len(x.split()) == 6 for x in lines)
    # every judgement is in the rerank store once; the artefacts' settings are recorded
    stored = (run_dir / "rerank.jsonl").read_text().splitlines()
    assert len(stored) == results["judged"] + 3 * 3 and (run_dir / "fingerprints.json").is_file()
    # trec_eval (pytrec_eval) re-scores the five TREC files to the report's numbers
    import pytrec_eval

    from rerankdistill import read_qrels, read_run

    qrels = read_qrels(run_dir / "eval.qrels")
    assert len(qrels) == 3
    for file, name in (
        ("bm25.run", "BM25 (plain)"),
        ("bm25-code.run", "BM25 (identifier-aware)"),
        ("reranked.run", "BM25 + rerank-qlora"),
        ("fused.run", "BM25 + rerank-qlora, fused"),
    ):
        per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "map"}).evaluate(
            read_run(run_dir / file)
        )
        for measure in ("ndcg_cut_10", "map"):  # trec_eval averages over the judged queries
            mean = sum(v[measure] for v in per_query.values()) / len(qrels)
            assert mean == pytest.approx(results["scores"][name][measure], abs=1e-6), (file, measure)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(str(run_dir / "base-model"))
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())

    # Re-running the same command resumes: teacher labels and both training phases come from the run dir.
    # A given fusion weight of 0 is BM25's order exactly.
    assert main([f"run_dir={run_dir}", "--no-progress", *TINY, "rerank.fusion_weight=0"]) == 0
    out = capsys.readouterr().out
    assert "0 new" in out and "resumed distill" in out and "resumed refine" in out and "rebuilding" not in out
    assert (run_dir / "rerank.jsonl").read_text().splitlines() == stored  # judgements reused, none added
    again = json.loads((run_dir / "results.json").read_text())
    assert (
        again["fusion"]["chosen"] == "given"
        and again["scores"]["BM25 + rerank-qlora"] == results["scores"]["BM25 + rerank-qlora"]
    )
    assert again["scores"]["BM25 + rerank-qlora, fused"] == again["scores"]["BM25 (identifier-aware)"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _distill_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["distill/loss"] for r in rows if "distill/loss" in r]


STEPS = 12


@pytest.fixture(scope="module")
def distill_runs(tmp_path_factory):
    """Three runs of the same distillation at once: uninterrupted (1 process), DDP (2 gloo processes, 1 micro
    batch each, against 1 process accumulating 2), and one SIGKILLed once a checkpoint exists, then re-run."""
    root = tmp_path_factory.mktemp("rq")
    args = [
        "--no-progress",
        *TINY,
        "refine.method=none",
        f"train.steps={STEPS}",
        "train.checkpoint_every=2",
        "task.max_eval_queries=1",
        "rerank.k=1",
    ]
    single = [sys.executable, "-m", "rerank_qlora.cli", *args]
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
        "rerank_qlora.cli",
        *args,
    ]
    procs = {
        name: subprocess.Popen(
            [*cmd, f"run_dir={root / name}"],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, cmd in (("single", single), ("ddp", ddp))
    }
    killed = subprocess.Popen(
        [*single, f"run_dir={root / 'killed'}"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = root / "killed" / "checkpoints" / "distill" / "latest"
    deadline = time.monotonic() + 600
    while not latest.is_file() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)  # mid-distillation: a checkpoint exists, the run has not finished
    killed.wait()
    killed_at = latest.read_text().strip() if latest.is_file() else None
    outs = {name: p.communicate(timeout=900)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}: {outs[name][-3000:]}"
    resumed = subprocess.run(
        [*single, f"run_dir={root / 'killed'}"], env=_env(), capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return root, killed_at, resumed.stdout


def test_two_ddp_processes_match_one_process(distill_runs):
    """Distillation under `accelerate launch` (2 gloo processes) takes the same steps as one process with the
    same global batch: same losses, logged through the JSONL tracker."""
    root, _, _ = distill_runs
    one, two = _distill_losses(root / "single"), _distill_losses(root / "ddp")
    assert len(one) == len(two) == STEPS
    assert two == pytest.approx(one, rel=2e-4, abs=2e-4)


def test_killed_run_resumes_to_the_same_loss(distill_runs):
    """SIGKILL during distillation, then the same command: it resumes from the last complete checkpoint
    (weights, optimizer, scheduler, RNG) and ends at the uninterrupted run's losses and adapter weights."""
    from safetensors.torch import load_file

    root, killed_at, out = distill_runs
    assert killed_at is not None and killed_at != f"step-{STEPS:08d}", f"not killed mid-way ({killed_at})"
    assert "resumed distill from" in out
    assert _distill_losses(root / "killed") == pytest.approx(
        _distill_losses(root / "single"), rel=1e-6, abs=1e-7
    )
    final = f"checkpoints/distill/step-{STEPS:08d}/model.safetensors"
    a, b = load_file(root / "single" / final), load_file(root / "killed" / final)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)


def test_grpo_refinement_resumes_to_the_same_result(tmp_path, capsys):
    """refine.method=grpo runs on the shared loop: checkpoints under checkpoints/refine; a run whose last
    refinement checkpoint is gone resumes from the one before and ends with the same losses and scores, and
    keeps the metrics rows of both phases (the tiny model earns no reward in 4 tokens: zero advantages; the
    non-trivial GRPO resume is rerankdistill's test_grpo_moves_the_model_only_with_informative_rewards and,
    with a KL term, test_grpo_with_kl_logs_it_and_resumes); refine.kl_beta reaches the phase (KL rows)."""
    import shutil

    args = ["--no-progress", *TINY, "refine.method=grpo", "refine.steps=3", "refine.kl_beta=0.05"]
    assert main([f"run_dir={tmp_path / 'a'}", *args]) == 0
    assert "GRPO on 2 pairs, 2 samples per prompt, 2 prompt(s) per step" in capsys.readouterr().out
    refine = tmp_path / "a" / "checkpoints" / "refine"
    assert sorted(p.name for p in refine.glob("step-*")) == ["step-00000002", "step-00000003"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "refine" / "step-00000003")
    (tmp_path / "b" / "checkpoints" / "refine" / "latest").unlink()
    assert main([f"run_dir={tmp_path / 'b'}", *args]) == 0
    assert "resumed refine from" in capsys.readouterr().out

    def refine_rows(run_dir):
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [
            (r["step"], r["refine/loss"], r["refine/reward"], r["refine/kl"])
            for r in rows
            if "refine/loss" in r
        ]

    assert len(refine_rows(tmp_path / "a")) == 3 and refine_rows(tmp_path / "b") == refine_rows(
        tmp_path / "a"
    )
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["scores"] for d in ("a", "b"))
    assert a == b


def test_label_listwise_objective_trains_the_one_pass_judge(tmp_path, capsys):
    """train.objective=label-listwise: label examples grouped by query, the loss logged on the shared loop,
    the forced judge scores every candidate; teacher.offline_explanation=none (the label directly) too."""
    run_dir = tmp_path / "run"
    args = [
        f"run_dir={run_dir}",
        "--no-progress",
        *TINY,
        "refine.method=none",
        "train.objective=label-listwise",
    ]
    assert main([*args, "teacher.offline_explanation=none"]) == 0
    out = capsys.readouterr().out
    assert "LoRA distillation of the label alone (label-listwise)" in out
    assert "label examples in 6 query groups" in out and "every explanation is empty" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["teacher"]["used"] == 12 and results["unparseable"] == 0
    losses = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "distill/loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["distill/loss"]) for r in losses if "distill/loss" in r)
    judged = [json.loads(x) for x in (run_dir / "rerank.jsonl").read_text().splitlines()]
    assert judged and all(r["text"].startswith("Relevance Label:") for r in judged)
