"""The retrieval task: deterministic generation, and a probe that scores a perfect copier 100% and a random
predictor at chance."""

import pytest
import torch

from siattn.retrieval import CopyTask, copy_batch, needle_probe, probe_accuracy

TASK = CopyTask()


def _copier_logits(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """A hand-made induction head: after a string symbol, predict what followed its previous occurrence."""
    logits = torch.zeros(*tokens.shape, vocab)
    for b in range(tokens.shape[0]):
        seq = tokens[b].tolist()
        last = {}
        for i, tok in enumerate(seq):
            if tok >= TASK.n_filler and tok in last and last[tok] + 1 < len(seq):
                logits[b, i, seq[last[tok] + 1]] = 1.0
            last[tok] = i
    return logits


def test_generation_is_deterministic_and_well_formed():
    a = copy_batch(TASK, 16, 128, torch.Generator().manual_seed(3))
    b = copy_batch(TASK, 16, 128, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], copy_batch(TASK, 16, 128, torch.Generator().manual_seed(4))[0])
    tokens, mask = a
    counts = mask.sum(1)
    assert ((counts >= TASK.min_len - 1) & (counts <= TASK.max_len - 1)).all()
    # Every masked target is a string symbol that also appeared earlier in the window.
    targets = tokens[:, 1:]
    assert (targets[mask] >= TASK.n_filler).all()
    assert torch.equal(needle_probe(TASK, 512, 4, seed=0), needle_probe(TASK, 512, 4, seed=0))


@pytest.mark.parametrize("length", [128, 512])
def test_probe_scores_a_perfect_copier_100_and_random_at_chance(length):
    tokens = needle_probe(TASK, length, 64, seed=1)
    assert probe_accuracy(TASK, _copier_logits(tokens, TASK.vocab), tokens) == 1.0
    shifted = torch.roll(_copier_logits(tokens, TASK.vocab), 1, dims=1)  # right answers one step late
    assert probe_accuracy(TASK, shifted, tokens) < 0.1
    g = torch.Generator().manual_seed(2)
    random = torch.zeros(*tokens.shape, TASK.vocab)
    random[..., TASK.n_filler :] = torch.rand(*tokens.shape, TASK.vocab - TASK.n_filler, generator=g)
    acc = probe_accuracy(TASK, random, tokens)
    chance = 1 / (TASK.vocab - TASK.n_filler)
    assert abs(acc - chance) < 4 * (chance / (64 * (TASK.needle_len - 1))) ** 0.5  # 4 binomial sigmas


def test_training_batches_are_solvable_by_the_copier():
    tokens, mask = copy_batch(TASK, 32, 128, torch.Generator().manual_seed(5))
    logits = _copier_logits(tokens[:, :-1], TASK.vocab)
    assert (logits[mask].argmax(-1) == tokens[:, 1:][mask]).float().mean().item() == 1.0


def test_bad_task_and_lengths_raise():
    with pytest.raises(ValueError, match="n_filler"):
        CopyTask(vocab=10, n_filler=10)
    with pytest.raises(ValueError, match="length"):
        copy_batch(TASK, 1, 20, torch.Generator())
    with pytest.raises(ValueError, match="length"):
        needle_probe(TASK, 20, 1, seed=0)


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    from siattn import rope_frequencies
    from siattn.retrieval import _ntk_base, _yarn_frequencies

    inv = rope_frequencies(16, 1e4)
    yarn = _yarn_frequencies(inv, 128, 16.0)
    ratio = 128 * inv / (2 * torch.pi)
    assert torch.equal(yarn[ratio > 32], inv[ratio > 32])
    torch.testing.assert_close(yarn[ratio < 1], inv[ratio < 1] / 16)
    assert _ntk_base(1e4, 16, 1.0) == 1e4 and _ntk_base(1e4, 16, 4.0) > 4e4


def test_study_end_to_end_resumes_and_reuses_rope_weights(tmp_path, capsys):
    from siattn.retrieval import RetrievalConfig, run

    cfg = RetrievalConfig(
        out=str(tmp_path / "out"),
        steps=2,
        batch_size=2,
        warmup=1,
        eval_multiples=(1, 2),
        seeds=(0,),
        variants=("rope", "rope+ntk", "rope+yarn", "si-p-rope"),
        trials=4,
    )
    summary = run(cfg)
    runs = {r["variant"]: r for r in summary["runs"]}
    assert set(runs) == set(cfg.variants) and set(runs["si-p-rope"]["needle"]) == {"128", "256"}
    # rope+ntk / rope+yarn evaluate the RoPE weights: identical at the training length, where both are RoPE
    assert runs["rope+ntk"]["needle"]["128"] == runs["rope"]["needle"]["128"]
    assert runs["rope+ntk"]["train_copy_acc"] == runs["rope"]["train_copy_acc"]
    for name in ("results.json", "table.md", "needle.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").glob("*.json")}
    run(cfg)  # resumes: nothing retrained
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").glob("*.json")} == mtimes
