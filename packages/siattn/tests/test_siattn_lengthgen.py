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
        "--rope-bases",
        "100",
        "1000",
        "--p-rope-bases",
        "4",
        "8",
        "--taus",
        "1",
        "10",
        "--si-p-rope-base",
        "4",
        "--eval-tokens",
        "64",
        "--needle-trials",
        "1",
        "--workers",
        "1",
        "--variants",
        "rope",
        "p-rope",
        "logn-learned+p-rope",
        "si-p-rope",
    ]
    lengthgen.main(argv)
    summary = json.loads((out / "results.json").read_text())
    tuned_tau = summary["chosen"]["si-p-rope"]["tau"]
    paper_row = {"si-p-rope (paper tau=10)"} if tuned_tau != 10 else set()
    rows = {"rope", "p-rope", "logn+p-rope", "logn-learned+p-rope", "si-p-rope"}
    assert set(summary["rows"]) == rows | paper_row
    for variant in (
        "rope",
        "p-rope",
        "logn-learned+p-rope",
        "si-p-rope",
    ):  # selection on in-distribution loss only
        sweep = [s for s in summary["sweep"] if s["variant"] == variant and s["seed"] == 0]
        assert len(sweep) == 2
        assert summary["chosen"][variant] == min(sweep, key=lambda s: s["loss_in_dist"])["setting"]
    assert summary["chosen"]["si-p-rope"]["p_rope_base"] == 4  # SI's grid is tau at --si-p-rope-base
    for row in summary["rows"].values():  # every row, the paper's tau included, has both seeds
        assert len(row["by_length"]["32"]["losses"]) == 2
        assert len(row["by_length"]["32"]["loss_by_position"]) == 32
    assert (out / "loss_by_position.png").stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "| si-p-rope |" in table and ("| si-p-rope (paper tau=10) |" in table) == bool(paper_row)
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    # each variant: a grid of 2 on seed 0 + the chosen one on seed 1; SI's tau = 10 on seed 1 if not chosen
    assert len(runs) == 4 * 3 + len(paper_row)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    lengthgen.main(argv)  # resumes: nothing retrained
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    assert "si-p-rope" in capsys.readouterr().out
    # paired tests of SI against every other row beyond the training length: 2 seeds x 2 windows of 32
    assert set(summary["tests"]) == {"32"}
    assert set(summary["tests"]["32"]) == {f"si-p-rope - {r}" for r in summary["rows"] if r != "si-p-rope"}
    assert all(t["n"] == 2 * 2 for t in summary["tests"]["32"].values())
    assert "paired t-tests" in table.lower()

    # A run stored without per-window losses (as before they existed) is reloaded and evaluated, not
    # retrained, and gives the same losses.
    path = out / "runs" / "p-rope_p_rope_base=4_seed=0.json"
    before = json.loads(path.read_text())
    old = json.loads(path.read_text())
    for key in ("eval", "eval_logn"):
        for length in old[key].values():
            del length["loss_by_window"]
    path.write_text(json.dumps(old))
    weights = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.safetensors")}
    lengthgen.main(argv)
    after = json.loads(path.read_text())
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.safetensors")} == weights
    assert after["eval"] == before["eval"] and after["eval_logn"] == before["eval_logn"]
    assert after["final_train_loss"] == before["final_train_loss"]


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
        for i, name in enumerate(lengthgen.TABLE_ORDER)
    }
    path = tmp_path / "loss_by_position.png"
    plot_loss_by_position(cfg, {"rows": rows}, path)
    assert path.stat().st_size > 20_000


def test_default_grid_gives_every_variant_the_same_budget():
    """The default study tunes every trained variant over the same number of settings, one knob each, and
    the paper's tau = 10 is in SI's grid."""
    from siattn.lengthgen import VARIANTS, StudyConfig, model_config, paper_tau_setting, run_grid
    from siattn.models import GPT

    cfg = StudyConfig()
    grids = {v: run_grid(cfg, v) for v in VARIANTS}
    assert {len(g) for g in grids.values()} == {2}
    for grid in grids.values():  # distinct settings that differ in exactly one key
        assert len({json.dumps(s, sort_keys=True) for s in grid}) == len(grid)
        assert len({k for k in grid[0] if grid[0][k] != grid[1][k]}) == 1
    assert paper_tau_setting(cfg) in grids["si-p-rope"]
    assert [s["lr"] for s in grids["nope"]] == [s["lr"] for s in grids["alibi"]] and cfg.lr in cfg.lrs
    # learned LogN (the paper's LogN baseline) trains by default, over p-RoPE's knob, with a learned scale
    assert cfg.variants == tuple(VARIANTS) and grids["logn-learned+p-rope"] == grids["p-rope"]
    mcfg = model_config(cfg, "logn-learned+p-rope", grids["logn-learned+p-rope"][0])
    assert (mcfg.position, mcfg.attention) == ("p-rope", "logn-learned")
    scales = [n for n, p in GPT(mcfg).named_parameters() if n.endswith("logn_s")]
    assert len(scales) == cfg.n_layer
