"""Artefact fingerprints: a re-run whose settings differ rebuilds each stale artefact (and those built on
it), naming the setting; unrelated artefacts are kept; resume=false rebuilds everything."""

from __future__ import annotations

import dataclasses

import pytest

from rerank_qlora.artefacts import ARTEFACTS, reconcile
from rerank_qlora.config import RerankQLoRAConfig, TrainConfig


def _fill(run_dir):
    for paths, _, _ in ARTEFACTS.values():
        for p in paths:
            path = run_dir / p
            if "." in path.name:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("x")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "weights.safetensors").write_text("x")


def _present(run_dir):
    return {name for name, (paths, _, _) in ARTEFACTS.items() if all((run_dir / p).exists() for p in paths)}


def _with(cfg, section, **changes):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


ALL = set(ARTEFACTS)
CASES = [  # (section, change, artefacts rebuilt, setting named)
    ("model", {"tiny_hidden_size": 64}, ALL - {"teacher store"}, "model.tiny_hidden_size 128 -> 64"),
    ("teacher", {"offline_explanation": "fixed"}, ALL, "teacher.offline_explanation 'evidence' -> 'fixed'"),
    (
        "train",
        {"steps": TrainConfig().steps + 1},
        {"distillation checkpoints", "refinement samples and checkpoints", "rerank judgements"},
        f"train.steps {TrainConfig().steps} -> {TrainConfig().steps + 1}",
    ),
    (
        "refine",
        {"samples": 2},
        {"refinement samples and checkpoints", "rerank judgements"},
        "refine.samples 4 -> 2",
    ),
    ("rerank", {"judge": "generate"}, {"rerank judgements"}, "rerank.judge 'forced' -> 'generate'"),
]


def _answer_config(run_dir):
    """The InteRank path (whole-answer objective), where every setting of CASES is valid."""
    return RerankQLoRAConfig(run_dir=run_dir, train=TrainConfig(objective="answer"))


@pytest.mark.parametrize("section, change, rebuilt, named", CASES, ids=[c[0] for c in CASES])
def test_changed_setting_rebuilds_stale_artefacts(tmp_path, section, change, rebuilt, named):
    cfg = _answer_config(tmp_path)
    _fill(tmp_path)
    assert len(reconcile(tmp_path, cfg)) == len(ALL)  # no record yet: nothing is trusted
    _fill(tmp_path)
    assert reconcile(tmp_path, cfg) == [] and _present(tmp_path) == ALL  # same settings: all reused
    messages = reconcile(tmp_path, _with(cfg, section, **change))
    assert _present(tmp_path) == ALL - rebuilt
    assert len(messages) == len(rebuilt) and named in messages[0]
    _fill(tmp_path)
    assert reconcile(tmp_path, _with(cfg, section, **change)) == []  # the new settings are now the record


def test_unrelated_settings_and_resume_false(tmp_path):
    cfg = RerankQLoRAConfig(run_dir=tmp_path)
    _fill(tmp_path)
    reconcile(tmp_path, cfg)
    _fill(tmp_path)
    assert reconcile(tmp_path, _with(cfg, "train", log_every=1, checkpoint_every=7)) == []
    assert (
        reconcile(tmp_path, _with(cfg, "rerank", k=5, fusion_weight=0.3)) == []
    )  # judgements do not depend on them
    assert _present(tmp_path) == ALL
    messages = reconcile(tmp_path, cfg, resume=False)
    assert _present(tmp_path) == set() and "resume=false" in messages[0] and len(messages) == len(ALL)
