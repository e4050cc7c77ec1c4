"""Distillation SFT: train a student to write the teacher's explanation and label for (query, document).

Plain loop (`train.common.train_loop`) under accelerate, so the same code runs on CPU, one GPU, or
`accelerate launch` on several. Full-sequence or completion-only loss; full fine-tuning, LoRA (peft) or QLoRA
(`LoraSpec(quantize="nf4")`, through nf4lora).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rerankdistill.labels import INTERANK_PROMPT, RelevancePrompt
from rerankdistill.teacher import Pair, TeacherRecord
from rerankdistill.train.common import (
    Example,
    LoopConfig,
    LoraSpec,
    apply_lora,
    encode_example,
    save_model,
    train_loop,
)


@dataclass(frozen=True)
class DistillExample:
    """A prompt's inputs and the target answer (an explanation ending in `Relevance Label: n`, no stop
    marker)."""

    query: str
    document: str
    target: str


def target_text(record_text: str, label: int, prompt: RelevancePrompt = INTERANK_PROMPT) -> str:
    """The teacher's answer normalised to end with `Relevance Label: n` (the label line is rewritten when the
    label was found by a keyword fallback)."""
    m = list(
        re.finditer(re.escape(prompt.label_prefix.rstrip(":")) + r"\s*:\s*\**\s*(\d+)", record_text, re.I)
    )
    if m and int(m[-1].group(1)) == label and prompt.label_separator == " ":
        return record_text[: m[-1].end()].rstrip()
    head = record_text[: m[-1].start()] if m else record_text
    target = prompt.completion(
        head, label
    )  # rewritten in the prompt's format (release: label on its own line)
    return target[: len(target) - len(prompt.stop)]


def distill_examples(
    records: Iterable[TeacherRecord],
    pairs: Mapping[tuple[str, str], Pair],
    prompt: RelevancePrompt = INTERANK_PROMPT,
) -> tuple[list[DistillExample], dict[str, int]]:
    """Teacher records -> SFT examples; records without a label or without their pair are counted, not
    used."""
    out: list[DistillExample] = []
    counts = {"used": 0, "no_label": 0, "no_pair": 0}
    for rec in records:
        if rec.label is None:
            counts["no_label"] += 1
            continue
        pair = pairs.get((rec.qid, rec.docid))
        if pair is None:
            counts["no_pair"] += 1
            continue
        out.append(DistillExample(pair.query, pair.document, target_text(rec.text, rec.label, prompt)))
        counts["used"] += 1
    return out, counts


@dataclass
class TrainResult:
    model: object
    final_dir: Path
    stats: dict[str, float] = field(default_factory=dict)


def tokenize_examples(
    tokenizer,
    examples: Sequence[DistillExample],
    prompt: RelevancePrompt,
    completion_only: bool,
    max_length: int | None,
    weights: Sequence[float] | None = None,
    fit_documents: bool = False,
) -> tuple[list[Example], int]:
    """Encode (prompt messages, target + stop) pairs; returns the examples and how many were too long.

    Args:
        fit_documents: an example over `max_length` keeps its document cut (at a token boundary) to fit,
            instead of being dropped; it is still counted as too long. One whose prompt and answer alone
            exceed `max_length` is dropped.
    """
    encoded: list[Example] = []
    too_long = 0
    for i, ex in enumerate(examples):
        weight = 1.0 if weights is None else weights[i]
        e = encode_example(
            tokenizer,
            prompt.messages(ex.query, ex.document),
            ex.target + prompt.stop,
            completion_only=completion_only,
            max_length=max_length,
            weight=weight,
        )
        if e is None:
            too_long += 1
            if fit_documents and max_length is not None:
                e = _fit_document(tokenizer, ex, prompt, completion_only, max_length, weight)
        if e is not None:
            encoded.append(e)
    return encoded, too_long


def _fit_document(
    tokenizer,
    ex: DistillExample,
    prompt: RelevancePrompt,
    completion_only: bool,
    max_length: int,
    weight: float,
) -> Example | None:
    """`ex` with its document cut to the longest token prefix whose example fits `max_length` (None if no
    prefix fits)."""

    def encode(document: str) -> Example:
        return encode_example(
            tokenizer,
            prompt.messages(ex.query, document),
            ex.target + prompt.stop,
            completion_only=completion_only,
            max_length=None,
            weight=weight,
        )

    doc_ids = tokenizer(ex.document[: prompt.max_doc_chars], add_special_tokens=False)["input_ids"]
    empty = encode("")
    keep = max_length - len(empty.input_ids)  # document tokens that fit, up to re-tokenisation at the seams
    while keep > 0:
        e = encode(tokenizer.decode(doc_ids[:keep]))
        if len(e.input_ids) <= max_length:
            return e
        keep -= len(e.input_ids) - max_length
    return None


def sft(
    model,
    tokenizer,
    examples: Sequence[DistillExample],
    output_dir: str | os.PathLike,
    loop: LoopConfig | None = None,
    lora: LoraSpec | None = None,
    completion_only: bool = True,
    max_length: int | None = 2048,
    prompt: RelevancePrompt = INTERANK_PROMPT,
    progress: bool = True,
) -> TrainResult:
    """Supervised distillation of teacher answers into `model`.

    Args:
        model, tokenizer: the student (a transformers causal LM) and its tokenizer (with a chat template).
        examples: `DistillExample`s (see `distill_examples`).
        output_dir: checkpoints (`checkpoint/`, resumed when present) and the result (`final/`, safetensors).
        loop: optimisation settings (InteRank: lr 2e-4, 1 epoch, batch 1 x 16 accumulation).
        lora: None = full fine-tuning; a `LoraSpec` trains adapters (quantize="nf4": QLoRA).
        completion_only: learn only the answer tokens (True) or the whole sequence.
        max_length: longer examples are dropped and counted in stats["too_long"].
    """
    loop = loop or LoopConfig()
    encoded, too_long = tokenize_examples(tokenizer, examples, prompt, completion_only, max_length)
    if lora is not None:
        model = apply_lora(model, lora)
    stats = train_loop(model, encoded, tokenizer.pad_token_id, output_dir, loop, progress=progress)
    stats.update(examples=float(len(encoded)), too_long=float(too_long))
    final = save_model(model, tokenizer, output_dir)
    return TrainResult(model, final, stats)
