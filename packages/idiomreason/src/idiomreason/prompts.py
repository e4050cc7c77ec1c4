"""Prompt conditions as versioned templates (YAML data in `idiomreason/templates/`), and prompt building.

A template has `name`, `version`, `user` (a `str.format` text with `{expression}`, `{context}`,
`{definition}`, `{language_name}`), an optional `system`, `reasoning_prefill` (assistant text prefilled for
reasoning models only: the empty think block of the direct condition) and `shot_answer` (the assistant turn
of a few-shot example, `{label}` filled in). Changing a template's wording means bumping its version: the
version is part of the condition key that prediction caches are keyed by.

A condition is a template plus a number of shots, written `"cot"` or `"cot:3shot"`; its key is
`"cot.v1.3shot"`. Few-shot examples are chat turns (user prompt, assistant `Answer: <label>`) before the
query, balanced between the labels, never the query itself nor the same expression.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from idiomreason.examples import LABELS, Example
from idiomreason.textfile import load_yaml

LANGUAGE_NAMES = {"en": "English", "pt": "Portuguese", "gl": "Galician", "es": "Spanish"}
BUILTIN_TEMPLATES = ("direct", "cot", "cot_definition", "define")
_TEMPLATE_KEYS = {
    "name",
    "version",
    "needs_definition",
    "system",
    "user",
    "reasoning_prefill",
    "shot_answer",
    "shot_rationale_idiomatic",
    "shot_rationale_literal",
}


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: int
    user: str
    system: str = ""
    reasoning_prefill: str = ""
    shot_answer: str = "Answer: {label}"
    needs_definition: bool = False
    # The reasoning a chain-of-thought shot shows before its answer (`{rationale}` in shot_answer), per gold
    # label, formatted with {expression} and {definition}; a shot example's own `source["rationale"]` wins.
    shot_rationale_idiomatic: str = ""
    shot_rationale_literal: str = ""

    @classmethod
    def from_yaml(cls, path: str | Path) -> PromptTemplate:
        return cls.from_dict(load_yaml(path), where=str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "template") -> PromptTemplate:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a template must be a mapping, got {type(data).__name__}")
        unknown = set(data) - _TEMPLATE_KEYS
        missing = {"name", "version", "user"} - set(data)
        if unknown or missing:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        if not isinstance(data["version"], int) or isinstance(data["version"], bool) or data["version"] < 1:
            raise ValueError(f"{where}: version must be a positive integer, got {data['version']!r}")
        if not isinstance(data.get("needs_definition", False), bool):
            raise ValueError(
                f"{where}: needs_definition must be true or false, got {data['needs_definition']!r}"
            )
        for key in (
            "name",
            "system",
            "user",
            "reasoning_prefill",
            "shot_answer",
            "shot_rationale_idiomatic",
            "shot_rationale_literal",
        ):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"{where}: {key} must be a string, got {type(data[key]).__name__}")
        fields: dict[str, Any] = {k: (v if v is not None else "") for k, v in data.items()}
        template = cls(**fields)
        try:  # a placeholder the prompt builder does not fill fails here, not at the first prompt
            template.user.format(expression="", context="", definition="", language_name="")
            template.shot_answer.format(label="", rationale="")
            for text in (template.shot_rationale_idiomatic, template.shot_rationale_literal):
                text.format(expression="", definition="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"{where}: bad placeholder in the template text ({type(e).__name__}: {e}); "
                "known: {expression} {context} {definition} {language_name}, {label} {rationale} "
                "in shot_answer"
            ) from None
        return template


@dataclass(frozen=True)
class Prompt:
    """Chat messages for one query, plus assistant text to prefill (continued by the model, not re-opened)."""

    messages: list[dict[str, str]]
    prefill: str = ""
    seed_offset: int = 0  # sample index when a prompt is sampled n times (added to per-request seeds)


@dataclass(frozen=True)
class Condition:
    """A template plus its shots: `shots` examples of other expressions, or (`one_shot`) SemEval-2022 Task
    2's one-shot setting, the training examples of the query's own expression."""

    template: PromptTemplate
    shots: int = 0
    one_shot: bool = False

    @property
    def key(self) -> str:
        shots = "oneshot" if self.one_shot else f"{self.shots}shot"
        return f"{self.template.name}.v{self.template.version}.{shots}"

    @property
    def label(self) -> str:
        if self.one_shot:
            return f"{self.template.name}:oneshot"
        return self.template.name if self.shots == 0 else f"{self.template.name}:{self.shots}shot"

    @property
    def setting(self) -> str:
        """SemEval's name for it: "one_shot" with examples of the query's expression, else "zero_shot"."""
        return "one_shot" if self.one_shot else "zero_shot"

    @property
    def needs_shots(self) -> bool:
        return self.one_shot or self.shots > 0

    def shots_for(self, example: Example, ordered_pool: Sequence[Example]) -> list[Example]:
        if self.one_shot:
            from idiomreason.semeval import one_shot_examples

            return one_shot_examples(example, ordered_pool)
        return shots_for(example, ordered_pool, self.shots)


@dataclass
class TemplateLibrary:
    """Built-in templates, overridden or extended by `*.yaml` files from `extra_dir`."""

    extra_dir: str | Path | None = None
    _cache: dict[str, PromptTemplate] = field(default_factory=dict)

    def get(self, name: str) -> PromptTemplate:
        if name not in self._cache:
            user_file = Path(self.extra_dir) / f"{name}.yaml" if self.extra_dir else None
            if user_file is not None and user_file.is_file():
                self._cache[name] = PromptTemplate.from_yaml(user_file)
            elif name in BUILTIN_TEMPLATES:
                text = resources.files("idiomreason").joinpath(f"templates/{name}.yaml").read_text("utf-8")
                self._cache[name] = PromptTemplate.from_dict(
                    yaml.safe_load(text), where=f"templates/{name}.yaml"
                )
            else:
                raise ValueError(
                    f"unknown template {name!r}: built-in ones are {BUILTIN_TEMPLATES}"
                    + (f", or put {name}.yaml in {self.extra_dir}" if self.extra_dir else "")
                )
        return self._cache[name]

    def condition(self, spec: str) -> Condition:
        """Parse `"cot"`, `"cot:3shot"` (3 shots of other expressions) or `"cot:oneshot"` (SemEval's one-shot
        setting: the training examples of the query's own expression)."""
        m = re.fullmatch(r"([A-Za-z0-9_\-]+)(?::(?:(\d+)shot|(oneshot)))?", spec.strip())
        if m is None:
            raise ValueError(f"condition must look like 'cot', 'cot:3shot' or 'cot:oneshot', got {spec!r}")
        return Condition(self.get(m.group(1)), int(m.group(2) or 0), one_shot=m.group(3) is not None)


def get_template(name: str) -> PromptTemplate:
    """A built-in template by name ("direct", "cot", "cot_definition", "define")."""
    return TemplateLibrary().get(name)


def format_context(example: Example) -> str:
    parts = []
    if example.previous:
        parts.append(f"Previous sentence: {example.previous}")
    parts.append(f"Sentence: {example.target}")
    if example.next:
        parts.append(f"Next sentence: {example.next}")
    return "\n".join(parts)


def _user_text(template: PromptTemplate, example: Example, definition: str | None) -> str:
    if template.needs_definition and definition is None:
        raise ValueError(f"template {template.name!r} needs a definition for {example.expression!r}")
    return template.user.format(
        expression=example.expression, context=format_context(example), definition=definition or "",
        language_name=LANGUAGE_NAMES.get(example.language, example.language),
    )  # fmt: skip


def build_prompt(
    template: PromptTemplate,
    example: Example,
    shots: Sequence[Example] = (),
    definitions: dict[str, str] | None = None,
    reasoning: bool = False,
) -> Prompt:
    """The chat prompt of `example` under `template`.

    Args:
        shots: labelled examples shown first as (user, assistant) turns.
        definitions: normalised expression -> definition (needed when `template.needs_definition`).
        reasoning: the model is R1-style: prefill `template.reasoning_prefill` (the empty think block).
    """
    messages: list[dict[str, str]] = []
    if template.system:
        messages.append({"role": "system", "content": template.system})

    def definition_of(ex: Example) -> str | None:
        if not template.needs_definition:
            return None
        return (definitions or {}).get(normalise_expression(ex.expression))

    for shot in shots:
        if shot.label is None:
            raise ValueError(f"few-shot example {shot.id!r} has no label")
        messages.append({"role": "user", "content": _user_text(template, shot, definition_of(shot))})
        answer = template.shot_answer.format(
            label=shot.label, rationale=shot_rationale(template, shot, definition_of(shot))
        )
        messages.append({"role": "assistant", "content": answer.strip()})
    messages.append({"role": "user", "content": _user_text(template, example, definition_of(example))})
    return Prompt(messages=messages, prefill=template.reasoning_prefill if reasoning else "")


def shot_rationale(template: PromptTemplate, shot: Example, definition: str | None) -> str:
    """The reasoning shown in a few-shot answer: the example's own (`source["rationale"]`, e.g. from a file of
    annotated shots) or the template's text for its label."""
    own = shot.source.get("rationale") if isinstance(shot.source, dict) else None
    if isinstance(own, str) and own.strip():
        return own.strip()
    text = template.shot_rationale_idiomatic if shot.label == "idiomatic" else template.shot_rationale_literal
    return text.format(expression=shot.expression, definition=definition or "").strip()


def normalise_expression(expression: str) -> str:
    return " ".join(expression.lower().split())


def order_shot_pool(pool: Sequence[Example], seed: int = 0) -> list[Example]:
    """The pool shuffled (seeded) and interleaved idiomatic, literal, idiomatic, ... so that any prefix is
    balanced."""
    by_label = {label: [ex for ex in pool if ex.label == label] for label in LABELS}
    rng = random.Random(seed)
    for examples in by_label.values():
        rng.shuffle(examples)
    ordered = []
    for i in range(max(len(v) for v in by_label.values()) if pool else 0):
        ordered += [by_label[label][i] for label in LABELS if i < len(by_label[label])]
    return ordered


def shots_for(example: Example, ordered_pool: Sequence[Example], k: int) -> list[Example]:
    """The first `k` of the ordered pool that are not `example` and not the same expression."""
    if k == 0:
        return []
    expression = normalise_expression(example.expression)
    chosen = [
        ex for ex in ordered_pool if ex.id != example.id and normalise_expression(ex.expression) != expression
    ][:k]
    if len(chosen) < k:
        raise ValueError(
            f"the few-shot pool has only {len(chosen)} usable examples for {example.id!r}, need {k}"
        )
    return chosen


def render_plain(messages: Sequence[dict[str, str]], prefill: str = "") -> str:
    """A chat rendered as plain text, for base models whose tokenizer has no chat template."""
    parts = []
    for message in messages:
        role = message["role"]
        if role == "system":
            parts.append(message["content"])
        else:
            parts.append(f"{'User' if role == 'user' else 'Assistant'}: {message['content']}")
    parts.append(f"Assistant: {prefill}" if prefill else "Assistant:")
    return "\n\n".join(parts)


def join_prefill(rendered: str, prefill: str) -> str:
    """Append `prefill` to a rendered prompt, without repeating what the chat template already opened
    (R1 templates end the generation prompt with "<think>\\n"; the direct prefill starts with it)."""
    if prefill.startswith("<think>"):
        for overlap in range(min(len(rendered), len(prefill)), len("<think>") - 1, -1):
            if rendered.endswith(prefill[:overlap]):
                return rendered + prefill[overlap:]
    return rendered + prefill
