"""The key-value retrieval task: deterministic generation, and a probe that scores a hand-made perfect
retriever 100% and a random predictor at chance; the study end to end on a tiny budget."""

import dataclasses
import statistics

import pytest
import torch

from siattn.retrieval import KVTask, kv_batch, kv_probe, probe_accuracy

TASK = KVTask()


def _retriever_logits(tokens: torch.Tensor, task: KVTask) -> torch.Tensor:
    """A hand-made retriever: at query Q_k, predict the value of the last pair token carrying key k."""
    logits = torch.zeros(*tokens.shape, task.vocab)
    for b in range(tokens.shape[0]):
        stored = {}
        for i, tok in enumerate(tokens[b].tolist()):
            if task.n_filler <= tok < task.query0:
                key, value = divmod(tok - task.n_filler, task.n_values)
                stored[key] = value
            elif task.query0 <= tok < task.value0 and tok - task.query0 in stored:
                logits[b, i, task.value0 + stored[tok - task.query0]] = 1.0
    return logits


def test_generation_is_deterministic_and_well_formed():
    a = kv_batch(TASK, 16, 128, torch.Generator().manual_seed(3))
    b = kv_batch(TASK, 16, 128, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], kv_batch(TASK, 16, 128, torch.Generator().manual_seed(4))[0])
    tokens, mask = a
    assert (mask.sum(1) == TASK.n_keys).all()
    assert (mask[:, : 128 // 2] == 0).all()  # queries in the second half only
    targets = tokens[:, 1:][mask]
    assert ((targets >= TASK.value0) & (targets < TASK.vocab)).all()
    pairs = (tokens >= TASK.n_filler) & (tokens < TASK.query0)
    assert (pairs.sum(1) == TASK.n_keys).all() and not pairs[:, 128 // 2 :].any()
    assert torch.equal(kv_probe(TASK, 512, 4, seed=0), kv_probe(TASK, 512, 4, seed=0))


@pytest.mark.parametrize("length", [128, 512])
def test_probe_scores_a_perfect_retriever_100_and_random_at_chance(length):
    tokens = kv_probe(TASK, length, 64, seed=1)
    pairs = (tokens >= TASK.n_filler) & (tokens < TASK.query0)
    assert not pairs[:, length // 4 :].any() and (pairs.sum(1) == TASK.n_keys).all()
    assert probe_accuracy(TASK, _retriever_logits(tokens, TASK), tokens) == 1.0
    shifted = torch.roll(_retriever_logits(tokens, TASK), 1, dims=1)  # right answers one step late
    assert probe_accuracy(TASK, shifted, tokens) < 0.1
    g = torch.Generator().manual_seed(2)
    random = torch.zeros(*tokens.shape, TASK.vocab)
    random[..., TASK.value0 :] = torch.rand(*tokens.shape, TASK.n_values, generator=g)
    chance = 1 / TASK.n_values
    n = 64 * TASK.n_keys
    assert abs(probe_accuracy(TASK, random, tokens) - chance) < 4 * (chance * (1 - chance) / n) ** 0.5


def test_training_batches_are_solvable_by_the_retriever():
    tokens, mask = kv_batch(TASK, 32, 128, torch.Generator().manual_seed(5))
    logits = _retriever_logits(tokens[:, :-1], TASK)
    assert (logits[mask].argmax(-1) == tokens[:, 1:][mask]).float().mean().item() == 1.0


def test_bad_task_and_lengths_raise():
    with pytest.raises(ValueError, match="n_keys"):
        KVTask(n_keys=0)
    with pytest.raises(ValueError, match="length"):
        kv_batch(TASK, 1, 20, torch.Generator())
    with pytest.raises(ValueError, match="length"):
        kv_probe(TASK, 20, 1, seed=0)


def test_study_end_to_end_tunes_resumes_and_reuses_rope_weights(tmp_path):
    from siattn.retrieval import GRIDS, RetrievalConfig, run

    cfg = RetrievalConfig(
        out=str(tmp_path / "out"),
        steps=2,
        batch_size=2,
        warmup=1,
        eval_multiples=(1, 2),
        seeds=(0, 1),
        variants=("rope+ntk", "rope+yarn", "si-p-rope"),
        trials=2,
        val_batches=1,
    )
    summary = run(cfg)
    # every trained variant got its whole grid on seed 0; the chosen setting (and SI's tau=10) on seed 1
    assert {(s["variant"], str(s["setting"])) for s in summary["sweep"]} == {
        (v, str(s)) for v in ("rope", "si-p-rope") for s in GRIDS[v]
    }
    rows = summary["rows"]
    assert summary["chosen"]["si-p-rope"] in GRIDS["si-p-rope"]
    for label, row in rows.items():
        assert row["seeds"] == [0, 1] and set(row["needle"]) == {"128", "256"}, label
    if summary["chosen"]["si-p-rope"]["tau"] != 10:
        assert rows["si-p-rope (paper tau=10)"]["setting"] == {"tau": 10.0}
    # the rescalings evaluate the chosen RoPE weights: identical to each other at the training length
    assert rows["rope+ntk"]["needle"]["128"] == rows["rope+yarn"]["needle"]["128"]
    assert rows["rope+ntk"]["val_loss"] == rows["rope+yarn"]["val_loss"]
    assert set(summary["tests"]) == {"256"}  # every length beyond training
    assert "si-p-rope - rope+ntk" in summary["tests"]["256"]
    for name in ("results.json", "table.md", "needle.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert (tmp_path / "out" / "needle.png").stat().st_size > 10_000
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").glob("*.json")}
    run(cfg)  # resumes: nothing retrained
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").glob("*.json")} == mtimes

    # A third seed and a longer probe on the same --out: only seed 2 trains; finished runs are reloaded and
    # probed at the new length only, giving what a fresh study with that length gives.
    weights = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").glob("*.safetensors")}
    more = dataclasses.replace(cfg, eval_multiples=(1, 2, 4), seeds=(0, 1, 2))
    extended = run(more)
    assert all(p.stat().st_mtime_ns == t for p, t in weights.items())
    for label, row in extended["rows"].items():
        assert row["seeds"] == [0, 1, 2] and set(row["needle"]) == {"128", "256", "512"}, label
        assert row["needle"]["256"][:2] == rows[label]["needle"]["256"], label
        assert row["needle_sd"]["512"] == pytest.approx(statistics.stdev(row["needle"]["512"]))
    assert set(extended["tests"]) == {"256", "512"}
    assert all(t["n"] == 3 * 2 for t in extended["tests"]["512"].values())  # 3 seeds x 2 probe windows
    fresh = run(dataclasses.replace(more, out=str(tmp_path / "fresh"), seeds=(0, 1)))
    for label, row in fresh["rows"].items():
        assert row["needle"]["512"] == extended["rows"][label]["needle"]["512"][:2], label
        assert row["val_loss"] == extended["rows"][label]["val_loss"][:2], label


def test_paired_test_over_windows_and_seeds():
    from siattn.retrieval import _paired_test

    def runs(per_seed):
        return [{"seed": s, "needle_windows": {"512": w}} for s, w in enumerate(per_seed)]

    same = runs([[1.0, 0.5, 0.0], [0.5, 0.5, 1.0]])
    assert _paired_test(same, same, "512") == {"difference": 0.0, "p": 1.0, "n": 6}
    better = runs([[1.0] * 40, [0.9] * 40])
    worse = runs([[0.1 * (i % 3) for i in range(40)], [0.1 * (i % 2) for i in range(40)]])
    t = _paired_test(better, worse, "512")
    assert t["n"] == 80 and t["difference"] > 0.8 and t["p"] < 1e-6
    assert _paired_test(worse, better, "512")["difference"] == -t["difference"]
