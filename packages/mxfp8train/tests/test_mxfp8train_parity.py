"""The parity command on a tiny config: outputs, identical data order, resumption after an interruption."""

from __future__ import annotations

import json

import pytest
import torch

from mxfp8train import MXLinear, parity

TINY = dict(
    steps=4,
    batch_size=2,
    context=16,
    n_layers=1,
    width=32,
    n_heads=2,
    eval_every=3,
    eval_batches=1,
    stats_every=2,
    ckpt_every=2,
    warmup=1,
    progress=False,
)


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(
        b"".join(f"line {i}: to be or not to be, that is the question.\n".encode() for i in range(400))
    )
    return path


def test_parity_command_writes_results_plots_and_table(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    parity.main(
        [
            "--data",
            str(text_file),
            "--out",
            str(out),
            "--variants",
            "bf16,mxfp8-rceil,mxfp8-floor",
            "--seeds",
            "3,5",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--context",
            "16",
            "--n-layers",
            "1",
            "--width",
            "32",
            "--n-heads",
            "2",
            "--eval-every",
            "2",
            "--eval-batches",
            "1",
            "--stats-every",
            "1",
            "--warmup",
            "1",
            "--jobs",
            "1",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert "| mxfp8-floor | 2 |" in printed and "minus bf16, paired" in printed
    summary = json.loads((out / "results.json").read_text())
    assert (out / "parity_loss.png").stat().st_size > 1000 and (
        out / "parity_stats.png"
    ).stat().st_size > 1000
    # the runner records its seeds and variants, and every run says which it is
    assert summary["seeds"] == [3, 5] and summary["variants"] == ["bf16", "mxfp8-rceil", "mxfp8-floor"]
    runs = summary["runs"]
    assert {(r["variant"], r["seed"]) for by_seed in runs.values() for r in by_seed.values()} == {
        (v, s) for v in ("bf16", "mxfp8-rceil", "mxfp8-floor") for s in (3, 5)
    }
    assert [s for s, _ in runs["bf16"]["3"]["val"]] == [2, 4] and len(runs["bf16"]["3"]["train"]) == 4
    assert runs["mxfp8-rceil"]["5"]["diagnostics"]["input"]["clipped"] == 0
    assert runs["mxfp8-floor"]["5"]["diagnostics"]["input"]["clip_fraction"] > 0  # FLOOR saturates
    layer_stats = runs["mxfp8-floor"]["3"]["stats"][0]["layers"]
    # per-layer clip / flush statistics at every sampled step
    assert set(layer_stats) == {
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.fc",
        "blocks.0.mlp.proj",
    }
    assert layer_stats["blocks.0.mlp.fc"]["input"]["clip_fraction"] > 0
    # paired: per seed, variant minus bf16 on the same seed
    floor = summary["summary"]["mxfp8-floor"]
    want = [runs["mxfp8-floor"][s]["final_val_loss"] - runs["bf16"][s]["final_val_loss"] for s in ("3", "5")]
    assert floor["paired_vs_bf16"]["diffs"] == pytest.approx(want) and floor["seeds"] == [3, 5]
    # same seed: same init and batch for every variant, so first-step losses agree to quantization noise;
    # different seeds differ
    first = [runs[v]["3"]["train"][0][1] for v in runs]
    assert max(first) - min(first) < 0.05
    assert runs["bf16"]["3"]["train"][0][1] != runs["bf16"]["5"]["train"][0][1]
    assert not list((out / "ckpt").glob("*/step-*"))  # checkpoints removed once a run finishes


def test_paired_tests_known_values():
    # every difference positive: the sign-flip p is 2 / 2^n, the t-test small
    tests = parity.paired_tests([0.01, 0.012, 0.011, 0.009, 0.010])
    assert tests["sign_flip_p"] == pytest.approx(2 / 32) and tests["t_test_p"] < 1e-4
    tests = parity.paired_tests([0.01, -0.01, 0.02, -0.02])
    assert tests["sign_flip_p"] == 1.0 and tests["t_test_p"] == pytest.approx(1.0)


def test_parity_resumes_after_interruption(text_file, tmp_path, monkeypatch):
    cfg = parity.ParityConfig(
        out=str(tmp_path / "full"), data=str(text_file), variants=("mxfp8-rceil",), **TINY
    )
    full = parity.run_parity(cfg)["runs"]["mxfp8-rceil"]["0"]

    cut = parity.ParityConfig(**{**cfg.__dict__, "out": str(tmp_path / "cut")})
    real_evaluate = parity.evaluate

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # first evaluation is at step 3, after the step-2 checkpoint

    monkeypatch.setattr(parity, "evaluate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        parity.run_parity(cut)
    assert (tmp_path / "cut" / "ckpt" / "mxfp8-rceil-seed0" / "step-00000002").is_dir()
    monkeypatch.setattr(parity, "evaluate", real_evaluate)
    resumed = parity.run_parity(cut)["runs"]["mxfp8-rceil"]["0"]
    assert resumed["train"] == full["train"] and resumed["val"] == full["val"]


def test_same_data_order_for_every_variant_and_bad_config():
    cfg = parity.ParityConfig(**TINY)
    assert torch.equal(parity.batch_starts(5000, cfg, 0), parity.batch_starts(5000, cfg, 0))
    assert not torch.equal(parity.batch_starts(5000, cfg, 0), parity.batch_starts(5000, cfg, 1))
    with pytest.raises(ValueError, match="variants"):
        parity.ParityConfig(variants=("fp4",))
    with pytest.raises(ValueError, match="steps"):
        parity.ParityConfig(steps=0)


def test_reference_and_ablation_variants(text_file, tmp_path):
    variants = ("fp32", "mxfp8-rceil", "mxfp8-rceil-fwd-only", "mxfp8-rceil-bwd-only")
    cfg = parity.ParityConfig(
        out=str(tmp_path / "ab"), data=str(text_file), variants=variants, **TINY, jobs=1
    )
    runs = parity.run_parity(cfg)["runs"]
    first = {v: runs[v]["0"]["train"][0][1] for v in variants}
    second = {v: runs[v]["0"]["train"][1][1] for v in variants}
    # the first step's loss is the forward pass alone: MX only where the forward GEMM is
    assert first["mxfp8-rceil-fwd-only"] == first["mxfp8-rceil"] != first["fp32"]
    assert first["mxfp8-rceil-bwd-only"] == first["fp32"]
    # the second shows the first update: quantized gradients move the weights differently
    assert second["mxfp8-rceil-bwd-only"] != second["fp32"]
    assert second["mxfp8-rceil-fwd-only"] != second["mxfp8-rceil"]
    assert runs["fp32"]["0"]["stats"] == [] and runs["fp32"]["0"]["diagnostics"] == {}
    assert set(runs["mxfp8-rceil-fwd-only"]["0"]["diagnostics"]) == {"input", "weight"}  # no gradient cast
    assert set(runs["mxfp8-rceil-bwd-only"]["0"]["diagnostics"]) == {"input", "weight", "grad"}
    assert "final_val_loss_bf16_forward" not in runs["fp32"]["0"]
    assert all("final_val_loss_bf16_forward" in runs[v]["0"] for v in variants[1:])


def test_bf16_forward_loss_evaluates_the_same_weights_without_mx(text_file):
    cfg = parity.ParityConfig(**TINY)
    _, val = parity.load_splits(text_file)
    mx = parity.build_model(cfg, "mxfp8-rceil", seed=2)
    bf16 = parity.build_model(cfg, "bf16", seed=2)  # the same initial weights
    got = parity.bf16_forward_loss(mx, val, cfg)
    assert got == parity.evaluate(bf16, val, cfg) != parity.evaluate(mx, val, cfg)
    assert sum(isinstance(m, MXLinear) for m in mx.modules()) == 4  # the model itself is unchanged


def test_runs_and_checkpoints_of_another_config_are_refused(text_file, tmp_path, monkeypatch, capsys):
    cfg = parity.ParityConfig(out=str(tmp_path / "o"), data=str(text_file), variants=("mxfp8-rceil",), **TINY)
    parity.run_parity(cfg)
    done = tmp_path / "o" / "runs" / "mxfp8-rceil-seed0.json"
    before = done.read_bytes()
    longer = parity.ParityConfig(**{**cfg.__dict__, "steps": 6})
    with pytest.raises(ValueError, match=r"mxfp8-rceil-seed0\.json was made with steps=4"):
        parity.run_parity(longer)
    assert done.read_bytes() == before  # nothing overwritten
    # from the command line: one line, exit code 2, before anything trains
    args = [
        "--data",
        str(text_file),
        "--out",
        str(tmp_path / "o"),
        "--variants",
        "mxfp8-rceil",
        "--jobs",
        "1",
    ]
    sizes = ["--batch-size", "2", "--context", "16", "--n-layers", "1", "--width", "32", "--n-heads", "2"]
    with pytest.raises(SystemExit) as exit_info:
        parity.main([*args, *sizes, "--steps", "6"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "mxfp8-rceil-seed0.json was made with steps=4" in err and "eval_every=3" in err
    parity.run_parity(parity.ParityConfig(**{**cfg.__dict__, "seeds": (0, 1)}))  # more seeds: reused

    # an interrupted run's checkpoint, resumed with another learning rate
    cut = parity.ParityConfig(**{**cfg.__dict__, "out": str(tmp_path / "cut")})

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # first evaluation is at step 3, after the step-2 checkpoint

    real_evaluate = parity.evaluate
    monkeypatch.setattr(parity, "evaluate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        parity.run_parity(cut)
    monkeypatch.setattr(parity, "evaluate", real_evaluate)
    with pytest.raises(ValueError, match=r"step-00000002 was made with lr=0\.002"):
        parity.run_parity(parity.ParityConfig(**{**cut.__dict__, "lr": 1e-3}))
    assert parity.run_parity(cut)["runs"]["mxfp8-rceil"]["0"]["train"] == json.loads(before)["train"]


def _study(seeds, floor, rceil, rceil_weights=None, **config):
    runs = {
        "mxfp8-floor": {str(s): {"final_val_loss": v} for s, v in zip(seeds, floor, strict=True)},
        "mxfp8-rceil": {
            str(s): {"final_val_loss": v, **({"final_val_loss_bf16_forward": w} if w is not None else {})}
            for s, v, w in zip(seeds, rceil, rceil_weights or [None] * len(seeds), strict=True)
        },
    }
    return {"config": {**parity.ParityConfig().__dict__, **config}, "runs": runs}


def test_compare_pools_studies_by_seed(tmp_path, capsys):
    a = _study([0, 1], [2.5, 2.1], [2.0, 2.0], [1.9, 1.95])
    b = _study([2, 3, 4], [2.2, 2.3, 1.9], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0])
    got = parity.compare([a, b], "mxfp8-floor", "mxfp8-rceil")
    assert got["seeds"] == [0, 1, 2, 3, 4] and got["diffs"] == pytest.approx([0.5, 0.1, 0.2, 0.3, -0.1])
    assert got["positive"] == 4 and got["mean"] == pytest.approx(0.2)
    assert got["sign_flip_p"] == parity.paired_tests(got["diffs"])["sign_flip_p"]
    # the evaluation suffix reads the bf16-forward loss of the same runs
    weights = parity.compare([a, b], "mxfp8-rceil", "mxfp8-rceil@bf16-forward")
    assert weights["diffs"] == pytest.approx([0.1, 0.05, 0.0, 0.0, 0.0])
    # the two variants may come from different studies of one regime (an ablation run beside a study),
    # and a deterministic rerun of a seed (same loss) counts once
    floor_only = {**a, "runs": {"mxfp8-floor": a["runs"]["mxfp8-floor"]}}
    rceil_only = {**a, "runs": {"mxfp8-rceil": a["runs"]["mxfp8-rceil"]}}
    assert parity.compare([floor_only, rceil_only], "mxfp8-floor", "mxfp8-rceil")["diffs"] == pytest.approx(
        [0.5, 0.1]
    )
    assert parity.compare([a, a, b], "mxfp8-floor", "mxfp8-rceil")["diffs"] == got["diffs"]
    for args, match in [
        (
            ([a, _study([0, 1], [2.4, 2.1], [2.0, 2.0])], "mxfp8-floor", "mxfp8-rceil"),
            "repeats mxfp8-floor seed 0",
        ),
        (([a, _study([2, 3], [2.0, 2.0], [2.0, 2.0], width=128)], "mxfp8-floor", "mxfp8-rceil"), "width=128"),
        (([a, {**b, "config": None}], "mxfp8-floor", "mxfp8-rceil"), "results #2 records no run config"),
        (([a], "bf16", "mxfp8-rceil"), "no results have variant 'bf16'"),
        (
            ([a], "mxfp8-floor@bf16-forward", "mxfp8-rceil"),
            r"seeds \[0, 1\] have no final_val_loss_bf16_forward",
        ),
        (([a], "mxfp8-floor@fp16", "mxfp8-rceil"), "suffix"),
        (([{"config": {}}], "mxfp8-floor", "mxfp8-rceil"), "no per-run results"),
        (([{"config": {}, "runs": {"bf16": {"x": {}}}}], "bf16", "bf16"), "not a map of seed to run"),
        (([{"config": {}, "runs": {"bf16": [2.0]}}], "bf16", "bf16"), "not a map of seed to run"),
        (([_study([0], [2.0], [2.0])], "mxfp8-floor", "mxfp8-rceil"), "need at least 2"),
    ]:
        with pytest.raises(ValueError, match=match):
            parity.compare(*args)
    # the command: one line per pair; bad input one line on stderr, exit code 2
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    parity.compare_main([str(pa), str(pb), "--pairs", "mxfp8-floor:mxfp8-rceil"])
    assert capsys.readouterr().out.startswith("mxfp8-floor - mxfp8-rceil: +0.2000 +- ")
    for bad in ([str(pa), str(tmp_path / "missing.json"), "--pairs", "mxfp8-floor:mxfp8-rceil"],
                [str(pa), "--pairs", "mxfp8-floor"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            parity.compare_main(bad)
        assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
