"""Training the label read after a given explanation: the loss on the label token alone, pointwise or
listwise.

`rerankdistill.rerank.TeacherForcedJudge` scores a pair in one forward pass: the prompt, a label-free
explanation (e.g. `rerankdistill.evidence`, or none) and `Relevance Label:` are fed, and E[label] is read from
the probabilities of the label tokens ` 0`, ` 1`, ` 2` renormalised over those three. Distilling the whole
answer spends most of the NLL on the explanation's tokens, which the judge never generates; here the student
is trained on exactly what the judge reads:

  * the input is the judge's context, token for token (`encode_label_example`, `label_context`);
  * `pointwise_label_loss`: cross-entropy of the teacher's label over the three label logits;
  * `listwise_label_loss`: the candidates of one query form a group; the score of a candidate is the log-odds
    of the judge's E[label] / 2 (`relevance_log_odds`, a monotone function of E[label], so it orders the
    candidates exactly as the judge does) over a temperature, and the loss is the cross-entropy between the
    softmax of the scores over the group and the target distribution proportional to 2^label - 1 (ListNet's
    top-one form, Cao et al. 2007). It trains the order of a query's candidates, which is what nDCG measures.
    E[label] itself saturates: once every candidate's label probabilities sit at one end, scores in [0, 2]
    stop moving and the gradient vanishes (measured: training collapsed to the uniform loss ln 4 within 60
    steps at lr 5e-3); the log-odds does not saturate.
  * `pointwise+listwise`: their sum: the listwise term orders, the pointwise term keeps E[label] calibrated
    (the fusion with BM25 reads its scale).

`group_window` yields one query's candidates per micro batch, so both losses see the same forwards.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rerankdistill.labels import LABEL_PREFIX, RelevancePrompt

LABELS = (0, 1, 2)
LOSSES = ("pointwise", "listwise", "pointwise+listwise")


@dataclass(frozen=True)
class LabelExample:
    """One pair as the judge sees it. input_ids: prompt + explanation + label prefix, (T,); label: 0..2;
    group: the query it belongs to (the listwise loss's group)."""

    input_ids: list[int]
    label: int
    group: str


def label_context(explanation: str, prefix: str = LABEL_PREFIX) -> str:
    """The explanation cut just after its last label prefix (the prefix appended when it has none)."""
    matches = list(re.finditer(re.escape(prefix.rstrip(":")) + r"\s*:", explanation, re.I))
    if matches:
        return explanation[: matches[-1].start()] + prefix
    return explanation.rstrip() + " " + prefix


def label_token_ids(tokenizer: Any, labels: Sequence[int] = LABELS) -> list[int]:
    """The token id of ` n` for each label; each must be a single token (as the one-pass judge reads it)."""
    ids = [tokenizer(f" {label}", add_special_tokens=False)["input_ids"] for label in labels]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"each label must be one token of the tokenizer, got {dict(zip(labels, ids))}")
    return [i[0] for i in ids]


def encode_label_example(
    tokenizer: Any,
    prompt: RelevancePrompt,
    query: str,
    document: str,
    explanation: str,
    label: int,
    group: str,
    max_length: int,
) -> LabelExample | None:
    """The judge's context for (query, document, explanation), its document cut to fit `max_length` tokens
    (None when even an empty document does not fit). The explanation is given whole (computed from the whole
    document, as the judge computes it)."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    tail = label_context(explanation, prompt.label_prefix)

    def encode(doc: str) -> list[int]:
        text = tokenizer.apply_chat_template(
            prompt.messages(query, doc), add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text + tail, add_special_tokens=False)["input_ids"])

    ids = encode(document[: prompt.max_doc_chars])
    if len(ids) <= max_length:
        return LabelExample(ids, label, group)
    doc_ids = tokenizer(document[: prompt.max_doc_chars], add_special_tokens=False)["input_ids"]
    keep = max_length - len(encode(""))  # document tokens that fit, up to re-tokenisation at the seams
    while keep > 0:
        ids = encode(tokenizer.decode(doc_ids[:keep]))
        if len(ids) <= max_length:
            return LabelExample(ids, label, group)
        keep -= len(ids) - max_length
    return None


def label_examples(
    tokenizer: Any,
    prompt: RelevancePrompt,
    pairs: Sequence[Any],
    labels: Mapping[tuple[str, str], int],
    explain: Callable[[str, str], str],
    max_length: int,
) -> tuple[list[LabelExample], list[list[int]], int]:
    """`encode_label_example` for each pair that has a label, grouped by query.

    Args:
        pairs: objects with qid, docid, query, document (e.g. `rerankdistill.teacher.Pair`).
        labels: {(qid, docid): label} (the teacher's); pairs without one are skipped.
        explain: (query, document) -> the label-free explanation, exactly as the judge computes it.

    Returns:
        (examples, groups: each query's example indices in order of first appearance, how many did not fit)
    """
    examples: list[LabelExample] = []
    groups: dict[str, list[int]] = {}
    dropped = 0
    for p in pairs:
        label = labels.get((p.qid, p.docid))
        if label is None:
            continue
        explanation = explain(p.query, p.document)
        ex = encode_label_example(
            tokenizer, prompt, p.query, p.document, explanation, label, p.qid, max_length
        )
        if ex is None:
            dropped += 1
            continue
        groups.setdefault(p.qid, []).append(len(examples))
        examples.append(ex)
    return examples, list(groups.values()), dropped


def label_logits(
    model: Any, examples: Sequence[LabelExample], pad_id: int, label_ids: Sequence[int], device: Any
) -> torch.Tensor:
    """The logits of the label tokens at each example's last position: (B, len(label_ids)) float32."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
    last = mask.sum(1).to(logits.device) - 1  # (B,)
    rows = logits[torch.arange(len(examples), device=logits.device), last]  # (B, V)
    return rows[:, list(label_ids)].float()


def pointwise_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `labels` (B,) under the label logits (B, 3)."""
    return torch.nn.functional.cross_entropy(logits, labels)


def expected_label(logits: torch.Tensor) -> torch.Tensor:
    """E[label] under the softmax of the label logits (B, 3) -> (B,), the judge's score."""
    values = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return (logits.softmax(-1) * values).sum(-1)


def relevance_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """log(E / (2 - E)) for E = E[label] over labels 0, 1, 2 (B, 3) -> (B,), computed from the logits without
    forming E: E / 2 = p2 + p1 / 2 and 1 - E / 2 = p0 + p1 / 2. Monotone in E[label] and unbounded (about
    l2 - l0 when p1 is small), so it never saturates."""
    if logits.shape[-1] != 3:
        raise ValueError(
            f"relevance_log_odds needs the logits of labels 0, 1, 2 (..., 3), got {logits.shape}"
        )
    half = logits[..., 1] - math.log(2.0)
    up = torch.logaddexp(half, logits[..., 2])
    down = torch.logaddexp(logits[..., 0], half)
    return up - down


def listwise_label_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ListNet cross-entropy over one query's candidates: scores `relevance_log_odds` / temperature (B,),
    targets proportional to 2^label - 1. A group without a positive label has no order to learn: loss 0
    (with a graph, so accumulation still works)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    gains = 2.0 ** labels.to(logits.dtype) - 1.0
    if float(gains.sum()) <= 0:
        return logits.sum() * 0.0
    log_p = (relevance_log_odds(logits) / temperature).log_softmax(-1)
    return -(gains / gains.sum() * log_p).sum()


def group_window(
    groups: Sequence[Sequence[int]], steps: int, groups_per_step: int, seed: int
) -> Callable[[int], list[list[int]]]:
    """step -> that step's micro batches, one group (a query's candidate indices) each: the groups shuffled
    per epoch by `seed`, `groups_per_step` per step; a pure function of (seed, step), so a resumed run sees
    the same batches."""
    if not groups or groups_per_step < 1:
        raise ValueError(f"need >= 1 group and groups_per_step >= 1, got {len(groups)}, {groups_per_step}")
    order: list[int] = []
    epoch = 0
    while len(order) < steps * groups_per_step:
        idx = list(range(len(groups)))
        random.Random(seed * 1000 + epoch).shuffle(idx)
        order += idx
        epoch += 1

    def window(step: int) -> list[list[int]]:
        return [list(groups[g]) for g in order[step * groups_per_step : (step + 1) * groups_per_step]]

    return window


def label_loss_fn(
    examples: Sequence[LabelExample],
    kind: str,
    pad_id: int,
    label_ids: Sequence[int],
    device: Any,
    temperature: float = 1.0,
) -> Callable[[Any, list[int]], torch.Tensor]:
    """(model, micro batch of example indices) -> its loss: "pointwise", "listwise" or "pointwise+listwise"
    (see above)."""
    if kind not in LOSSES:
        raise ValueError(f"kind must be one of {LOSSES}, got {kind!r}")

    def loss_fn(model: Any, micro: list[int]) -> torch.Tensor:
        batch = [examples[i] for i in micro]
        logits = label_logits(model, batch, pad_id, label_ids, device)
        labels = torch.tensor([e.label for e in batch], device=logits.device)
        if kind == "pointwise":
            return pointwise_label_loss(logits, labels)
        if kind == "listwise":
            return listwise_label_loss(logits, labels, temperature)
        return pointwise_label_loss(logits, labels) + listwise_label_loss(logits, labels, temperature)

    return loss_fn
