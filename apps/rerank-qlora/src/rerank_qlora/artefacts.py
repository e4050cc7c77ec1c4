"""Fingerprints of a run directory's artefacts: each records the settings it was built from, and a re-run
whose settings differ rebuilds it (and everything built on it) instead of reusing it silently.

`fingerprints.json` holds, per artefact, the flattened config keys it depends on (and the Python version for
the task-derived ones). Chains: the base model (tokenizer included) <- distillation checkpoints <- refinement
samples and checkpoints <- rerank judgements; the teacher store stands alone (its records are keyed by the
teacher's name, so changed pairs only add records).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from shared_kernels.app import flat_config
from shared_kernels.runconfig import config_to_dict, write_json_atomic

# artefact -> (paths under the run directory, config key prefixes it depends on, artefacts it is built on)
ARTEFACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "base model": (
        ("base-model",),
        (
            "model.",
            "task.",
            "train.seed",
            "train.max_length",
            "attention.context_factor",
            "teacher.offline_explanation",
        ),
        (),
    ),
    "teacher store": (
        ("teacher.jsonl",),
        ("teacher.kind", "teacher.base_url", "teacher.model", "teacher.offline_explanation"),
        (),
    ),
    "distillation checkpoints": (
        ("checkpoints/distill", "metrics.jsonl"),
        ("task.", "teacher.", "quant.", "attention.", "lora.", "train."),
        ("base model", "teacher store"),
    ),
    "refinement samples and checkpoints": (
        ("refine_samples.json", "checkpoints/refine"),
        ("refine.",),
        ("distillation checkpoints",),
    ),
    "rerank judgements": (
        ("rerank.jsonl",),
        ("rerank.judge", "rerank.max_new_tokens", "rerank.use_label_probabilities"),
        ("refinement samples and checkpoints",),
    ),
}
# settings that change no artefact's content
IGNORED = ("teacher.concurrency", "teacher.api_key_env", "train.log_every", "train.checkpoint_every")
FILE = "fingerprints.json"


def settings(cfg: Any) -> dict[str, dict[str, Any]]:
    """{artefact: {setting: value}}: each artefact's own settings plus those of the artefacts it is built
    on."""
    flat = flat_config(config_to_dict(cfg))
    own = {
        name: {k: v for k, v in flat.items() if k.startswith(prefixes) and k not in IGNORED}
        for name, (_, prefixes, _) in ARTEFACTS.items()
    }
    own["base model"]["python"] = ".".join(map(str, sys.version_info[:3]))
    out: dict[str, dict[str, Any]] = {}
    for name, (_, _, parents) in ARTEFACTS.items():  # parents come first in ARTEFACTS
        merged = dict(own[name])
        for parent in parents:
            merged.update(out[parent])
        out[name] = merged
    return out


def _exists(run_dir: Path, name: str) -> bool:
    return any((run_dir / p).exists() for p in ARTEFACTS[name][0])


def _remove(run_dir: Path, name: str) -> None:
    for p in ARTEFACTS[name][0]:
        path = run_dir / p
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def reconcile(run_dir: Path, cfg: Any, resume: bool = True) -> list[str]:
    """Remove each artefact of `run_dir` whose recorded settings differ from `cfg`'s (or that has no record),
    or all of them when `resume` is false; record `cfg`'s settings. Returns one message per artefact removed,
    naming the settings that changed (old -> new)."""
    run_dir = Path(run_dir)
    path = run_dir / FILE
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    current = settings(cfg)
    messages, removed = [], set()
    for name, (_, _, parents) in ARTEFACTS.items():
        if not _exists(run_dir, name):
            continue
        if removed.intersection(parents):
            _remove(run_dir, name)
            removed.add(name)
            messages.append(
                f"rebuilding the {name}: built on a rebuilt {' and '.join(sorted(removed & set(parents)))}"
            )
            continue
        removed.add(name)  # undone below when it is kept
        if not resume:
            _remove(run_dir, name)
            messages.append(f"rebuilding the {name}: resume=false")
            continue
        old = recorded.get(name)
        if old is None:
            _remove(run_dir, name)
            messages.append(f"rebuilding the {name}: no record of the settings it was built from")
            continue
        changed = sorted(k for k in set(old) | set(current[name]) if old.get(k) != current[name].get(k))
        if changed:
            _remove(run_dir, name)
            shown = ", ".join(f"{k} {old.get(k)!r} -> {current[name].get(k)!r}" for k in changed[:4])
            messages.append(
                f"rebuilding the {name}: {shown}"
                + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "")
            )
            continue
        removed.discard(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, current)
    return messages
