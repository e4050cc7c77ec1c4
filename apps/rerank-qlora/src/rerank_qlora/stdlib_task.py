"""The embedded default retrieval task, mined with `ast` from the files of the installed Python standard
library.

Each public function, class and method (of a top-level class) with a docstring gives a query -- the
docstring's first paragraph, its own name masked -- and a document -- its code without the docstring,
re-printed by `ast.unparse` (a class shows its methods' signatures, their bodies elided; a method is shown
inside its class header). Gold relevance: the unit's own code (2); nothing else is judged.

Built from FILES, never from imported objects: `inspect.getfile`/`getsource` change once torch is imported
(it patches them), and a module that fails to import on one machine would drop out. The same stdlib
directory gives the same task whatever is imported.

Split by top-level module (`email.utils` goes with `email`): a stable hash of the top-level name puts it in
training, validation (choices made after training: the fusion weight, BM25's k1/b) or evaluation. Training
queries, pairs and the base LM's text come only from training modules' files; a held-out module's file is
read only to build its own documents and queries (`splits` lets a caller read only some splits).

Deduplicated: a document whose code is identical to an earlier one (module order; its own name aside) is
dropped with its query;
a query text shared by several units is dropped from all (its gold would be ambiguous).
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import sysconfig
import tokenize
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Directories of the stdlib that are not library code (tests, demos, bundled wheels, build data) or are
# dozens of near-identical files (the codecs in `encodings`).
EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "site-packages",
        "lib-dynload",
        "__pycache__",
        "ensurepip",
        "pydoc_data",
        "encodings",
        "lib2to3",
        "__phello__",
    }
)
SPLITS = ("train", "validation", "eval")
MIN_QUERY_WORDS = 5


@dataclass
class RetrievalTask:
    """corpus {docid: text}, queries {qid: text}, qrels {qid: {docid: gain}}, and the query split."""

    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    train_qids: list[str]
    eval_qids: list[str]
    info: dict[str, str] = field(default_factory=dict)
    validation_qids: list[str] = field(default_factory=list)
    train_docids: list[str] = field(default_factory=list)  # documents from training modules (base LM text)
    # Evaluation documents kept apart (BRIGHT zero-shot): evaluation queries search only these, the others the
    # rest of the corpus; none: every query searches the whole corpus.
    eval_docids: list[str] = field(default_factory=list)
    excluded: dict[str, set[str]] = field(default_factory=dict)  # per query, ids never to be candidates
    search_queries: dict[str, str] = field(
        default_factory=dict
    )  # texts BM25 searches with, where not the query


@dataclass(frozen=True)
class Unit:
    """One mined (query, document) pair: `docid` is the dotted name (module.Class.method)."""

    docid: str
    module: str
    kind: str  # "function", "class" or "method"
    query: str
    code: str


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library (from sysconfig: nothing is imported)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(root: Path) -> list[tuple[str, Path]]:
    """(dotted module name, file) of every library source file under `root`, sorted by name."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if not parts or any(not p.isidentifier() for p in parts):
            continue
        out.append((".".join(parts), path))
    return sorted(out)


def split_of(module: str, validation_share: float = 0.15, eval_share: float = 0.25) -> str:
    """The split of a module, decided by a stable hash of its top-level name (so packages stay whole)."""
    top = module.split(".")[0]
    u = int(hashlib.sha256(top.encode()).hexdigest()[:12], 16) / 16**12
    return "validation" if u < validation_share else "eval" if u < validation_share + eval_share else "train"


def read_source(path: Path) -> str:
    """A source file's text, decoded as Python does (PEP 263 coding line, else UTF-8)."""
    with tokenize.open(path) as f:
        return f.read()


def _strip_docstring(node: ast.AST) -> str | None:
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        node.body = body[1:] or [ast.Pass()]
        return body[0].value.value
    return None


def _summary(doc: str, name: str, what: str) -> str | None:
    import inspect

    first = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    if ">>>" in first:  # a doctest, not a summary
        return None
    first = re.sub(rf"(?<![\w.]){re.escape(name)}(?!\w)", what, first)
    return first if len(first.split()) >= MIN_QUERY_WORDS else None


def _cut(code: str, max_chars: int) -> str:
    if len(code) <= max_chars:
        return code
    return code[: code.rfind("\n", 0, max_chars) + 1 or max_chars].rstrip() + "\n    ..."


def mine_units(module: str, source: str, max_doc_chars: int = 2000) -> list[Unit]:
    """The public functions, classes and top-level classes' methods of one module's source that have a
    docstring whose first paragraph has at least `MIN_QUERY_WORDS` words. Unparseable source gives []."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    units = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
            doc = _strip_docstring(node)
            query = _summary(doc, node.name, "this function") if doc else None
            if query:
                units.append(
                    Unit(
                        f"{module}.{node.name}",
                        module,
                        "function",
                        query,
                        _cut(ast.unparse(node), max_doc_chars),
                    )
                )
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            doc = _strip_docstring(node)
            methods = [m for m in node.body if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)]
            for m in methods:
                if m.name.startswith("_"):
                    continue
                mdoc = _strip_docstring(m)
                query = _summary(mdoc, m.name, "this method") if mdoc else None
                if query:
                    header = ast.unparse(
                        ast.ClassDef(
                            name=node.name,
                            bases=node.bases,
                            keywords=node.keywords,
                            body=[m],
                            decorator_list=[],
                        )
                    )
                    units.append(
                        Unit(
                            f"{module}.{node.name}.{m.name}",
                            module,
                            "method",
                            query,
                            _cut(header, max_doc_chars),
                        )
                    )
            query = _summary(doc, node.name, "this class") if doc else None
            if query:
                for m in methods:  # the class's document: its body with the methods' bodies elided
                    _strip_docstring(m)
                    m.body = [ast.Expr(ast.Constant(...))]
                units.append(
                    Unit(
                        f"{module}.{node.name}",
                        module,
                        "class",
                        query,
                        _cut(ast.unparse(node), max_doc_chars),
                    )
                )
    return units


def _sample(qids: list[str], n: int) -> list[str]:
    """A deterministic sample of n query ids (by a hash, not module order), in that hash order."""
    return sorted(qids, key=lambda q: hashlib.sha256(q.encode()).hexdigest())[:n]


def _check_arguments(splits: tuple[str, ...], *caps: int) -> None:
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"splits must be among {SPLITS}, got {sorted(unknown)}")
    names = ("max_train_queries", "max_validation_queries", "max_eval_queries")
    for name, n in zip(names, caps, strict=True):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")


def _mine_splits(
    root: Path,
    splits: tuple[str, ...],
    split: Callable[[str], str],
    read: Callable[[Path], str],
    max_doc_chars: int,
) -> tuple[list[tuple[str, Unit]], int]:
    """(split, unit) of every module file whose top-level module falls in `splits`; how many modules."""
    units: list[tuple[str, Unit]] = []
    modules = 0
    for module, path in stdlib_modules(root):
        top = module.split(".")[0]
        where = split(top)
        if where not in SPLITS:
            raise ValueError(f"split({top!r}) returned {where!r}, not one of {SPLITS}")
        if where not in splits:
            continue
        modules += 1
        units += [(where, u) for u in mine_units(module, read(path), max_doc_chars)]
    return units, modules


def _first_of_identical(units: list[tuple[str, Unit]]) -> list[tuple[str, Unit]]:
    """The first of identical documents (up to the unit's own name) and of repeated document ids."""
    seen: set[str] = set()
    kept: list[tuple[str, Unit]] = []
    for where, u in units:
        name = u.docid.rsplit(".", 1)[1]
        body = re.sub(rf"\b{re.escape(name)}\b", "_", u.code)
        if body not in seen and u.docid not in seen:
            seen.update((body, u.docid))
            kept.append((where, u))
    return kept


def _documents_and_queries(
    kept: list[tuple[str, Unit]],
) -> tuple[dict[str, str], dict[str, str], dict[str, list[str]], list[str]]:
    """Corpus, queries (a summary shared by several units is no query), query ids by split, training
    documents."""
    text_count: dict[str, int] = {}
    for _, u in kept:
        text_count[u.query.lower()] = text_count.get(u.query.lower(), 0) + 1
    corpus: dict[str, str] = {}
    queries: dict[str, str] = {}
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    train_docids: list[str] = []
    for where, u in kept:
        corpus[u.docid] = u.code
        if where == "train":
            train_docids.append(u.docid)
        if text_count[u.query.lower()] == 1:
            queries[f"q:{u.docid}"] = u.query
            by_split[where].append(f"q:{u.docid}")
    return corpus, queries, by_split, train_docids


def build_stdlib_task(
    max_train_queries: int = 4000,
    max_validation_queries: int = 200,
    max_eval_queries: int = 500,
    root: Path | None = None,
    splits: Iterable[str] = SPLITS,
    split: Callable[[str], str] = split_of,
    read: Callable[[Path], str] = read_source,
    max_doc_chars: int = 2000,
) -> RetrievalTask:
    """Build the task (see the module doc).

    Args:
        max_train_queries, max_validation_queries, max_eval_queries: caps; each split keeps a sample chosen
            by a hash of the query id. The corpus keeps every mined document of the splits read (the
            held-out queries left out by a cap keep their documents: distractors).
        root: the stdlib directory (default: this interpreter's, `stdlib_root()`).
        splits: the splits whose modules' files are read (default all three).
        split: top-level module name -> "train" / "validation" / "eval" (default `split_of`).
        read: path -> source text (default `read_source`).
        max_doc_chars: documents are cut at a line boundary to this many characters.
    """
    splits = tuple(splits)
    _check_arguments(splits, max_train_queries, max_validation_queries, max_eval_queries)
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise ValueError(f"root: {root} is not a directory")
    units, modules = _mine_splits(root, splits, split, read, max_doc_chars)
    corpus, queries, by_split, train_docids = _documents_and_queries(_first_of_identical(units))
    train = _sample(by_split["train"], max_train_queries)
    validation = _sample(by_split["validation"], max_validation_queries)
    evaluation = _sample(by_split["eval"], max_eval_queries)
    keep = set(train) | set(validation) | set(evaluation)
    queries = {q: t for q, t in queries.items() if q in keep}
    qrels = {q: {q[2:]: 2} for q in queries}
    version = ".".join(map(str, sys.version_info[:3]))
    info = {
        "python": version,
        "modules": str(modules),
        "mined": {s: len(by_split[s]) for s in SPLITS}.__repr__(),
    }
    return RetrievalTask(
        "python-stdlib-ast",
        corpus,
        queries,
        qrels,
        train,
        evaluation,
        info=info,
        validation_qids=validation,
        train_docids=train_docids,
    )
