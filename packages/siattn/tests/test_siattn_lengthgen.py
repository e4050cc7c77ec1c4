"""Smoke test of the length-generalisation CLI on a tiny corpus: it runs, selects, resumes, and writes
outputs."""

import json

from siattn import lengthgen


def test_cli_tiny_config_end_to_end_and_resume(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 60)
    out = tmp_path / "out"
    argv = [
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--n-layer",
        "1",
        "--d-model",
        "16",
        "--n-head",
        "2",
        "--train-length",
        "16",
        "--eval-multiples",
        "1",
        "2",
        "--seeds",
        "0",
        "1",
        "--p-rope-bases",
        "4",
        "8",
        "--taus",
        "10",
        "--eval-tokens",
        "64",
        "--needle-trials",
        "1",
        "--workers",
        "1",
        "--variants",
        "rope",
        "p-rope",
        "si-p-rope",
    ]
    lengthgen.main(argv)
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["rows"]) == {"rope", "p-rope", "logn+p-rope", "si-p-rope"}
    sweep = [s for s in summary["sweep"] if s["variant"] == "p-rope" and s["seed"] == 0]
    best = min(sweep, key=lambda s: s["loss_in_dist"])["setting"]
    assert summary["chosen"]["p-rope"] == best  # selection on in-distribution loss only
    row = summary["rows"]["si-p-rope"]["by_length"]["32"]
    assert len(row["losses"]) == 2 and len(row["loss_by_position"]) == 32
    assert (out / "loss_by_position.png").stat().st_size > 0
    assert "| si-p-rope |" in (out / "table.md").read_text()
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert len(runs) == 1 + 2 + 2 + 3  # rope x2 seeds, p-rope grid of 2 + seed 1, si grid of 2 + seed 1
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    lengthgen.main(argv)  # resumes: nothing retrained
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    assert "si-p-rope" in capsys.readouterr().out


def test_loss_by_position_plot_renders(tmp_path):
    """The plot alone, on a made-up summary at 16x (fast): the PNG exists and is not trivial."""
    import torch

    from siattn.lengthgen import StudyConfig, plot_loss_by_position

    cfg = StudyConfig(train_length=128, eval_multiples=(1, 16))
    gen = torch.Generator().manual_seed(0)
    rows = {
        name: {
            "by_length": {
                "2048": {"loss_by_position": (2 + 0.1 * i + torch.rand(2048, generator=gen)).tolist()}
            }
        }
        for i, name in enumerate(["rope", "nope", "p-rope", "logn+p-rope", "alibi", "si-p-rope"])
    }
    path = tmp_path / "loss_by_position.png"
    plot_loss_by_position(cfg, {"rows": rows}, path)
    assert path.stat().st_size > 20_000
