"""Predict the examples of one (model, condition, dataset) job into the prediction cache, skipping those
already there, one durable record per finished output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from idiomreason.backends.base import Backend
from idiomreason.examples import Example
from idiomreason.parsing import extract_label, output_prefix, split_reasoning
from idiomreason.prompts import Condition, build_prompt, shots_for
from idiomreason.store import JsonlStore


def reasoning_words(text: str) -> int:
    """Length of the model's reasoning in whitespace words: its think block, or its whole output when it
    has none (a chain of thought without tags)."""
    reasoning, answer = split_reasoning(text)
    return len((reasoning if ("<think>" in text or "</think>" in text) else answer).split())


def pending(
    examples: Sequence[Example], store: JsonlStore, model: str, condition: Condition, dataset: str
) -> list[Example]:
    return [ex for ex in examples if (model, condition.key, dataset, ex.id) not in store]


def predict(
    examples: Sequence[Example],
    backend: Backend,
    store: JsonlStore,
    *,
    model: str,
    condition: Condition,
    dataset: str,
    reasoning: bool = False,
    shot_pool: Sequence[Example] = (),
    definitions: dict[str, str] | None = None,
    max_new_tokens: int = 4096,
    chunk_size: int = 64,
    progress: bool = True,
) -> int:
    """Generate and store predictions for the examples not yet in `store`; returns how many were added.

    Args:
        examples: the job's examples.
        store: the prediction cache (`store.prediction_store`), keyed (model, condition key, dataset, id).
        model / dataset: the names used in the cache keys and tables.
        condition: template + shots (`TemplateLibrary.condition`).
        reasoning: the model is R1-style (prefill the direct condition's empty think block; parse a
            missing opening tag as opened by the chat template).
        shot_pool: labelled examples for few-shot prompts, ordered by `prompts.order_shot_pool`.
        definitions: normalised expression -> definition, for conditions that need one.
        chunk_size: prompts handed to the backend at a time (bounds the work a crash can lose to
            `chunk_size` unfinished prompts for batch backends).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    todo = pending(examples, store, model, condition, dataset)
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), disable=not progress,
               desc=f"{model} | {condition.label} | {dataset}")
    added = 0
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        prompts = [
            build_prompt(condition.template, ex, shots_for(ex, shot_pool, condition.shots), definitions, reasoning)
            for ex in chunk
        ]
        for index, generation in backend.generate(prompts, max_new_tokens):
            ex = chunk[index]
            prefix = output_prefix(prompts[index].prefill, reasoning, generation.text)
            text = prefix + generation.text
            record: dict[str, Any] = {
                "model": model, "condition": condition.key, "dataset": dataset, "example_id": ex.id,
                "language": ex.language, "expression": ex.expression, "gold": ex.label,
                "prediction": extract_label(text), "prefix": prefix, "output": generation.text,
                "n_tokens": generation.n_tokens, "finish_reason": generation.finish_reason,
                "reasoning_words": reasoning_words(text), "max_new_tokens": max_new_tokens,
            }  # fmt: skip
            added += store.append([record])
            bar.update(1)
    bar.close()
    return added
