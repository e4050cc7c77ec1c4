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
    zero = {r["variant"] for r in records if r["kind"] == "zero-shot"}
    assert zero == {"base-fp32"} | {f"{s}-b{b}" for s in study.ZERO_SHOT_STORAGE for b in (64, 128)}
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
    by = {r["variant"]: r for r in records if r["kind"] == "zero-shot"}
    # 4-bit storage far below fp32 (in this tiny model NF4+DQ's 1 KiB code table per tensor outweighs its saving)
    assert by["nf4-b64"]["weight_bytes"] < 0.5 * by["base-fp32"]["weight_bytes"]
    assert by["nf4-b64"]["linear_bits_per_param"] == by["int4-b64"]["linear_bits_per_param"] == 4.5
    assert by["nf4-dq-b64"]["linear_bits_per_param"] == pytest.approx(4.127, abs=1e-3)
    ft = {r["variant"]: r for r in records if r["kind"] == "finetune" and r["seed"] == 0}
    assert ft["qlora-nf4-dq"]["weight_bytes"] < 0.5 * ft["lora-fp32"]["weight_bytes"]
    assert ft["full-fp32"]["trainable_params"] > 3 * ft["lora-fp32"]["trainable_params"]
    assert ft["lora-fp32"]["trainable_params"] == ft["qlora-nf4"]["trainable_params"]
    assert len(results["lr_sweep"]) == 2 * len(study.FINETUNE_VARIANTS)
    assert results["paired_test"]["n"] == 2 and "p" in results["paired_test"]
    assert "qlora-nf4-dq" in (out / "results.md").read_text()
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_resumes_and_refuses_another_config(quick_run, capsys):
    out, argv = quick_run
    runs = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert study.main(argv) == 0  # every run file is reused: nothing retrained
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == runs
    capsys.readouterr()
    assert study.main([*argv, "--r", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nf4lora-study: error:") and "(r differ)" in err and "\n" not in err


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
