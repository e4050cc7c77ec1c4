"""The parity command on a tiny config: outputs, identical data order, resumption after an interruption."""

from __future__ import annotations

import json

import pytest
import torch

from mxfp8train import parity

TINY = dict(steps=4, batch_size=2, context=16, n_layers=1, width=32, n_heads=2, eval_every=3, eval_batches=1,
            stats_every=2, ckpt_every=2, warmup=1, progress=False)


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(b"".join(f"line {i}: to be or not to be, that is the question.\n".encode() for i in range(400)))
    return path


def test_parity_command_writes_results_plot_and_table(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    parity.main(["--data", str(text_file), "--out", str(out), "--variants", "bf16,mxfp8-rceil,mxfp8-floor",
                 "--steps", "4", "--batch-size", "2", "--context", "16", "--n-layers", "1", "--width", "32",
                 "--n-heads", "2", "--eval-every", "2", "--eval-batches", "1", "--stats-every", "1", "--warmup", "1",
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert "| mxfp8-floor |" in printed and "ratio to bf16" in printed
    summary = json.loads((out / "results.json").read_text())
    assert (out / "parity_loss.png").stat().st_size > 1000
    res = summary["results"]
    assert set(res) == {"bf16", "mxfp8-rceil", "mxfp8-floor"}
    assert [s for s, _ in res["bf16"]["val"]] == [2, 4] and len(res["bf16"]["train"]) == 4
    assert res["mxfp8-rceil"]["diagnostics"]["input"]["clipped"] == 0
    assert res["mxfp8-floor"]["diagnostics"]["input"]["clip_fraction"] > 0  # FLOOR saturates
    # first step: same init and batch, so the three losses agree to quantization noise
    first = [r["train"][0][1] for r in res.values()]
    assert max(first) - min(first) < 0.05
    assert not list((out / "ckpt").glob("*/step-*"))  # checkpoints removed once a variant finishes


def test_parity_resumes_after_interruption(text_file, tmp_path, monkeypatch):
    cfg = parity.ParityConfig(out=str(tmp_path / "full"), data=str(text_file), variants=("mxfp8-rceil",), **TINY)
    full = parity.run_parity(cfg)["results"]["mxfp8-rceil"]

    cut = parity.ParityConfig(**{**cfg.__dict__, "out": str(tmp_path / "cut")})
    real_evaluate = parity.evaluate

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # first evaluation is at step 3, after the step-2 checkpoint

    monkeypatch.setattr(parity, "evaluate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        parity.run_parity(cut)
    assert (tmp_path / "cut" / "ckpt" / "mxfp8-rceil" / "step-00000002").is_dir()
    monkeypatch.setattr(parity, "evaluate", real_evaluate)
    resumed = parity.run_parity(cut)["results"]["mxfp8-rceil"]
    assert resumed["train"] == full["train"] and resumed["val"] == full["val"]


def test_same_data_order_for_every_variant_and_bad_config():
    cfg = parity.ParityConfig(**TINY)
    assert torch.equal(parity.batch_starts(5000, cfg), parity.batch_starts(5000, cfg))
    with pytest.raises(ValueError, match="variants"):
        parity.ParityConfig(variants=("fp4",))
    with pytest.raises(ValueError, match="steps"):
        parity.ParityConfig(steps=0)
