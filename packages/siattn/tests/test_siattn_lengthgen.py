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
    rows = {"rope", "rope+ntk", "rope+yarn", "p-rope", "logn+p-rope", "logn-learned+p-rope", "si-p-rope"}
    assert set(summary["rows"]) == rows | paper_row
    assert list(summary["rows"])[:3] == ["rope", "rope+ntk", "rope+yarn"]
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
    _check_rope_rescaled_rows(summary, out, corpus)

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

    # The RoPE runs of a study stored before RoPE+NTK / +YaRN existed (as /tmp/si/lengthgen's) gain them by
    # evaluation only: weights and the plain evaluation untouched, the same numbers as a fresh study.
    path = out / "runs" / f"rope_rope_base={summary['chosen']['rope']['rope_base']:g}_seed=1.json"
    before = json.loads(path.read_text())
    old = {k: v for k, v in before.items() if k not in ("eval_ntk", "eval_yarn")}
    path.write_text(json.dumps(old))
    lengthgen.main(argv)
    after = json.loads(path.read_text())
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.safetensors")} == weights
    for key in ("eval", "eval_ntk", "eval_yarn", "final_train_loss"):
        assert after[key] == before[key], key
    assert json.loads((out / "results.json").read_text())["rows"] == summary["rows"]


def _check_rope_rescaled_rows(summary: dict, out, corpus) -> None:
    """RoPE+NTK / +YaRN: the chosen RoPE runs' weights, rescaled per length, no training of their own."""
    import torch
    from safetensors.torch import load_file

    from siattn.models import GPT

    rows, chosen = summary["rows"], summary["chosen"]["rope"]
    assert not list((out / "runs").glob("rope+*"))  # no runs (nor weights) of their own
    for label in ("rope+ntk", "rope+yarn"):
        row = rows[label]
        assert row["setting"] == chosen and row["seeds"] == rows["rope"]["seeds"]
        # identity at the training length, a different model beyond it
        assert row["by_length"]["16"]["losses"] == rows["rope"]["by_length"]["16"]["losses"]
        assert row["by_length"]["32"]["losses"] != rows["rope"]["by_length"]["32"]["losses"]
    assert rows["rope+ntk"]["by_length"]["32"]["losses"] != rows["rope+yarn"]["by_length"]["32"]["losses"]
    # each row is what evaluating the stored RoPE weights rescaled gives; the model is left as trained after
    cfg = lengthgen.StudyConfig(data=str(corpus), train_length=16, eval_multiples=(1, 2), n_layer=1)
    cfg.d_model, cfg.n_head, cfg.eval_tokens, cfg.needle_trials = 16, 2, 64, 1
    model = GPT(lengthgen.model_config(cfg, "rope", chosen))
    weights = out / "runs" / f"rope_rope_base={chosen['rope_base']:g}_seed=0.safetensors"
    model.load_state_dict(load_file(str(weights)))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    inv_freq = model.layers[0].attn.inv_freq.clone()
    _, val = lengthgen.load_bytes(corpus)
    seed0 = rows["rope"]["seeds"].index(0)
    for label in ("rope+ntk", "rope+yarn"):
        got = lengthgen.evaluate(model, val, cfg, rescale=label)
        for n in ("16", "32"):
            assert got[n]["loss"] == rows[label]["by_length"][n]["losses"][seed0], (label, n)
        assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
        assert torch.equal(model.layers[0].attn.inv_freq, inv_freq)


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


def test_claim_run_reads_finished_runs_and_locks_unfinished_ones(tmp_path):
    import json
    import os

    from siattn.lengthgen import claim_run

    path, lock = tmp_path / "run.json", tmp_path / "run.lock"
    assert claim_run(path, lock, lambda r: True) == (None, False)  # nothing stored: this process owns it
    assert lock.read_text() == str(os.getpid())
    lock.unlink()
    path.write_text(json.dumps({"eval": {"64": 1.0}}))
    assert claim_run(path, lock, lambda r: "128" in r["eval"]) == ({"eval": {"64": 1.0}}, False)
    assert lock.exists()  # unfinished: held for the caller to complete
    lock.write_text("999999999")  # a dead holder's lock is taken over, not waited for
    assert claim_run(path, lock, lambda r: "128" in r["eval"]) == ({"eval": {"64": 1.0}}, False)
    assert lock.read_text() == str(os.getpid())
    lock.unlink()
    assert claim_run(path, lock, lambda r: "64" in r["eval"]) == ({"eval": {"64": 1.0}}, True)
    assert not lock.exists()  # finished at the first look: no lock taken
