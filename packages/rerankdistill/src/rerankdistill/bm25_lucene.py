"""First-stage retrieval with Lucene BM25 through pyserini (Anserini), over an in-memory corpus.

The corpus is indexed in-process with pyserini's `LuceneIndexer` (Anserini's `SimpleIndexer`, JsonCollection
documents `{"id", "contents"}`) into a temporary or user-given directory, and queried with Anserini's
`SimpleSearcher.batch_search` (the Java class pyserini's `LuceneSearcher` wraps) with BM25 k1/b set. The Java
class is called directly because `pyserini.search.lucene` imports torch, transformers and onnxruntime and
builds an OpenAI client at import time, which fails without OPENAI_API_KEY under openai >= 2 (pyserini 1.6.0).

Analysis matches `bm25.BM25Index`'s defaults where Lucene allows: `stopwords="en"` is Lucene's 33-word English
list (the same list bm25s uses), `stemmer=None` disables stemming, "porter"/"krovetz" select Lucene's
stemmers. Tokenisation differs slightly (Lucene's StandardTokenizer keeps one-character tokens, bm25s drops
them), Lucene stores document lengths in a lossy one-byte norm and Anserini rounds scores to 4 decimals, so
rankings are close to bm25s's, not identical (Cranfield nDCG@10: 0.3160 here vs 0.3161).

pyserini needs Java 21+ (Anserini's classes are compiled for it) and starts one JVM per process through
pyjnius, which reads JAVA_HOME when first imported: `find_java_home` honours JAVA_HOME, else picks the newest
JDK >= 21 under /usr/lib/jvm (or `java` on PATH) and exports it before pyserini is imported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path

from rerankdistill.trec import Run

MIN_JAVA = 21
LUCENE_STEMMERS = ("porter", "krovetz")
JVM_ROOTS = (Path("/usr/lib/jvm"),)


def java_major_version(java_home: str | Path) -> int | None:
    """The major version of the JDK/JRE at `java_home` (from its `release` file, else `bin/java -version`)."""
    home = Path(java_home)
    release = home / "release"
    text = ""
    if release.is_file():
        match = re.search(r'^JAVA_VERSION="([^"]+)"', release.read_text(errors="replace"), re.M)
        text = match.group(1) if match else ""
    if not text and (home / "bin" / "java").is_file():
        try:
            out = subprocess.run(
                [str(home / "bin" / "java"), "-version"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        match = re.search(r'version "([^"]+)"', out.stderr + out.stdout)
        text = match.group(1) if match else ""
    match = re.match(r"(\d+)(?:\.(\d+))?", text)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major  # "1.8.0_382" is Java 8


def _candidate_java_homes() -> list[Path]:
    homes = [
        p
        for root in JVM_ROOTS
        if root.is_dir()
        for p in sorted(root.iterdir())
        if (p / "bin" / "java").is_file()
    ]
    on_path = shutil.which("java")
    if on_path:
        homes.append(Path(os.path.realpath(on_path)).parent.parent)
    return list(dict.fromkeys(p.resolve() for p in homes))


def find_java_home(minimum: int = MIN_JAVA) -> Path:
    """A Java home of version >= `minimum`: JAVA_HOME when it is set (it must qualify), else the newest
    suitable JDK under /usr/lib/jvm or behind `java` on PATH. Raises RuntimeError saying what was found
    otherwise."""
    found = {home: java_major_version(home) for home in _candidate_java_homes()}
    suitable = sorted((v, str(h)) for h, v in found.items() if v is not None and v >= minimum)
    seen = ", ".join(f"{h} (Java {v})" for h, v in found.items()) or "none"
    env = os.environ.get("JAVA_HOME")
    if env:
        version = java_major_version(env)
        if version is not None and version >= minimum:
            return Path(env)
        hint = f"; point JAVA_HOME at {suitable[-1][1]} or unset it" if suitable else ""
        raise RuntimeError(
            f"pyserini needs Java {minimum}+, but JAVA_HOME={env} is "
            f"{'not a Java home' if version is None else f'Java {version}'}{hint}"
        )
    if not suitable:
        raise RuntimeError(
            f"pyserini needs Java {minimum}+ and none was found (JAVA_HOME unset; Java homes seen: "
            f"{seen}); install a JDK {minimum}+ (e.g. Temurin) and set JAVA_HOME to it"
        )
    return Path(suitable[-1][1])


def _load_pyserini():
    """Import pyserini's indexer/analyzer modules on a suitable JVM; returns (LuceneIndexer,
    get_lucene_analyzer, autoclass, JArrayList)."""
    try:
        import pyserini  # noqa: F401  (the package alone starts no JVM)
    except ImportError as err:
        raise ImportError(
            "backend='pyserini' needs pyserini (`pip install pyserini`, or `uv sync` in this "
            "workspace: it is in the dev group) and a Java 21+ JDK"
        ) from err
    if "jnius" not in sys.modules:  # JVM not started yet: choose it now (pyjnius reads JAVA_HOME on import)
        os.environ["JAVA_HOME"] = str(find_java_home())
    try:
        from pyserini.analysis import get_lucene_analyzer
        from pyserini.index.lucene import LuceneIndexer
        from pyserini.pyclass import JArrayList, autoclass
    except Exception as err:  # jnius.JavaException: UnsupportedClassVersionError on a JVM older than 21
        raise RuntimeError(
            f"pyserini could not load Anserini's classes (needs Java {MIN_JAVA}+; JAVA_HOME="
            f"{os.environ.get('JAVA_HOME')}; a JVM already started in this process cannot be "
            f"replaced): {err}"
        ) from err
    try:  # Anserini logs every indexing step at INFO through log4j; keep warnings only
        level = autoclass("org.apache.logging.log4j.Level")
        autoclass("org.apache.logging.log4j.core.config.Configurator").setRootLevel(level.WARN)
    except Exception:  # cosmetic only
        pass
    return LuceneIndexer, get_lucene_analyzer, autoclass, JArrayList


def _check_analysis(stopwords: str | None, stemmer: str | None) -> None:
    if stopwords not in ("en", None):
        raise ValueError(
            f"stopwords must be 'en' (Lucene's English list) or None for backend='pyserini', "
            f"got {stopwords!r}"
        )
    if stemmer is not None and stemmer not in LUCENE_STEMMERS:
        raise ValueError(
            f"stemmer must be None or one of {LUCENE_STEMMERS} for backend='pyserini', got {stemmer!r}"
        )


class LuceneBM25Index:
    """A Lucene index over `corpus` (built at construction) answering batches of queries with BM25.

    Args:
        corpus: {docid: text}; empty texts are not indexed (they match no query anyway).
        k1, b: BM25 parameters (Anserini's defaults, k1=0.9, b=0.4).
        stopwords: "en" (Lucene's English stopwords) or None (keep every word).
        stemmer: None (no stemming, as `bm25.BM25Index`'s default), "porter" (Anserini's default) or
            "krovetz".
        index_dir: where the index is written; must be absent or empty and is kept. None: a temporary
            directory removed by `close()` (or when the object is garbage collected).
        threads: indexing and search threads.
    """

    def __init__(
        self,
        corpus: Mapping[str, str],
        k1: float = 0.9,
        b: float = 0.4,
        stopwords: str | None = "en",
        stemmer: str | None = None,
        index_dir: str | Path | None = None,
        threads: int = 1,
    ):
        self._searcher = None
        self._tmp: str | None = None  # the temporary index directory, removed by close()
        if not isinstance(corpus, Mapping) or not corpus:
            raise ValueError("corpus must be a non-empty dict {docid: text}")
        _check_analysis(stopwords, stemmer)
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        if index_dir is not None and Path(index_dir).exists() and any(Path(index_dir).iterdir()):
            raise ValueError(f"index_dir {str(index_dir)!r} is not empty; give an absent or empty directory")
        lucene_indexer, get_analyzer, autoclass, self._jarraylist = _load_pyserini()
        if index_dir is None:
            index_dir = self._tmp = tempfile.mkdtemp(prefix="rerankdistill-lucene-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        self.index_dir = Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads

        args = ["-index", str(self.index_dir), "-stemmer", stemmer or "none"]
        if stopwords is None:
            args.append("-keepStopwords")
        indexer = lucene_indexer(args=args, threads=threads)
        json_doc = autoclass("io.anserini.collection.JsonCollection$Document")
        indexer.object.addJsonDocuments(
            [json_doc.fromFields(str(d), t) for d, t in corpus.items() if t.strip()]
        )
        indexer.close()

        self._searcher = autoclass("io.anserini.search.SimpleSearcher")(str(self.index_dir))
        self._searcher.set_analyzer(
            get_analyzer(
                stemming=stemmer is not None, stemmer=stemmer or "porter", stopwords=stopwords is not None
            )
        )
        self._searcher.set_bm25(float(k1), float(b))
        self.num_docs = int(self._searcher.get_total_num_docs())

    def search(self, queries: Mapping[str, str], k: int = 100) -> Run:
        """Top-k documents per query: {qid: {docid: score}} (every qid present; positive scores only)."""
        from rerankdistill.bm25 import _validate

        _validate({"_": "_"}, queries, k)
        if self._searcher is None:
            raise RuntimeError("this LuceneBM25Index is closed")
        qids = list(queries)
        texts, ids = self._jarraylist(), self._jarraylist()
        for q in qids:
            texts.add(queries[q])
            ids.add(str(q))
        results = self._searcher.batch_search(texts, ids, int(k), int(self.threads))
        by_id = {e.getKey(): e.getValue() for e in results.entrySet().toArray()}
        run: Run = {}
        for q in qids:
            run[q] = {h.docid: float(h.score) for h in by_id.get(str(q), ()) if h.score > 0}
        return run

    def close(self) -> None:
        """Close the searcher and remove a temporary index directory."""
        if self._searcher is not None:
            self._searcher.close()
            self._searcher = None
        if self._tmp is not None:
            self._cleanup()

    def __enter__(self) -> LuceneBM25Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
