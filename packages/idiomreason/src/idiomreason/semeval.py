"""SemEval-2022 Task 2 subtask A: the official submission file, read back and scored, and the task's two
settings as prompt conditions.

Submission format (what the task's scorer `SubTask1Evaluator.py` reads): a CSV with header exactly
`ID,Language,Setting,Label`; one row per evaluated ID and setting (`zero_shot`, then `one_shot`), each
setting's rows in the order of the gold file; `Language` upper case (EN, PT, GL); `Label` 0 = idiomatic,
1 = literal, or empty for a setting not submitted (the scorer then reports nothing for that setting).

Settings as prompts: "zero_shot" = no example of the query's expression (few-shot conditions draw shots of
other expressions); "one_shot" = the task's one-shot training examples of the query's own expression
(`train_one_shot.csv`) shown as shots (condition `<template>:oneshot`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from idiomreason.examples import Example
from idiomreason.metrics import macro_f1
from idiomreason.textfile import read_text

SUBMISSION_HEADER = ["ID", "Language", "Setting", "Label"]
SETTINGS = ("zero_shot", "one_shot")
LABEL_CODES = {"idiomatic": "0", "literal": "1"}
CODE_LABELS = {v: k for k, v in LABEL_CODES.items()}


def submission_text(
    examples: Sequence[Example],
    predictions: Mapping[str, Mapping[str, str | None]],
    unparseable_as: str = "literal",
) -> str:
    """The submission CSV for `examples` (in gold-file order).

    Args:
        predictions: setting -> example id -> label ("idiomatic" / "literal", None = unparseable). A setting
            missing here gets empty labels (not submitted); an example missing from a present setting is an
            error (the scorer needs every ID).
        unparseable_as: the label written for an unparseable answer (the format has no "no answer").
    """
    unknown = set(predictions) - set(SETTINGS)
    if unknown:
        raise ValueError(f"settings must be among {SETTINGS}, got {sorted(unknown)}")
    if unparseable_as not in LABEL_CODES:
        raise ValueError(f"unparseable_as must be 'idiomatic' or 'literal', got {unparseable_as!r}")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUBMISSION_HEADER)
    for setting in SETTINGS:
        labels = predictions.get(setting)
        for ex in examples:
            if labels is None:
                code = ""
            elif ex.id not in labels:
                raise ValueError(f"setting {setting!r}: no prediction for ID {ex.id!r}")
            else:
                code = LABEL_CODES[labels[ex.id] or unparseable_as]
            writer.writerow([ex.id, ex.language.upper(), setting, code])
    return buffer.getvalue()


def read_submission(path: str | Path) -> dict[str, list[tuple[str, str, str | None]]]:
    """setting -> [(ID, Language, label or None if empty)] in file order; format errors name the line."""
    rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
    if not rows or rows[0] != SUBMISSION_HEADER:
        raise ValueError(
            f"{path}:1: header must be {','.join(SUBMISSION_HEADER)}, got {rows[0] if rows else 'nothing'}"
        )
    out: dict[str, list[tuple[str, str, str | None]]] = {s: [] for s in SETTINGS}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 4:
            raise ValueError(f"{path}:{line}: expected 4 fields, got {len(row)}")
        key, language, setting, code = row
        if setting not in out:
            raise ValueError(f"{path}:{line}: Setting must be one of {SETTINGS}, got {setting!r}")
        if code not in ("", "0", "1"):
            raise ValueError(f"{path}:{line}: Label must be 0, 1 or empty, got {code!r}")
        out[setting].append((key, language, CODE_LABELS.get(code)))
    return out


def score_submission(path: str | Path, gold: Sequence[Example]) -> dict[tuple[str, str], float | None]:
    """Macro-F1 per (setting, language group) as the task scores a submission: the IDs of each setting must
    be the gold IDs in gold order; a setting with an empty label scores None. Groups: each language, "all"."""
    submitted = read_submission(path)
    by_id = {ex.id: ex for ex in gold}
    scores: dict[tuple[str, str], float | None] = {}
    for setting, rows in submitted.items():
        if not rows:
            continue
        ids = [r[0] for r in rows]
        if ids != [ex.id for ex in gold if ex.id in set(ids)] or not set(ids) <= set(by_id):
            raise ValueError(f"{path}: setting {setting!r}: IDs do not match the gold IDs in gold order")
        groups = sorted({r[1] for r in rows}) + ["all"]
        for group in groups:
            chosen = [r for r in rows if group == "all" or r[1] == group]
            if any(r[2] is None for r in chosen):
                scores[(setting, group)] = None
                continue
            scores[(setting, group)] = macro_f1([by_id[r[0]].label for r in chosen], [r[2] for r in chosen])
    return scores


def one_shot_examples(example: Example, pool: Sequence[Example]) -> list[Example]:
    """SemEval's one-shot setting: the labelled training examples of the query's own expression (in pool
    order), never the query itself."""
    from idiomreason.prompts import normalise_expression

    expression = normalise_expression(example.expression)
    return [ex for ex in pool if ex.id != example.id and ex.label is not None
            and normalise_expression(ex.expression) == expression]  # fmt: skip
