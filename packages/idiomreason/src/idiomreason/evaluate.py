"""Predict the examples of one (model, condition, dataset) job into the prediction cache, skipping those
already there, one durable record per finished example.

Cache key (`store.PREDICTION_KEY`): model, condition, dataset, example id, `generation` (a hash of
everything about the model and decoding that can change an output: model path and revision, backend and
its output-changing options, sampling settings, number of samples, `max_new_tokens`, scoring mode) and
`prompt` (a hash of the prompt as sent: template wording, shots, the definition in it). Changing any of them
is a cache miss; an unchanged re-run is all hits. Records keep the raw outputs, so reports re-parse them
with the current parser (`relabel`) instead of trusting the label parsed at generation time.

With `decoding.n_samples > 1` each prompt is generated n times (different seeds) and the label is the
majority vote of the parsed samples. With scoring "loglik" nothing is generated: the label is the one whose
answer (`template.shot_answer`, e.g. "Answer: idiomatic") has the higher log-likelihood after the prompt,
for base models (the backend must provide `loglikelihood`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from idiomreason.backends.base import Backend
from idiomreason.decoding import Decoding, fingerprint, majority_vote, prompt_fingerprint
from idiomreason.examples import LABELS, Example
from idiomreason.parsing import extract_label, output_prefix, split_reasoning
from idiomreason.prompts import Condition, Prompt, build_prompt
from idiomreason.store import JsonlStore

SCORING_MODES = ("generate", "loglik")


def reasoning_words(text: str) -> int:
    """Length of the model's reasoning in whitespace words: its think block, or its whole output when it
    has none (a chain of thought without tags)."""
    reasoning, answer = split_reasoning(text)
    return len((reasoning if ("<think>" in text or "</think>" in text) else answer).split())


def relabel(record: dict[str, Any]) -> str | None:
    """The label of a stored record under the current parser: log-likelihood records by their scores,
    generated ones by parsing each stored sample (prefix + raw output) and voting."""
    if record.get("scores"):
        scores = record["scores"]
        return max(LABELS, key=lambda label: scores[label])
    samples = record.get("samples") or [{"prefix": record.get("prefix", ""), "output": record["output"]}]
    return majority_vote([extract_label(s["prefix"] + s["output"]) for s in samples])


def job_prompts(
    examples: Sequence[Example],
    condition: Condition,
    shot_pool: Sequence[Example],
    definitions: dict[str, str] | None,
    reasoning: bool,
) -> list[Prompt]:
    return [build_prompt(condition.template, ex, condition.shots_for(ex, shot_pool), definitions, reasoning)
            for ex in examples]  # fmt: skip


def record_key(
    model: str, condition: Condition, dataset: str, example: Example, generation: str, prompt: Prompt
) -> tuple[str, ...]:
    return (model, condition.key, dataset, example.id, generation, prompt_fingerprint(prompt))


def generation_settings(
    generation: dict[str, Any], max_new_tokens: int, decoding: Decoding, scoring: str
) -> dict[str, Any]:
    """Everything that can change a model's output for a given prompt (the `generation` part of the key)."""
    return {
        **generation,
        "max_new_tokens": max_new_tokens,
        "decoding": decoding.settings(),
        "scoring": scoring,
    }


def generation_fingerprint(settings: dict[str, Any]) -> str:
    return fingerprint(settings)


def pending(
    examples: Sequence[Example],
    store: JsonlStore,
    model: str,
    condition: Condition,
    dataset: str,
    prompts: Sequence[Prompt],
    generation: str,
) -> list[int]:
    """Indices of the examples with no record under the current key."""
    return [i for i, (ex, p) in enumerate(zip(examples, prompts))
            if record_key(model, condition, dataset, ex, generation, p) not in store]  # fmt: skip


def predict(
    examples: Sequence[Example],
    backend: Backend,
    store: JsonlStore,
    *,
    model: str,
    condition: Condition,
    dataset: str,
    generation: dict[str, Any],
    reasoning: bool = False,
    shot_pool: Sequence[Example] = (),
    definitions: dict[str, str] | None = None,
    max_new_tokens: int = 4096,
    decoding: Decoding | None = None,
    scoring: str = "generate",
    chunk_size: int = 64,
    progress: bool = True,
) -> int:
    """Generate (or score) and store predictions for the examples not yet in `store`; returns how many
    were added.

    Args:
        examples: the job's examples.
        store: the prediction cache (`store.prediction_store`), keyed as the module docstring says.
        model / dataset: the names used in the cache keys and tables.
        condition: template + shots (`TemplateLibrary.condition`).
        generation: the model's output-changing settings (hashed into the key; `max_new_tokens`,
            `decoding` and `scoring` are added here).
        reasoning: the model is R1-style (prefill the direct condition's empty think block; parse a
            missing opening tag as opened by the chat template).
        shot_pool: labelled examples for few-shot prompts, ordered by `prompts.order_shot_pool`.
        definitions: normalised expression -> definition, for conditions that need one.
        decoding: sampling settings the backend was built with (default greedy); `n_samples` per prompt.
        scoring: "generate" or "loglik" (see the module docstring).
        chunk_size: examples handed to the backend at a time (bounds the work a crash can lose).
    """
    decoding = decoding or Decoding()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring must be one of {SCORING_MODES}, got {scoring!r}")
    if scoring == "loglik" and not hasattr(backend, "loglikelihood"):
        raise ValueError(
            f"model {model!r}: scoring 'loglik' needs a backend with loglikelihood (transformers)"
        )
    settings = generation_settings(generation, max_new_tokens, decoding, scoring)
    gen_key = generation_fingerprint(settings)
    prompts = job_prompts(examples, condition, shot_pool, definitions, reasoning)
    todo = pending(examples, store, model, condition, dataset, prompts, gen_key)
    bar = tqdm(
        total=len(examples),
        initial=len(examples) - len(todo),
        disable=not progress,
        desc=f"{model} | {condition.label} | {dataset}",
    )
    added = 0
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        if scoring == "loglik":
            finished = _score(backend, [prompts[i] for i in chunk], condition)
        else:
            finished = _generate(backend, [prompts[i] for i in chunk], decoding, reasoning, max_new_tokens)
        for j, record in finished:  # stored as each finishes: a crash loses only unfinished examples
            i = chunk[j]
            ex, prompt = examples[i], prompts[i]
            record.update({
                "model": model, "condition": condition.key, "dataset": dataset, "example_id": ex.id,
                "generation": gen_key, "prompt": prompt_fingerprint(prompt), "generation_settings": settings,
                "decoding_source": decoding.source, "language": ex.language, "expression": ex.expression,
                "gold": ex.label, "max_new_tokens": max_new_tokens,
            })  # fmt: skip
            added += store.append([record])
            bar.update(1)
    bar.close()
    return added


def _generate(
    backend: Backend, prompts: list[Prompt], decoding: Decoding, reasoning: bool, max_new_tokens: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(prompt index, record body) as soon as all n samples of a prompt are in: the samples, each parsed,
    and their majority vote."""
    n = decoding.n_samples
    # Sample s of every prompt carries seed offset s, so backends that seed per request (HTTP, vLLM) draw
    # n different samples; transformers draws them from one random stream.
    requests = [replace(p, seed_offset=s) for p in prompts for s in range(n)]
    samples: dict[int, dict[str, Any]] = {}  # request index -> parsed sample, until its prompt is complete
    missing = [n] * len(prompts)
    for index, generation in backend.generate(requests, max_new_tokens):
        prefix = output_prefix(requests[index].prefill, reasoning, generation.text)
        samples[index] = {"prefix": prefix, "output": generation.text, "n_tokens": generation.n_tokens,
                          "finish_reason": generation.finish_reason,
                          "prediction": extract_label(prefix + generation.text)}  # fmt: skip
        j = index // n
        missing[j] -= 1
        if missing[j]:
            continue
        mine = [samples.pop(i) for i in range(j * n, (j + 1) * n)]
        first = mine[0]
        record = {
            "prediction": majority_vote([s["prediction"] for s in mine]), "prefix": first["prefix"],
            "output": first["output"], "n_tokens": first["n_tokens"], "finish_reason": first["finish_reason"],
            "reasoning_words": reasoning_words(first["prefix"] + first["output"]),
        }  # fmt: skip
        if n > 1:
            record["samples"] = mine
        yield j, record


def _score(backend: Any, prompts: list[Prompt], condition: Condition) -> Iterator[tuple[int, dict[str, Any]]]:
    """One record body per prompt: log-likelihood of each label's answer text after the prompt."""
    answer = condition.template.shot_answer
    head, sep, _ = answer.partition("{label}")
    if not sep:
        raise ValueError(f"template {condition.template.name!r}: shot_answer has no {{label}} to score")
    # The answer's fixed part ("Answer:") goes into the context; each label (with its leading space) is the
    # continuation whose tokens are scored.
    context_tail, space = head.rstrip(), head[len(head.rstrip()) :]
    contexts = [replace(p, prefill=p.prefill + context_tail) for p in prompts]
    scores = backend.loglikelihood(contexts, [space + label for label in LABELS])  # (n_prompts, n_labels)
    for j, row in enumerate(scores):
        by_label = dict(zip(LABELS, (float(x) for x in row)))
        prediction = max(LABELS, key=lambda label: by_label[label])
        yield j, {"prediction": prediction, "scores": by_label, "prefix": "", "output": "", "n_tokens": 0,
                  "finish_reason": "loglik", "reasoning_words": 0}  # fmt: skip
