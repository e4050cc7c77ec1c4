"""Dataset loaders, each normalising its source format to `Example`s.

- "semeval2022-2a": SemEval-2022 Task 2 subtask A CSVs. Train files carry `Label`; dev/eval files carry no
  label and are joined on `ID` with `<stem>_gold.csv` beside them. Label 0 = idiomatic, 1 = literal.
- "magpie": MAGPIE jsonl, either the original corpus (`idiom`, `context` = sentences with the target in the
  middle, `label` i/l/f/o/?, `split` training/development/test, `confidence`) or the filtered version on the
  hub (`idiom`, `sentence`, `usage` figurative/literal). Senses other than idiomatic/literal are excluded.
- "vnc-tokens": Cook et al.'s `cook_dataset.tok`, lines `I|L|Q||verb||noun||sentence`; Q (unknown) is
  excluded unless `include_unknown=True` (then label None).
- "generic": CSV/TSV/JSONL with a column mapping and a label mapping.
- "hf": anything `datasets` can load (hub name, local data folder, or a `save_to_disk` folder), with the
  same column/label mapping.

Line numbers in problems are 1-based physical lines of the file (for CSV, the line a record starts on).
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from idiomreason.examples import Example, Examples, OnError, RowSink
from idiomreason.textfile import read_text
from shared_kernels.textfiles import json_lines

SEMEVAL_LABELS = {"0": "idiomatic", "1": "literal"}
MAGPIE_LABELS = {"i": "idiomatic", "l": "literal", "figurative": "idiomatic", "literal": "literal"}
MAGPIE_OTHER_SENSES = {"f", "o", "?"}
MAGPIE_SPLITS = {"training": "train", "development": "dev", "test": "test", "train": "train", "dev": "dev"}
VNC_LABELS = {"I": "idiomatic", "L": "literal", "Q": None}
DEFAULT_LABEL_MAP = {
    "idiomatic": "idiomatic", "idiom": "idiomatic", "i": "idiomatic", "figurative": "idiomatic",
    "literal": "literal", "l": "literal", "non-idiomatic": "literal",
}  # fmt: skip
SCHEMA_FIELDS = ("id", "language", "expression", "previous", "target", "next", "label", "split")

csv.field_size_limit(max(csv.field_size_limit(), 1 << 28))  # SemEval contexts can be long paragraphs


class _BadRow(Exception):
    """Raised inside a loader for one row; turned into a RowProblem with the file and line."""


class _Excluded(Exception):
    """Raised for a row left out by design (its label maps to None); counted under its reason."""


def _csv_records(path: Path, delimiter: str = ",") -> Iterator[tuple[int, dict[str, str] | None, str]]:
    """Yield (start line, row dict or None, reason) for each non-blank record after the header. A file
    without a header, or with a header and no rows, is an error (not an empty dataset)."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path} is empty: expected a header line")
    header = [h.strip() for h in header]
    end = reader.line_num
    n_records = 0
    for row in reader:
        start, end = end + 1, reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        n_records += 1
        if len(row) != len(header):
            yield start, None, f"expected {len(header)} fields ({', '.join(header)}), got {len(row)}"
            continue
        yield start, dict(zip(header, row)), ""
    if n_records == 0:
        raise ValueError(f"{path} has a header line but no rows")


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    n_records = 0
    for line_no, _, obj, why in json_lines(path):
        n_records += 1
        yield line_no, obj, why
    if n_records == 0:
        raise ValueError(f"{path} has no records")


def _required(row: dict[str, Any], column: str) -> str:
    if column not in row or row[column] is None:
        raise _BadRow(f"missing column {column!r}")
    value = str(row[column]).strip()
    if not value:
        raise _BadRow(f"empty {column!r}")
    return value


# ----- SemEval-2022 Task 2 subtask A -----

SEMEVAL_SPLITS = ("train_zero_shot", "train_one_shot", "dev", "eval", "test")


def load_semeval2022_2a(
    path: str | Path,
    split: str | None = None,
    *,
    on_error: OnError = "raise",
    include_unlabelled: bool = False,
) -> Examples:
    """Load SemEval-2022 Task 2A CSVs from a folder (`split` picks `<split>.csv`; None loads every CSV but
    the gold files) or from one file (its stem is the split)."""
    path = Path(path)
    if path.is_dir():
        if split is not None:
            files = [path / f"{split}.csv"]
            if not files[0].is_file():
                present = sorted(p.stem for p in path.glob("*.csv") if not p.stem.endswith("_gold"))
                raise ValueError(f"split {split!r}: no {files[0].name} in {path} (present: {present})")
        else:
            files = sorted(p for p in path.glob("*.csv") if not p.stem.endswith("_gold"))
            if not files:
                raise ValueError(f"no SemEval CSV files in {path}")
    elif path.is_file():
        if split is not None and split != path.stem:
            raise ValueError(
                f"split {split!r} does not match the file {path.name} (its split is {path.stem!r})"
            )
        files = [path]
    else:
        raise FileNotFoundError(f"path {str(path)!r} does not exist")
    sink = RowSink(on_error)
    for file in files:
        _read_semeval_file(file, sink, include_unlabelled)
    return sink.finish()


# ID -> (label, line in the gold file, gold row)
_Gold = dict[str, tuple[str, int, dict[str, str]]]


def _read_semeval_gold(gold_path: Path, sink: RowSink) -> _Gold:
    gold: _Gold = {}
    for line, row, reason in _csv_records(gold_path):
        try:
            if row is None:
                raise _BadRow(reason)
            key, label = _required(row, "ID"), _semeval_label(_required(row, "Label"))
            if key in gold:
                raise _BadRow(f"duplicate ID {key!r} (first at line {gold[key][1]})")
        except _BadRow as e:
            sink.problem(gold_path, line, str(e))
            continue
        gold[key] = (label, line, row)
    return gold


def _read_semeval_file(file: Path, sink: RowSink, include_unlabelled: bool) -> None:
    header = next(csv.reader(io.StringIO(read_text(file), newline="")), [])
    if not header:
        raise ValueError(f"{file} is empty: expected a header line")
    gold = None if "Label" in header else _semeval_gold_beside(file, sink, include_unlabelled)
    used: set[str] = set()
    for line, row, reason in _csv_records(file):
        try:
            if row is None:
                raise _BadRow(reason)
            key = _required(row, "ID") if "ID" in header else _required(row, "DataID")
            source = dict(row)
            if "Label" in header:
                label = _semeval_label(_required(row, "Label"))
            elif gold is not None:
                label = _join_semeval_gold(key, row, gold, file, source)
                used.add(key)
            else:
                label = None
            example = Example(
                id=key, language=_required(row, "Language").lower(), expression=_required(row, "MWE"),
                target=_required(row, "Target"), previous=(row.get("Previous") or "").strip(),
                next=(row.get("Next") or "").strip(), label=label, split=file.stem,
                dataset="semeval2022-2a", source=source,
            )  # fmt: skip
        except _BadRow as e:
            sink.problem(file, line, str(e))
            continue
        sink.add(example, file, line)
    for key, (_, gold_line, _) in (gold or {}).items():
        if key not in used:
            sink.problem(
                file.with_name(f"{file.stem}_gold.csv"),
                gold_line,
                f"gold ID {key!r} has no row in {file.name}",
            )


def _semeval_gold_beside(file: Path, sink: RowSink, include_unlabelled: bool) -> _Gold | None:
    """The gold labels of an unlabelled file from `<stem>_gold.csv` beside it; None when there is none and
    `include_unlabelled` allows that."""
    gold_path = file.with_name(f"{file.stem}_gold.csv")
    if gold_path.is_file():
        return _read_semeval_gold(gold_path, sink)
    if not include_unlabelled:
        raise ValueError(
            f"{file} has no Label column and there is no {gold_path.name} beside it; "
            "pass include_unlabelled=True to load it without labels"
        )
    return None


def _semeval_label(raw: str) -> str:
    if raw not in SEMEVAL_LABELS:
        raise _BadRow(f"unknown label {raw!r} (expected 0 = idiomatic or 1 = literal)")
    return SEMEVAL_LABELS[raw]


def _join_semeval_gold(
    key: str,
    row: dict[str, str],
    gold: _Gold,
    file: Path,
    source: dict[str, str],
) -> str:
    """The gold label of row `key`; the gold row's columns are added to `source` as `gold_<column>`."""
    if key not in gold:
        raise _BadRow(f"ID {key!r} has no gold label in {file.stem}_gold.csv")
    label, _, gold_row = gold[key]
    if gold_row.get("Language", row.get("Language")) != row.get("Language"):
        raise _BadRow(
            f"Language {row.get('Language')!r} differs from the gold file's {gold_row.get('Language')!r}"
        )
    source.update({f"gold_{k}": v for k, v in gold_row.items()})
    return label


# ----- MAGPIE -----


def load_magpie(
    path: str | Path,
    split: str | None = None,
    *,
    on_error: OnError = "raise",
    min_confidence: float | None = None,
) -> Examples:
    """Load MAGPIE jsonl (original or hub layout). `split` is train/dev/test (or training/development);
    `min_confidence` excludes instances whose annotation confidence is below it (original layout only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not a file")
    want = None
    if split is not None:
        if split not in MAGPIE_SPLITS:
            raise ValueError(f"split must be one of {sorted(MAGPIE_SPLITS)} or None, got {split!r}")
        want = MAGPIE_SPLITS[split]
    sink = RowSink(on_error)
    for line, obj, reason in _jsonl_records(path):
        try:
            if obj is None:
                raise _BadRow(reason)
            example = _magpie_example(obj, path, line)
        except _BadRow as e:
            sink.problem(path, line, str(e))
            continue
        if isinstance(example, str):
            sink.exclude(example)
        elif want is not None and example.split != want:
            continue
        elif min_confidence is not None and float(obj.get("confidence", 1.0)) < min_confidence:
            sink.exclude(f"confidence below {min_confidence}")
        else:
            sink.add(example, path, line)
    return sink.finish()


def _magpie_example(obj: dict[str, Any], path: Path, line: int) -> Example | str:
    """The Example of one MAGPIE object, or the reason it is excluded by design."""
    expression = _required(obj, "idiom")
    raw_label = obj.get("label", obj.get("usage"))
    if raw_label is None:
        raise _BadRow("missing column 'label' (original layout) or 'usage' (hub layout)")
    raw_label = str(raw_label).strip()
    if raw_label in MAGPIE_OTHER_SENSES:
        return f"MAGPIE sense {raw_label!r} (neither idiomatic nor literal)"
    if raw_label not in MAGPIE_LABELS:
        raise _BadRow(
            f"unknown label {raw_label!r} "
            f"(expected one of {sorted(MAGPIE_LABELS)} or {sorted(MAGPIE_OTHER_SENSES)})"
        )
    if "context" in obj:
        context = obj["context"]
        if not isinstance(context, list) or not context or not all(isinstance(s, str) for s in context):
            raise _BadRow("'context' must be a non-empty list of sentences")
        mid = len(context) // 2  # MAGPIE keeps 2 sentences either side of the target
        previous, target, following = " ".join(context[:mid]), context[mid], " ".join(context[mid + 1 :])
    else:
        previous, target, following = "", _required(obj, "sentence"), ""
    if not target.strip():
        raise _BadRow("empty target sentence")
    split_raw = str(obj.get("split", "")).strip()
    if split_raw and split_raw not in MAGPIE_SPLITS:
        raise _BadRow(f"unknown split {split_raw!r}")
    return Example(
        id=str(obj["id"]) if "id" in obj else f"{path.stem}:{line}", language="en", expression=expression,
        target=target.strip(), previous=previous.strip(), next=following.strip(),
        label=MAGPIE_LABELS[raw_label], split=MAGPIE_SPLITS.get(split_raw, ""), dataset="magpie", source=obj,
    )  # fmt: skip


# ----- VNC-Tokens -----


def load_vnc_tokens(
    path: str | Path, split: str | None = None, *, on_error: OnError = "raise", include_unknown: bool = False
) -> Examples:
    """Load VNC-Tokens (`cook_dataset.tok`, or a folder holding it). The file has no splits: `split` must
    be None. Sentences are tokenised with HTML entities (`&apos;`); `target` unescapes them, `source` keeps
    the raw line."""
    path = Path(path)
    if path.is_dir():
        path = path / "cook_dataset.tok"
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not a file")
    if split is not None:
        raise ValueError(f"VNC-Tokens has no splits: split must be None, got {split!r}")
    sink = RowSink(on_error)
    for line_no, line in enumerate(io.StringIO(read_text(path)), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("||", 3)
        try:
            if len(parts) != 4:
                raise _BadRow(
                    f"expected 'label||verb||noun||sentence', got {len(parts)} '||'-separated fields"
                )
            raw_label, verb, noun, sentence = (p.strip() for p in parts)
            if raw_label not in VNC_LABELS:
                raise _BadRow(f"unknown label {raw_label!r} (expected I, L or Q)")
            if not verb or not noun or not sentence:
                raise _BadRow("empty verb, noun or sentence")
        except _BadRow as e:
            sink.problem(path, line_no, str(e))
            continue
        if raw_label == "Q" and not include_unknown:
            sink.exclude("VNC label Q (unknown)")
            continue
        example = Example(
            id=f"{path.stem}:{line_no}", language="en", expression=f"{verb} {noun}",
            target=html.unescape(sentence), label=VNC_LABELS[raw_label], dataset="vnc-tokens",
            source={"label": raw_label, "verb": verb, "noun": noun, "sentence": sentence},
        )  # fmt: skip
        sink.add(example, path, line_no)
    return sink.finish()


# ----- generic CSV/TSV/JSONL and `datasets` -----


def _row_mapper(
    columns: dict[str, str] | None,
    label_map: dict[str, str | None] | None,
    language: str | None,
    dataset: str,
) -> Callable[[dict[str, Any], str], Example]:
    cols = {f: f for f in SCHEMA_FIELDS}
    for field, column in (columns or {}).items():
        if field not in SCHEMA_FIELDS:
            raise ValueError(f"columns keys must be schema fields {SCHEMA_FIELDS}, got {field!r}")
        cols[field] = column
    labels = {str(k).strip().lower(): v for k, v in (label_map or DEFAULT_LABEL_MAP).items()}
    for key, value in labels.items():
        if value is not None and value not in ("idiomatic", "literal"):
            raise ValueError(
                f"label_map values must be 'idiomatic', 'literal' or None, got {key!r}: {value!r}"
            )

    def to_example(row: dict[str, Any], fallback_id: str) -> Example:
        raw = _required(row, cols["label"]).lower()
        if raw not in labels:
            raise _BadRow(f"unknown label {raw!r} (label_map knows {sorted(labels)})")
        if labels[raw] is None:
            raise _Excluded(f"label {raw!r} mapped to None")
        if cols["language"] in row and row[cols["language"]] not in (None, ""):
            lang = str(row[cols["language"]]).strip().lower()
        elif language is not None:
            lang = language
        else:
            raise _BadRow(f"missing column {cols['language']!r} (or pass language=...)")

        def optional(field: str) -> str:
            value = row.get(cols[field])
            return "" if value is None else str(value).strip()

        return Example(
            id=optional("id") or fallback_id, language=lang, expression=_required(row, cols["expression"]),
            target=_required(row, cols["target"]), previous=optional("previous"), next=optional("next"),
            label=labels[raw], split=optional("split"), dataset=dataset, source=dict(row),
        )  # fmt: skip

    return to_example


def load_generic(
    path: str | Path,
    split: str | None = None,
    *,
    on_error: OnError = "raise",
    columns: dict[str, str] | None = None,
    label_map: dict[str, str | None] | None = None,
    language: str | None = None,
) -> Examples:
    """Load a CSV (`.csv`), TSV (`.tsv`) or JSON-lines (`.jsonl`/`.ndjson`) file.

    Args:
        columns: schema field -> source column, for the fields named differently in the file (schema fields:
            id, language, expression, previous, target, next, label, split). `expression`, `target` and
            `label` are required in every row.
        label_map: source label (case-insensitive) -> "idiomatic" | "literal" | None (None = exclude the row,
            counted). Defaults to `DEFAULT_LABEL_MAP`; numeric labels always need an explicit map.
        language: language code for files without a language column.
        split: keep only rows whose split column equals it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        records = _csv_records(path, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".ndjson"):
        records = _jsonl_records(path)
    else:
        raise ValueError(f"path must end in .csv, .tsv, .jsonl or .ndjson, got {path.name!r}")
    to_example = _row_mapper(columns, label_map, language, "generic")
    split_col = (columns or {}).get("split", "split")
    sink = RowSink(on_error)
    for line, row, reason in records:
        try:
            if row is None:
                raise _BadRow(reason)
            if split is not None and str(row.get(split_col, "")).strip() != split:
                continue
            example = to_example(row, f"{path.stem}:{line}")
        except _BadRow as e:
            sink.problem(path, line, str(e))
            continue
        except _Excluded as e:
            sink.exclude(str(e))
            continue
        sink.add(example, path, line)
    return sink.finish()


def load_hf(
    path: str | Path,
    split: str | None = None,
    *,
    on_error: OnError = "raise",
    config: str | None = None,
    columns: dict[str, str] | None = None,
    label_map: dict[str, str | None] | None = None,
    language: str | None = None,
) -> Examples:
    """Load through `datasets` (the `hf` extra): a `save_to_disk` folder, a local data folder, or a hub name
    (needs the hub). Rows are mapped as in `load_generic`; problems name the row as line `index + 1`."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "loading through `datasets` needs the hf extra: pip install 'idiomreason[hf]'"
        ) from e
    local = Path(path)
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split] if split is not None else loaded
    else:
        loaded = datasets.load_dataset(str(path), config, split=split)
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(split or "", loaded)]
    to_example = _row_mapper(columns, label_map, language, "hf")
    sink = RowSink(on_error)
    for split_name, table in parts:
        where = f"{path}[{split_name}]" if split_name else str(path)
        for index, row in enumerate(table):
            try:
                example = to_example(row, f"{split_name or 'row'}:{index}")
            except _BadRow as e:
                sink.problem(where, index + 1, str(e))
                continue
            except _Excluded as e:
                sink.exclude(str(e))
                continue
            if not example.split and split_name:
                example = Example(**{**example.__dict__, "split": split_name})
            sink.add(example, where, index + 1)
    return sink.finish()


LOADERS: dict[str, Callable[..., Examples]] = {
    "semeval2022-2a": load_semeval2022_2a,
    "magpie": load_magpie,
    "vnc-tokens": load_vnc_tokens,
    "generic": load_generic,
    "hf": load_hf,
}


def load_dataset(name: str, path: str | Path, split: str | None = None, **options: Any) -> Examples:
    """Load a dataset by loader name ("semeval2022-2a", "magpie", "vnc-tokens", "generic", "hf").

    `options` go to the loader (all take `on_error="raise" | "skip"`; see each `load_*` for the rest).
    Returns an `Examples` list whose `.skipped` and `.excluded` say what was left out.
    """
    if name not in LOADERS:
        raise ValueError(f"name must be one of {sorted(LOADERS)}, got {name!r}")
    if options.get("on_error", "raise") not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {options['on_error']!r}")
    examples = LOADERS[name](path, split, **options)
    if not examples:
        raise ValueError(
            f"{path}: no examples to evaluate"
            + (f" in split {split!r}" if split else "")
            + f" ({examples.summary()})"
        )
    return examples
