"""Corpus, queries and qrels from what researchers have: JSON lines (.gz), Parquet, a `datasets` folder
(`Dataset.save_to_disk`), or a Hugging Face hub id (`load_dataset`, only when online).

Field names are found among the common spellings (BEIR's `_id`/`title`/`text`, BRIGHT's `id`/`content`,
MS MARCO-style `docid`/`contents`, BEIR-qrels `query-id`/`corpus-id`/`score`), or given explicitly.
A `datasets` folder holding several splits (a `DatasetDict`, e.g. BRIGHT's `documents` with one split per
domain) needs `split=`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

ID_FIELDS = ("_id", "id", "docid", "doc_id", "qid", "query_id", "query-id")
TEXT_FIELDS = ("text", "content", "contents", "query", "body")
QRELS_FIELDS = (
    ("query-id", "query_id", "qid"),
    ("corpus-id", "corpus_id", "docid", "doc_id"),
    ("score", "relevance", "label", "gain"),
)


def iter_records(
    source: str | os.PathLike, split: str | None = None, config: str | None = None
) -> Iterable[dict]:
    """The rows of `source` as dicts.

    Args:
        source: a .jsonl / .jsonl.gz / .parquet file, a `save_to_disk` folder, or a hub dataset id (with its
            configuration after a colon when `config` is not given: "BeIR/scifact:corpus").
        split: the split of a multi-split folder or hub dataset.
        config: the hub dataset's configuration (e.g. BRIGHT's "documents").
    """
    path = Path(source)
    name = path.name.lower()
    if path.is_file() and (name.endswith(".jsonl") or name.endswith(".jsonl.gz") or name.endswith(".json")):
        from rerankdistill.datasets import read_jsonl

        yield from read_jsonl(path)
        return
    if path.is_file() and name.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    if path.is_file():
        raise ValueError(
            f"{os.fspath(path)}: unknown format (expected .jsonl, .jsonl.gz, .parquet or a datasets folder)"
        )
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            data = load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"{os.fspath(path)}: not a `datasets` folder (save_to_disk): {e}") from None
        if isinstance(data, DatasetDict):
            if split not in data:
                raise ValueError(
                    f"{os.fspath(path)} holds splits {sorted(data)}: choose one with split= (got {split!r})"
                )
            data = data[split]
        yield from data
        return
    if str(source).startswith(("/", ".", "~")) or name.endswith((".jsonl", ".gz", ".json", ".parquet")):
        raise FileNotFoundError(f"{os.fspath(source)} does not exist")
    hub_id, _, in_spec = str(source).partition(":")
    try:  # a hub id: only when online
        from datasets import load_dataset

        yield from load_dataset(hub_id, config or in_spec or None, split=split or "train")
    except Exception as e:  # offline, unknown id, gated: one clear line
        raise ValueError(
            f"{source!r} is neither a local file/folder nor a loadable hub dataset: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def _field(row: dict, given: str | None, candidates: Sequence[str], what: str, source: str) -> str:
    if given:
        if given not in row:
            raise ValueError(f"{source}: no field {given!r} for the {what}; fields are {sorted(row)}")
        return given
    for name in candidates:
        if name in row:
            return name
    raise ValueError(
        f"{source}: no {what} field among {list(candidates)}; fields are {sorted(row)} (name it explicitly)"
    )


def load_texts(
    source: str | os.PathLike,
    id_field: str | None = None,
    text_field: str | None = None,
    title_field: str | None = "title",
    split: str | None = None,
    config: str | None = None,
) -> dict[str, str]:
    """{id: text} of a corpus or a query set (a `title`, when present, is put before the text)."""
    out: dict[str, str] = {}
    fields: tuple[str, str] | None = None
    for no, row in enumerate(iter_records(source, split, config), start=1):
        if fields is None:
            fields = (
                _field(row, id_field, ID_FIELDS, "id", str(source)),
                _field(row, text_field, TEXT_FIELDS, "text", str(source)),
            )
        key, text = str(row.get(fields[0], "")), str(row.get(fields[1]) or "")
        if not key:
            raise ValueError(f"{os.fspath(source)}: record {no} has no {fields[0]!r}")
        if key in out:
            raise ValueError(f"{os.fspath(source)}: record {no} repeats id {key!r}")
        title = row.get(title_field) if title_field else None
        out[key] = f"{title}\n{text}" if title and text else str(title or text)
    return out


def load_qrels_records(
    source: str | os.PathLike, split: str | None = None, config: str | None = None
) -> dict[str, dict[str, int]]:
    """Qrels from rows with a query id, a document id and an integer gain (BEIR's `*-qrels` datasets)."""
    qrels: dict[str, dict[str, int]] = {}
    fields: list[str] | None = None
    for no, row in enumerate(iter_records(source, split, config), start=1):
        if fields is None:
            fields = [
                _field(row, None, c, w, str(source))
                for c, w in zip(QRELS_FIELDS, ("query id", "document id", "gain"), strict=True)
            ]
        qid, docid, gain = (row[f] for f in fields)
        if isinstance(gain, bool) or not isinstance(gain, int | float) or gain != int(gain):
            raise ValueError(f"{os.fspath(source)}: record {no}: gain {gain!r} is not an integer")
        judged = qrels.setdefault(str(qid), {})
        if str(docid) in judged:
            raise ValueError(f"{os.fspath(source)}: record {no} repeats the judgement of {qid!r}/{docid!r}")
        judged[str(docid)] = int(gain)
    return qrels
