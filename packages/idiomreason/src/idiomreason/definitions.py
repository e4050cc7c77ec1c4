"""Definitions for the chain-of-thought-with-definition condition: from a user file, or from a first pass in
which a model defines each expression. Generated definitions are kept (raw output included) in an
append-only store, so definition quality can be analysed against the predictions made with them."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from idiomreason.backends.base import Backend
from idiomreason.examples import Example
from idiomreason.parsing import answer_region, output_prefix
from idiomreason.prompts import PromptTemplate, build_prompt, normalise_expression
from idiomreason.store import JsonlStore
from idiomreason.textfile import read_text
from shared_kernels.textfiles import json_lines

MAX_DEFINITION_CHARS = 600


_DEFINITION_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv")


def load_definitions(path: str | Path, model: str | None = None) -> dict[str, str]:
    """expression -> definition from `.json` (an object, or a list of {expression, definition}), `.jsonl`
    (one {expression, definition} per line), `.csv` or `.tsv` (columns expression, definition).
    Expressions are normalised (lower case, single spaces). `model` reads a run's stored definitions
    (`definitions.jsonl`): only that model's records, those without a definition left out."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _DEFINITION_SUFFIXES:
        raise ValueError(f"definitions file must be .json, .jsonl, .csv or .tsv, got {path.name!r}")
    if suffix == ".json":
        pairs = _json_pairs(path, read_text(path))
    elif suffix in (".jsonl", ".ndjson"):
        pairs = _jsonl_pairs(path, model)
    else:
        pairs = _table_pairs(path, read_text(path), delimiter="\t" if suffix == ".tsv" else ",")
    if model is not None and suffix not in (".jsonl", ".ndjson"):
        raise ValueError(f"{path}: a model's stored definitions are read from a run's definitions.jsonl")
    if not pairs:
        raise ValueError(f"{path}: no definitions" + (f" by model {model!r}" if model is not None else ""))
    return _normalised_definitions(path, pairs)


def _json_pairs(path: Path, text: str) -> list[tuple[Any, Any]]:
    """(expression, definition) pairs of a `.json` file: an object, or a list of {expression, definition}."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict):
        return list(data.items())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected an object or a list, got {type(data).__name__}")
    pairs = []
    for i, d in enumerate(data):
        if not isinstance(d, dict) or "expression" not in d or "definition" not in d:
            raise ValueError(f"{path}: item {i} needs 'expression' and 'definition' fields")
        pairs.append((d["expression"], d["definition"]))
    return pairs


def _jsonl_pairs(path: Path, model: str | None) -> list[tuple[Any, Any]]:
    """(expression, definition) pairs of a `.jsonl` file; with `model`, only that model's records that
    hold a definition (a run's `definitions.jsonl` stores failures as `definition: null`)."""
    pairs = []
    for line_no, _, obj, why in json_lines(path):
        if obj is None:
            raise ValueError(f"{path}:{line_no}: {why}")
        if "expression" not in obj or "definition" not in obj:
            raise ValueError(f"{path}:{line_no}: needs 'expression' and 'definition' fields")
        if model is not None and (obj.get("model") != model or not obj["definition"]):
            continue
        pairs.append((obj["expression"], obj["definition"]))
    return pairs


def _table_pairs(path: Path, text: str, delimiter: str) -> list[tuple[Any, Any]]:
    """(expression, definition) pairs of a CSV/TSV file with columns expression and definition."""
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not {"expression", "definition"} <= set(reader.fieldnames or []):
        raise ValueError(f"{path}: needs columns 'expression' and 'definition', has {reader.fieldnames}")
    pairs = []
    for row in reader:
        if row["expression"] is None or row["definition"] is None:
            raise ValueError(f"{path}:{reader.line_num}: expected columns {reader.fieldnames}")
        pairs.append((row["expression"], row["definition"]))
    return pairs


def _normalised_definitions(path: Path, pairs: list[tuple[Any, Any]]) -> dict[str, str]:
    out = {}
    for expression, definition in pairs:
        if not str(definition).strip():
            raise ValueError(f"{path}: empty definition for {expression!r}")
        out[normalise_expression(str(expression))] = str(definition).strip()
    return out


def definition_from_output(text: str) -> str | None:
    """The definition in a model's answer: after any think block, first non-empty paragraph, without a
    leading "Definition:" or quotes, at most MAX_DEFINITION_CHARS. None if there is no answer."""
    region = answer_region(text)
    if region is None:
        return None
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", region) if p.strip()]
    if not paragraphs:
        return None
    first = re.sub(
        r"^(?:\*\*)?(?:definition|meaning|definição|definicion)\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*",
        "",
        paragraphs[0],
        flags=re.IGNORECASE,
    )
    first = first.strip().strip('"\u201c\u201d').strip()
    return first[:MAX_DEFINITION_CHARS] or None


def missing_definitions(examples: Sequence[Example], definitions: dict[str, str]) -> list[str]:
    return sorted({normalise_expression(ex.expression) for ex in examples} - set(definitions))


def generate_definitions(
    examples: Sequence[Example],
    backend: Backend,
    store: JsonlStore,
    *,
    model: str,
    template: PromptTemplate,
    reasoning: bool,
    max_new_tokens: int,
    progress: bool = True,
) -> dict[str, str]:
    """Ask `backend` to define every expression of `examples` not yet in `store`; return
    normalised expression -> definition for all of them that produced one (failures are stored with
    `definition: null` and left out, so the caller can report them)."""
    template_key = f"{template.name}.v{template.version}"
    first: dict[str, Example] = {}
    for ex in examples:
        first.setdefault(normalise_expression(ex.expression), ex)
    todo = [e for e in sorted(first) if (model, template_key, e) not in store]
    prompts = [build_prompt(template, first[e], reasoning=reasoning) for e in todo]
    bar = tqdm(total=len(first), initial=len(first) - len(todo), desc=f"define {model}", disable=not progress)
    for index, generation in backend.generate(prompts, max_new_tokens):
        expression = todo[index]
        prefix = output_prefix(prompts[index].prefill, reasoning, generation.text)
        text = prefix + generation.text
        record: dict[str, Any] = {
            "model": model, "template": template_key, "expression": expression,
            "language": first[expression].language, "prefix": prefix, "output": generation.text,
            "definition": definition_from_output(text), "n_tokens": generation.n_tokens,
            "finish_reason": generation.finish_reason,
        }  # fmt: skip
        store.append([record])
        bar.update(1)
    bar.close()
    out = {}
    for expression in first:
        stored = store.get((model, template_key, expression))
        if stored is not None and stored["definition"]:
            out[expression] = stored["definition"]
    return out
