"""`nf4lora-study`: the --quick run writes every variant; seeds change only initialisation and data order;
bad input is a one-line error with exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from nf4lora import study

# --quick, made smaller still so the whole run is a few seconds of compute
TINY = [
    "--pretrain-steps",
    "4",
    "--finetune-steps",
    "2",
    "--lrs",
    "1e-3",
    "2e-3",
    "--seeds",
    "0",
    "1",
    "--eval-windows",
    "4",
    "--jobs",
    "1",
]


@pytest.fixture(scope="module")
def corpora(shared_data):
    return {
        "pretrain": shared_data / "tinyshakespeare" / "input.txt",
        "finetune": shared_data / "cranfield" / "cran.all.1400",
    }


@pytest.fixture(scope="module")
def quick_run(corpora, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    argv = [
        "--out",
        str(out),
        "--quick",
        *TINY,
        "--pretrain-data",
        str(corpora["pretrain"]),
        "--finetune-data",
        str(corpora["finetune"]),
    ]
    assert study.main(argv) == 0
    return out, argv


def test_quick_writes_every_variant(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    zero = {(r["variant"], r["base_seed"]) for r in records if r["kind"] == "zero-shot"}
    names = {"base-fp32"} | {f"{s}-b{b}" for s in study.ZERO_SHOT_STORAGE for b in (64, 128)}
    assert zero == {(v, b) for v in names for b in (0, 1)}  # --quick: 2 bases
    finetuned = {(r["variant"], r["seed"]) for r in records if r["kind"] == "finetune"}
    assert finetuned == {(v, s) for v in study.FINETUNE_VARIANTS for s in (0, 1)}
    for r in records:
        assert {
            "variant",
            "seed",
            "eval_loss",
            "weight_bytes",
            "train_state_bytes",
            "peak_rss_growth_bytes",
        } <= set(r)
        assert 0 < r["eval_loss"] < 10 and r["weight_bytes"] > 0
    by = {r["variant"]: r for r in records if r["kind"] == "zero-shot" and r["base_seed"] == 0}
    # 4-bit storage far below fp32 (in this tiny model NF4+DQ's 1 KiB code table per tensor outweighs its
    # saving)
    assert by["nf4-b64"]["weight_bytes"] < 0.5 * by["base-fp32"]["weight_bytes"]
    assert by["nf4-b64"]["linear_bits_per_param"] == by["int4-b64"]["linear_bits_per_param"] == 4.5
    assert by["nf4-dq-b64"]["linear_bits_per_param"] == pytest.approx(4.127, abs=1e-3)
    ft = {r["variant"]: r for r in records if r["kind"] == "finetune" and r["seed"] == 0}
    assert ft["qlora-nf4-dq"]["weight_bytes"] < 0.5 * ft["lora-fp32"]["weight_bytes"]
    assert ft["full-fp32"]["trainable_params"] > 3 * ft["lora-fp32"]["trainable_params"]
    assert ft["lora-fp32"]["trainable_params"] == ft["qlora-nf4"]["trainable_params"]
    assert len(results["lr_sweep"]) == 2 * len(study.FINETUNE_VARIANTS)
    assert results["paired_test"]["n"] == 2 and "p" in results["paired_test"]
    assert [b["base_seed"] for b in results["bases"]] == [0, 1]
    assert set(results["zero_shot_summary"]) == names
    assert {(t["a"], t["b"], t["blocksize"]) for t in results["zero_shot_tests"]} == {
        (a, b, bs) for a, b in study.ZERO_SHOT_PAIRS for bs in (64, 128)
    }
    assert all(t["n"] == 2 and "p" in t for t in results["zero_shot_tests"])
    assert "qlora-nf4-dq" in (out / "results.md").read_text()
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_resumes_and_refuses_another_config(quick_run, capsys):
    out, argv = quick_run
    runs = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert study.main(argv) == 0  # every run file is reused: nothing retrained
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == runs
    capsys.readouterr()
    assert study.main([*argv, "--bases", "1"]) == 0  # fewer bases: the finished ones are reused
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == runs
    results = json.loads((out / "results.json").read_text())
    assert {r["base_seed"] for r in results["records"] if r["kind"] == "zero-shot"} == {0}
    assert all(t["note"] == "needs at least 2 pairs" for t in results["zero_shot_tests"])
    assert "across 1 bases, nf4 - fp4 at blocksize 64: needs at least 2 pairs." in capsys.readouterr().out
    assert study.main([*argv, "--r", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nf4lora-study: error:") and "(r differ)" in err and "\n" not in err


def test_bases_differ_by_seed_and_are_reused(quick_run):
    out, _ = quick_run
    cfg = study.StudyConfig(out=str(out), **study.QUICK)
    assert study.base_dir_for(cfg, 0) == out / "base" and study.base_dir_for(cfg, 1) == out / "base-seed1"
    w = {s: study._load_base(study.base_dir_for(cfg, s)).state_dict() for s in (0, 1)}
    assert not torch.equal(
        w[0]["model.layers.0.self_attn.q_proj.weight"], w[1]["model.layers.0.self_attn.q_proj.weight"]
    )
    assert study.pretrain_base(cfg, out / "base-seed1", 1)["base_seed"] == 1  # cached: no training
    with pytest.raises(ValueError, match="holds base seed 1, not 2"):
        study.pretrain_base(cfg, out / "base-seed1", 2)


def _synthetic_zero_shot(deltas: dict[str, list[float]]) -> list[dict]:
    """Zero-shot records of len(list) bases: fp32 loss 2 + seed / 10, each variant that plus its delta."""
    records = []
    n = len(next(iter(deltas.values())))
    for seed in range(n):
        fp32 = 2.0 + seed / 10
        rows = [("base-fp32", "fp32", None, 0.0)] + [
            (v, v.rsplit("-b", 1)[0], int(v.rsplit("-b", 1)[1]), d[seed]) for v, d in deltas.items()
        ]
        for variant, storage, blocksize, delta in rows:
            records.append(
                {
                    "kind": "zero-shot",
                    "variant": variant,
                    "storage": storage,
                    "blocksize": blocksize,
                    "base_seed": seed,
                    "eval_loss": fp32 + delta,
                    "eval_loss_finetune_test": 3.0 + 2 * delta,
                    "weight_bytes": 1000,
                    "linear_bits_per_param": 32.0 if blocksize is None else 4.5,
                }
            )
    return records


def test_zero_shot_summary_and_paired_tests_over_bases():
    from scipy.stats import ttest_rel

    nf4, fp4, int4 = (
        [0.001, 0.003, 0.002, 0.0015],
        [0.004, 0.005, 0.0035, 0.006],
        [0.002, 0.001, 0.004, 0.001],
    )
    summary = study.zero_shot_summary(
        _synthetic_zero_shot({"nf4-b64": nf4, "fp4-b64": fp4, "int4-b64": int4})
    )
    assert summary["base-fp32"]["eval_loss"]["mean"] == pytest.approx(2.15)
    s = summary["fp4-b64"]
    assert s["base_seeds"] == [0, 1, 2, 3] and s["delta"] == pytest.approx(fp4)
    assert s["mean"] == pytest.approx(sum(fp4) / 4) and s["min"] == pytest.approx(0.0035)
    assert s["std"] == pytest.approx(torch.tensor(fp4, dtype=torch.float64).std().item())
    assert s["finetune_test"]["mean"] == pytest.approx(2 * s["mean"])
    tests = {t["b"]: t for t in study.zero_shot_tests(summary)}
    assert set(tests) == {"fp4", "int4"} and all(
        t["a"] == "nf4" and t["blocksize"] == 64 for t in tests.values()
    )
    assert tests["fp4"]["mean_diff"] == pytest.approx(sum(a - b for a, b in zip(nf4, fp4)) / 4)
    assert tests["fp4"]["mean_diff"] < 0
    assert tests["fp4"]["p"] == pytest.approx(ttest_rel(nf4, fp4).pvalue)
    assert tests["int4"]["p"] == pytest.approx(ttest_rel(nf4, int4).pvalue)


def test_plot_renders_on_small_data(tmp_path):
    variants = [f"{s}-b{b}" for s in study.ZERO_SHOT_STORAGE for b in (64, 128)]
    deltas = {v: [0.001 * (i + 1) + 0.0005 * seed for seed in range(3)] for i, v in enumerate(variants)}
    records = _synthetic_zero_shot(deltas)
    for k, v in enumerate(study.FINETUNE_VARIANTS):
        for seed in range(3):
            records.append(
                {"kind": "finetune", "variant": v, "seed": seed, "lr": 1e-3, "eval_loss": 1.7 + 0.01 * k}
            )
            records[-1].update(weight_bytes=1, train_state_bytes=2, peak_rss_growth_bytes=3)
    summary = study.zero_shot_summary(records)
    results = {
        "records": records,
        "zero_shot_summary": summary,
        "zero_shot_tests": study.zero_shot_tests(summary),
        "summary": study.summarise(records),
        "paired_test": study.paired_test(records),
    }
    path = tmp_path / "study.png"
    study.plot(results, path)
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 20_000
    assert "| fp4-b128 | 4.500 | +0.0065 +- 0.0005 |" in study.markdown(results)


def test_seeds_change_only_adapter_init_and_data_order(quick_run, corpora):
    out, _ = quick_run
    cfg = study.StudyConfig(out=str(out), **study.QUICK)
    base = out / "base"
    models = {
        (v, s): study.build_variant(v, base, cfg, s)[0]
        for v in ("lora-fp32", "qlora-nf4-dq", "full-fp32")
        for s in (0, 1)
    }

    def adapters(model):
        return {
            n.removeprefix("base_model.model.").replace(".default.", "."): p.detach().clone()
            for n, p in model.named_parameters()
            if ".lora_" in n
        }

    def frozen(model):
        return {n: t.detach().clone() for n, t in model.state_dict().items() if ".lora_" not in n}

    a0, a1 = adapters(models["lora-fp32", 0]), adapters(models["lora-fp32", 1])
    assert len(a0) == 2 * 7 * cfg.layers  # A and B of q, k, v, o, gate, up, down per layer
    assert adapters(models["qlora-nf4-dq", 0]).keys() == a0.keys()
    for name, t in a0.items():
        assert torch.equal(
            t, adapters(models["qlora-nf4-dq", 0])[name]
        )  # same seed: same start, LoRA or QLoRA
        if ".lora_A." in name:
            assert not torch.equal(t, a1[name])  # another seed: another init
        else:
            assert not t.any() and not a1[name].any()  # B starts at zero
    for v in (
        "lora-fp32",
        "qlora-nf4-dq",
        "full-fp32",
    ):  # everything but the adapters: identical across seeds
        f0, f1 = frozen(models[v, 0]), frozen(models[v, 1])
        assert f0.keys() == f1.keys() and all(torch.equal(f0[k], f1[k]) for k in f0)
    train, val, test = study.finetune_splits(corpora["finetune"], cfg.context)
    w = {s: study.train_windows(train, 5, 3, cfg.context, s) for s in (0, 1)}
    assert torch.equal(w[0], study.train_windows(train, 5, 3, cfg.context, 0)) and not torch.equal(w[0], w[1])
    # the evaluation windows depend on nothing but the split
    model = models["lora-fp32", 0]
    assert study.eval_loss(model, test, cfg) == study.eval_loss(model, test, cfg)


def test_missing_data_is_a_one_line_error(tmp_path, capsys):
    code = study.main(
        ["--out", str(tmp_path / "o"), "--quick", "--finetune-data", str(tmp_path / "nope.txt")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"nf4lora-study: error: --finetune-data: file not found: {tmp_path / 'nope.txt'}"
    assert study.main(["--out", str(tmp_path / "o"), "--quick", "--hidden", "33"]) == 2
    assert "--hidden (33) must be a multiple of --heads (2)" in capsys.readouterr().err
