"""The embedded default retrieval task, built from the Python standard library (present on every machine).

Queries are the first paragraph of public functions' docstrings (the function's own name masked); documents
are the functions' sources with the docstring removed, plus one document per module holding its docstring.
Gold relevance: the function's source is relevant (2), its module's documentation partially relevant (1).
Modules are split, not queries, so no module contributes to two of training, validation (choices made after
training, e.g. the fusion weight) and evaluation.

Everything is deterministic for a given Python version (the sources are read with `inspect` and re-printed
with `ast.unparse`); the task records the version it was built from.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass, field

MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "colorsys", "configparser", "copy", "csv", "dataclasses",
    "difflib", "email.utils", "enum", "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "gzip",
    "heapq", "html", "inspect", "ipaddress", "json", "logging", "mimetypes", "ntpath", "pathlib", "platform",
    "posixpath", "pprint", "quopri", "random", "shlex", "shutil", "statistics", "string", "tarfile",
    "tempfile", "textwrap", "tokenize", "traceback", "typing", "urllib.parse", "uuid", "warnings", "zipfile",
)


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


def _function_source(fn) -> str | None:
    try:
        src = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        node.body = body[1:] or [ast.Pass()]
    node.decorator_list = []
    return ast.unparse(node)


def _query_text(doc: str, name: str) -> str | None:
    first = inspect.cleandoc(doc).split("\n\n")[0]
    first = " ".join(first.split())
    first = re.sub(rf"\b{re.escape(name)}\b", "this function", first)
    return first if len(first.split()) >= 5 else None


def build_stdlib_task(eval_every: int = 4, validation_every: int = 8, max_train_queries: int = 160,
                      max_eval_queries: int = 40, max_validation_queries: int = 40) -> RetrievalTask:
    """Build the task. Module i (in `MODULES` order) goes to evaluation when i % eval_every == eval_every - 1,
    else to validation when i % validation_every == 1, else to training.

    Args:
        eval_every: evaluation split period (>= 2).
        validation_every: validation split period (>= 2; a period that only hits evaluation modules leaves
            validation empty).
        max_train_queries, max_eval_queries, max_validation_queries: caps, taken in module order.
    """
    if eval_every < 2 or validation_every < 2:
        raise ValueError(f"eval_every and validation_every must be >= 2, got {eval_every}, {validation_every}")
    corpus: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    splits: dict[str, list[str]] = {"train": [], "validation": [], "eval": []}
    for i, module_name in enumerate(MODULES):
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a platform without it: the task is still deterministic for that platform
            continue
        if i % eval_every == eval_every - 1:
            split = splits["eval"]
        else:
            split = splits["validation"] if i % validation_every == 1 else splits["train"]
        module_doc = inspect.getdoc(module)
        module_id = f"{module_name}:module"
        if module_doc:
            corpus[module_id] = f"Module {module_name}.\n\n{module_doc}"
        for name, fn in sorted(vars(module).items()):
            if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            source, doc = _function_source(fn), inspect.getdoc(fn)
            query = _query_text(doc, name) if doc else None
            if source is None or query is None:
                continue
            docid, qid = f"{module_name}.{name}", f"q:{module_name}.{name}"
            corpus[docid] = source
            queries[qid] = query
            qrels[qid] = {docid: 2, **({module_id: 1} if module_doc else {})}
            split.append(qid)
    train_qids = splits["train"][:max_train_queries]
    validation_qids = splits["validation"][:max_validation_queries]
    eval_qids = splits["eval"][:max_eval_queries]
    keep = set(train_qids) | set(validation_qids) | set(eval_qids)
    queries = {q: t for q, t in queries.items() if q in keep}
    qrels = {q: r for q, r in qrels.items() if q in keep}
    version = ".".join(map(str, sys.version_info[:3]))
    return RetrievalTask("python-stdlib-docstrings", corpus, queries, qrels, train_qids, eval_qids,
                         info={"python": version, "modules": str(len(MODULES))}, validation_qids=validation_qids)
