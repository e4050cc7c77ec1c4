"""`rerankdistill split | generate | sft | refine | rerank | evaluate`: each takes `--config FILE.yaml` and
`key=value` overrides (see `--help` for the options), and resumes where it runs long (generate and rerank
append to their stores; sft and refine restart from their last checkpoint).

Query splits: `split` writes train / validation / test qid lists; `generate`, `sft`, `refine` and `rerank`
take `splits=FILE queries=train|validation|test` and the training ones refuse test queries unless
`allow_test_leak=true`.

Collections (`collection=` + paths): cranfield (`path` = folder), beir (`path`, `split`), bright (`topics`,
`qrels`, `corpus`), trec (`corpus` JSONL with id/text, `topics`, `qrels`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rerankdistill.labels import PROMPTS
from shared_kernels.errors import USER_ERRORS, refuse_overwriting_inputs, user_error_message
from shared_kernels.runconfig import ConfigError, load_config, option, options_help, write_text_atomic

if TYPE_CHECKING:
    from rerankdistill.teacher import Pair

COLLECTION_HELP = "cranfield | beir | bright | trec | datasets"


@dataclass
class CollectionOptions:
    collection: str = option("", COLLECTION_HELP)
    path: str = option("", "collection folder (cranfield, beir)")
    split: str = option("test", "BEIR qrels split")
    topics: str = option("", "topics (bright jsonl.gz, trec topics, datasets: queries source)")
    qrels: str = option("", "qrels (bright, trec: TREC file; datasets: source with query-id/corpus-id/score)")
    corpus: str = option(
        "",
        "corpus: JSONL(.gz), Parquet, a `datasets` folder or (online) a hub id[:config] "
        "(bright: id/content; trec: id/text; datasets: _id or id, text or content, title)",
    )
    corpus_split: str = option("", "split of a multi-split corpus source (BRIGHT's documents: the domain)")


def _check(o: object, *names: str, minimum: float = 1, positive: bool = False) -> None:
    """Options that cannot work raise ConfigError before any work: each must be finite and >= minimum (> 0
    when `positive`)."""
    for name in names:
        value = getattr(o, name)
        if not math.isfinite(value) or (value <= 0 if positive else value < minimum):
            bound = "> 0" if positive else f">= {minimum}"
            raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_choice(o: object, name: str, allowed: tuple[str, ...]) -> None:
    """An option with a fixed set of values raises ConfigError before any work when it holds another."""
    value = getattr(o, name)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def local_model_dir(path: str) -> str:
    """`model=`: an existing local model directory (the hub is never reached from here)."""
    if not path:
        raise ConfigError("model= (a local model directory) is required")
    if not Path(path).is_dir():
        raise ConfigError(f"model={path!r} is not a directory (a local model directory is required)")
    return path


def _bright_task(o: CollectionOptions):
    """The BRIGHT domain of `topics` (and `qrels`, when given) without its corpus."""
    from rerankdistill.datasets import load_bright

    if not o.topics:
        raise ConfigError("collection=bright needs topics=")
    return load_bright(o.topics, o.qrels or None)


def load_collection(o: CollectionOptions):
    """(corpus, queries, qrels) for the options' collection."""
    from rerankdistill.datasets import load_beir, load_cranfield
    from rerankdistill.loaders import load_qrels_records, load_texts
    from rerankdistill.trec import read_qrels, read_topics

    if o.collection == "cranfield":
        return load_cranfield(o.path)
    if o.collection == "beir":
        return load_beir(o.path, o.split)
    for name in ("corpus", "topics", "qrels") if o.collection == "datasets" else ("corpus",):
        if o.collection in ("bright", "trec", "datasets") and not getattr(o, name):
            raise ConfigError(f"collection={o.collection} needs {name}=")
    corpus_split = o.corpus_split or None
    if o.collection == "bright":
        task = _bright_task(o)
        return load_texts(o.corpus, "id", "content", None, split=corpus_split), task.queries, task.qrels
    if o.collection == "trec":
        return (
            load_texts(o.corpus, "id", "text", None, split=corpus_split),
            read_topics(o.topics),
            read_qrels(o.qrels),
        )
    if o.collection == "datasets":
        return (
            load_texts(o.corpus, split=corpus_split),
            load_texts(o.topics, title_field=None),
            load_qrels_records(o.qrels),
        )
    raise ConfigError(f"collection must be one of {COLLECTION_HELP}, got {o.collection!r}")


@dataclass
class SplitOptions:
    splits: str = option("", "split file from `rerankdistill split` (train / validation / test qids)")
    queries: str = option(
        "",
        "train | validation | test: the split used (default: train for training commands, test for rerank)",
    )
    allow_test_leak: bool = option(False, "let a training command use test queries (refused otherwise)")


def split_queries(o: SplitOptions, default: str, training: bool) -> tuple[dict | None, set[str] | None]:
    """(the split file's lists or None, the selected qids or None); refuses queries=test for training."""
    from rerankdistill.splits import check_no_test_leak, read_splits, select_split

    splits = read_splits(o.splits) if o.splits else None
    selected = select_split(splits, o.queries, default)
    if training and selected is not None:
        check_no_test_leak(selected, splits, o.allow_test_leak, f"queries={o.queries or default}")
    return splits, selected


def queries_and_qrels(o: CollectionOptions):
    """(queries, qrels) of the collection, without reading BRIGHT's corpus."""
    if o.collection == "bright":
        task = _bright_task(o)
        return task.queries, task.qrels
    return load_collection(o)[1:]


def excluded_ids(o: CollectionOptions) -> dict[str, set[str]]:
    """BRIGHT's per-query excluded document ids (removed from runs before scoring); empty otherwise."""
    if o.collection != "bright":
        return {}
    return _bright_task(o).excluded


def write_pairs(pairs, path: str | Path) -> None:
    write_text_atomic(path, "".join(json.dumps(p.__dict__, ensure_ascii=False) + "\n" for p in pairs))


def read_pairs(path: str | Path) -> list[Pair]:
    from rerankdistill.datasets import read_jsonl
    from rerankdistill.teacher import Pair

    pairs = []
    for no, r in enumerate(read_jsonl(path), start=1):
        missing = [k for k in ("qid", "docid", "query", "document") if k not in r]
        if missing or not isinstance(r["query"], str) or not isinstance(r["document"], str):
            raise ConfigError(
                f"{path}: record {no} needs string fields qid, docid, query, document"
                + (f" (missing {', '.join(missing)})" if missing else "")
            )
        pairs.append(Pair(str(r["qid"]), str(r["docid"]), r["query"], r["document"]))
    return pairs


# --------------------------------------------------------------------------------------------- generate


@dataclass
class GenerateOptions(CollectionOptions, SplitOptions):
    output: str = option("teacher.jsonl", "append-only teacher store (resumed when it exists)")
    pairs: str = option("", "pairs JSONL (qid, docid, query, document); built from the collection when empty")
    pairs_out: str = option("pairs.jsonl", "where pairs built from the collection are written")
    depth: int = option(10, "BM25 candidates per query when building pairs")
    bm25_backend: str = option("bm25s", "bm25s | pyserini (Lucene BM25; needs pyserini and Java 21+)")
    max_queries: int = option(0, "use only the first N queries (0: all)")
    backend: str = option("openai", "openai | transformers | vllm | offline-qrels")
    base_url: str = option("http://127.0.0.1:8000/v1", "OpenAI-compatible server")
    model: str = option("", "model name (openai) or local path (transformers, vllm)")
    name: str = option("", "teacher id stored with each record (default: model)")
    api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the API key")
    concurrency: int = option(8, "requests in flight (openai)")
    batch_size: int = option(8, "prompts per batch (transformers, vllm)")
    max_tokens: int = option(512, "generation budget per answer")
    temperature: float = option(0.0, "0 = greedy (InteRank's teacher)")
    timeout: float = option(120.0, "seconds per request (openai)")
    max_retries: int = option(5, "retries per request (openai)")

    def __post_init__(self) -> None:
        _check(self, "depth", "concurrency", "batch_size", "max_tokens")
        _check(self, "max_queries", "temperature", "max_retries", minimum=0)
        _check(self, "timeout", positive=True)
        _check_choice(self, "backend", ("openai", "transformers", "vllm", "offline-qrels"))


def _build_pairs(o: GenerateOptions):
    from rerankdistill.bm25 import bm25_search
    from rerankdistill.teacher import Pair

    corpus, queries, qrels = load_collection(o)
    _, selected = split_queries(o, "train", training=True)
    if selected is not None:
        queries = {q: t for q, t in queries.items() if q in selected}
    if o.max_queries:
        queries = dict(list(queries.items())[: o.max_queries])
    run = bm25_search(corpus, queries, k=o.depth, backend=o.bm25_backend)
    pairs = [Pair(q, d, queries[q], corpus[d]) for q in queries for d in run[q]]
    return pairs, qrels


def cmd_generate(o: GenerateOptions) -> dict:
    from rerankdistill.teacher import QrelsTeacher, TeacherBackend, TeacherStore, generate_teacher_outputs

    if o.backend in ("transformers", "vllm"):
        local_model_dir(o.model)  # before any pair is built
    qrels = None
    if o.pairs:
        pairs = split_pairs(o, read_pairs(o.pairs), o.pairs)
    else:
        pairs, qrels = _build_pairs(o)
        write_pairs(pairs, o.pairs_out)
    if o.backend == "offline-qrels":
        if qrels is None:
            qrels = load_collection(o)[2]
        backend: TeacherBackend = QrelsTeacher(qrels)
    elif o.backend == "openai":
        from rerankdistill.backends.openai_http import OpenAIChatBackend

        backend = OpenAIChatBackend(
            o.base_url,
            o.model,
            name=o.name or None,
            api_key_env=o.api_key_env,
            temperature=o.temperature,
            max_tokens=o.max_tokens,
            timeout=o.timeout,
            max_retries=o.max_retries,
        )
    elif o.backend == "transformers":
        from rerankdistill.backends.hf import TransformersBackend, load_causal_lm

        model, tok = load_causal_lm(o.model)
        backend = TransformersBackend(
            model,
            tok,
            name=o.name or None,
            max_new_tokens=o.max_tokens,
            temperature=o.temperature,
            batch_size=o.batch_size,
        )
    elif o.backend == "vllm":
        from rerankdistill.backends.vllm import VLLMBackend

        backend = VLLMBackend(
            o.model, name=o.name or None, max_tokens=o.max_tokens, temperature=o.temperature
        )
    else:
        raise ConfigError(f"backend must be openai, transformers, vllm or offline-qrels, got {o.backend!r}")
    with TeacherStore(o.output) as store:
        stats = generate_teacher_outputs(
            pairs, backend, store, concurrency=o.concurrency, batch_size=o.batch_size
        )
    return {"pairs": len(pairs), **{k: v for k, v in stats.__dict__.items() if k != "failures"}}


# ------------------------------------------------------------------------------------------ sft / refine


@dataclass
class TrainOptions(SplitOptions):
    model: str = option("", "student: local model directory")
    pairs: str = option("pairs.jsonl", "pairs JSONL written by `generate`")
    teacher: str = option("teacher.jsonl", "teacher store written by `generate`")
    output_dir: str = option("student", "checkpoints and final/ weights")
    lr: float = option(2e-4, "learning rate")
    epochs: int = option(1, "epochs")
    max_steps: int = option(0, "stop after N optimizer steps (0: no limit)")
    batch_size: int = option(1, "micro-batch size")
    grad_accum: int = option(16, "micro-batches per optimizer step")
    save_every: int = option(50, "optimizer steps between resumable checkpoints")
    completion_only: bool = option(
        True, "learn only the answer tokens (false: the full sequence, as InteRank's release)"
    )
    target_format: str = option(
        "interank",
        "interank: `<explanation> Relevance Label: n ##` | release: the "
        "explanation, then a final line `Relevance Label: n` (InteRank's release)",
    )
    max_length: int = option(2048, "longer examples are dropped (counted)")
    lora_r: int = option(0, "LoRA rank (0: full fine-tuning)")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.1, "LoRA dropout")
    quantize: str = option("", "'nf4' for QLoRA through nf4lora")
    seed: int = option(0, "seed")

    def __post_init__(self) -> None:
        _check(self, "lr", positive=True)
        _check(self, "epochs", "batch_size", "grad_accum", "save_every", "max_length", "lora_alpha")
        _check(self, "max_steps", "lora_r", minimum=0)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check_choice(self, "target_format", tuple(PROMPTS))


@dataclass
class RefineOptions(TrainOptions):
    output_dir: str = option("refined", "checkpoints and final/ weights (never the student's own folder)")
    method: str = option("rwft", "rwft (reward-weighted fine-tuning) | grpo")
    k: int = option(8, "samples per pair (rwft) / group size (grpo)")
    threshold: float = option(0.85, "rwft: keep normalised rewards >= threshold")
    power: float = option(3.0, "rwft: loss weight = r^power")
    weight_by_misclassification: bool = option(False, "rwft: scale weights by the pair's error rate")
    temperature: float = option(1.0, "sampling temperature")
    max_new_tokens: int = option(256, "tokens per sampled answer")
    beta: float = option(0.0, "grpo: KL coefficient to the student as given (TRL's beta, k3 estimator)")
    reward: str = option(
        "label",
        "rwft reward: label (agreement with the teacher's label) | rubric (a judge model "
        "scores each sample on a rubric, as InteRank's release)",
    )
    reward_backend: str = option(
        "openai",
        "rubric judge: openai (reward_base_url, reward_model) | offline (a mechanical stand-in for tests)",
    )
    reward_base_url: str = option("http://127.0.0.1:8000/v1", "rubric judge: OpenAI-compatible server")
    reward_model: str = option("", "rubric judge: model name")
    reward_api_key_env: str = option(
        "OPENAI_API_KEY", "rubric judge: environment variable holding the API key"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "k", "max_new_tokens")
        _check(self, "temperature", positive=True)
        _check(self, "power", "beta", minimum=0)
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold!r}")
        _check_choice(self, "method", ("rwft", "grpo"))
        _check_choice(self, "reward", ("label", "rubric"))
        _check_choice(self, "reward_backend", ("openai", "offline"))
        if self.reward == "rubric" and self.reward_backend == "openai" and not self.reward_model:
            raise ConfigError("reward=rubric with reward_backend=openai needs reward_model=")


def _student(o: TrainOptions):
    from rerankdistill.backends.hf import load_causal_lm
    from rerankdistill.train.common import LoopConfig, LoraSpec

    model, tok = load_causal_lm(local_model_dir(o.model), dtype="float32" if o.quantize == "" else "auto")
    loop = LoopConfig(
        lr=o.lr,
        epochs=o.epochs,
        max_steps=o.max_steps or None,
        batch_size=o.batch_size,
        grad_accum=o.grad_accum,
        save_every=o.save_every,
        seed=o.seed,
    )
    lora = (
        LoraSpec(r=o.lora_r, alpha=o.lora_alpha, dropout=o.lora_dropout, quantize=o.quantize or None)
        if o.lora_r
        else None
    )
    return model, tok, loop, lora


def split_pairs(o: SplitOptions, pairs: list[Pair], pairs_file: str) -> list[Pair]:
    """The pairs of the selected split (train by default); a pairs file holding test qids is refused."""
    from rerankdistill.splits import check_no_test_leak

    splits, selected = split_queries(o, "train", training=True)
    check_no_test_leak((p.qid for p in pairs), splits, o.allow_test_leak, f"pairs file {pairs_file!r}")
    return pairs if selected is None else [p for p in pairs if p.qid in selected]


def prompt_format(name: str):
    """The versioned prompt of `target_format` / `prompt_format`."""
    from rerankdistill.labels import PROMPTS

    if name not in PROMPTS:
        raise ConfigError(f"prompt format must be one of {', '.join(PROMPTS)}, got {name!r}")
    return PROMPTS[name]


def _teacher_records(o: TrainOptions):
    from rerankdistill.teacher import TeacherStore

    pairs = {(p.qid, p.docid): p for p in split_pairs(o, read_pairs(o.pairs), o.pairs)}
    # read without the writer's lock: every process of `accelerate launch` reads the finished store
    return pairs, list(TeacherStore.read(o.teacher).values())


def cmd_sft(o: TrainOptions) -> dict:
    from rerankdistill.train.sft import distill_examples, sft

    prompt = prompt_format(o.target_format)
    pairs, records = _teacher_records(o)
    examples, counts = distill_examples(records, pairs, prompt)
    model, tok, loop, lora = _student(o)
    result = sft(
        model.train(),
        tok,
        examples,
        o.output_dir,
        loop=loop,
        lora=lora,
        completion_only=o.completion_only,
        max_length=o.max_length,
        prompt=prompt,
    )
    return {**counts, **result.stats, "final": str(result.final_dir)}


def rubric_reward_model(o: RefineOptions):
    """The rubric reward model of `reward=rubric` (None for `reward=label`)."""
    from rerankdistill.reward_model import OfflineRubricJudge, RubricRewardModel

    if o.reward == "label":
        return None
    if o.reward_backend == "offline":
        return RubricRewardModel(OfflineRubricJudge())
    from rerankdistill.backends.openai_http import OpenAIChatBackend

    return RubricRewardModel(
        OpenAIChatBackend(
            o.reward_base_url,
            o.reward_model,
            api_key_env=o.reward_api_key_env,
            temperature=0.0,
            max_tokens=16,
        )
    )


def cmd_refine(o: RefineOptions) -> dict:
    from rerankdistill.train.rwft import RefinePair

    pairs, records = _teacher_records(o)
    refine = [
        RefinePair(pairs[(r.qid, r.docid)].query, pairs[(r.qid, r.docid)].document, r.label, r.text)
        for r in records
        if r.label is not None and (r.qid, r.docid) in pairs
    ]
    model, tok, loop, lora = _student(o)
    if o.method == "rwft":
        from rerankdistill.train.rwft import reward_weighted_finetune

        judge = rubric_reward_model(o)
        result = reward_weighted_finetune(
            model,
            tok,
            refine,
            o.output_dir,
            k=o.k,
            threshold=o.threshold,
            power=o.power,
            weight_by_misclassification=o.weight_by_misclassification,
            temperature=o.temperature,
            max_new_tokens=o.max_new_tokens,
            loop=loop,
            lora=lora,
            completion_only=o.completion_only,
            max_length=o.max_length,
            reward_model=judge,
            prompt=prompt_format(o.target_format),
        )
        if judge is not None:
            result.stats["judge_unparseable"] = float(judge.unparseable)
    elif o.method == "grpo":
        from rerankdistill.train.grpo import grpo

        result = grpo(
            model,
            tok,
            refine,
            o.output_dir,
            max_steps=o.max_steps or 100,
            num_generations=o.k,
            max_completion_length=o.max_new_tokens,
            learning_rate=o.lr,
            beta=o.beta,
            temperature=o.temperature,
            lora=lora,
            seed=o.seed,
            save_every=o.save_every,
            prompt=prompt_format(o.target_format),
        )
    else:
        raise ConfigError(f"method must be rwft or grpo, got {o.method!r}")
    return {"pairs": len(refine), **result.stats, "final": str(result.final_dir)}


# ------------------------------------------------------------------------------------- rerank / evaluate


@dataclass
class RerankOptions(CollectionOptions, SplitOptions):
    model: str = option("", "reranker: local model directory")
    first_stage: str = option("bm25", "'bm25' or a TREC run file")
    first_stage_queries: str = option(
        "original",
        "bm25 over the original queries or (bright) 'reasoning': "
        "BRIGHT's GPT-4 reasoning texts; the reranker sees the original",
    )
    bm25_backend: str = option("bm25s", "first_stage=bm25 with bm25s | pyserini (Lucene; needs Java 21+)")
    depth: int = option(100, "candidates reranked per query")
    max_queries: int = option(0, "use only the first N queries (0: all)")
    batch_size: int = option(8, "pairs per forward/generate batch")
    max_new_tokens: int = option(256, "explanation budget")
    label_probabilities: bool = option(
        True, "score by E[label] (else the parsed label, as InteRank's release)"
    )
    prompt_format: str = option(
        "interank", "the student's answer format: interank | release (see sft's target_format)"
    )
    judgements: str = option("judgements.jsonl", "resumable store of explanations/labels")
    output: str = option("reranked.run", "TREC run written")
    first_stage_output: str = option("bm25.run", "the first-stage run, written when computed here")
    tag: str = option("rerankdistill", "run tag")

    def __post_init__(self) -> None:
        _check(self, "depth", "batch_size", "max_new_tokens")
        _check(self, "max_queries", minimum=0)
        _check_choice(self, "first_stage_queries", ("original", "reasoning"))
        _check_choice(self, "prompt_format", tuple(PROMPTS))


def first_stage_texts(o: RerankOptions, queries: dict[str, str]) -> dict[str, str]:
    """The texts BM25 searches with: the queries, or BRIGHT's reasoning texts for them."""
    if o.first_stage_queries == "original":
        return queries
    if o.first_stage_queries != "reasoning":
        raise ConfigError(f"first_stage_queries must be original or reasoning, got {o.first_stage_queries!r}")
    if o.collection != "bright":
        raise ConfigError(
            "first_stage_queries=reasoning needs collection=bright (its topics hold the reasoning)"
        )
    reasoning = _bright_task(o).reasoning
    missing = [q for q in queries if not reasoning.get(q)]
    if missing:
        raise ConfigError(
            f"topics {o.topics!r}: {len(missing)} queries have no reasoning text, e.g. {missing[:5]}"
        )
    return {q: reasoning[q] for q in queries}


def cmd_rerank(o: RerankOptions) -> dict:
    from rerankdistill.backends.hf import TransformersBackend, load_causal_lm
    from rerankdistill.bm25 import bm25_search
    from rerankdistill.datasets import drop_excluded
    from rerankdistill.metrics import comparison_table
    from rerankdistill.rerank import TransformersJudge, rerank
    from rerankdistill.teacher import TeacherStore
    from rerankdistill.trec import read_run, sorted_ranking, write_run

    local_model_dir(o.model)
    corpus, queries, qrels = load_collection(o)
    _, selected = split_queries(o, "test", training=False)
    if selected is not None:
        queries = {q: t for q, t in queries.items() if q in selected}
        qrels = {q: j for q, j in qrels.items() if q in selected}
    if o.max_queries:
        queries = dict(list(queries.items())[: o.max_queries])
    excluded = excluded_ids(o)  # BRIGHT: never ranked, so never scored
    if o.first_stage == "bm25":
        search = first_stage_texts(o, queries)
        first = drop_excluded(bm25_search(corpus, search, k=o.depth + 50, backend=o.bm25_backend), excluded)
        first = {q: dict(sorted_ranking(d)[: o.depth]) for q, d in first.items()}
        write_run(first, o.first_stage_output, tag="bm25" if search is queries else "bm25-reasoning")
    else:
        first = drop_excluded({q: d for q, d in read_run(o.first_stage).items() if q in queries}, excluded)
        first = {q: dict(sorted_ranking(d)[: o.depth]) for q, d in first.items()}
    model, tok = load_causal_lm(o.model)
    prompt = prompt_format(o.prompt_format)
    backend = TransformersBackend(
        model, tok, max_new_tokens=o.max_new_tokens, batch_size=o.batch_size, stop=prompt.stop
    )
    judge = TransformersJudge(backend, prompt=prompt, use_label_probabilities=o.label_probabilities)
    with TeacherStore(o.judgements) as store:
        result = rerank(first, queries, corpus, judge, k=o.depth, batch_size=o.batch_size, store=store)
    write_run(result.run, o.output, tag=o.tag)
    print(comparison_table({"first stage": first, "reranked": result.run}, qrels), end="")
    return {
        "queries": len(first),
        "judged": result.judged,
        "cached": result.cached,
        "unparseable": result.unparseable,
        "first_stage_queries": o.first_stage_queries,
        "output": o.output,
    }


@dataclass
class EvaluateOptions(CollectionOptions, SplitOptions):
    runs: list[str] = option(default_factory=list, help="run files, NAME=PATH or PATH, comma separated")
    measures: list[str] = option(
        default_factory=lambda: ["ndcg_cut_10", "map", "recall_100"], help="trec_eval measure names"
    )
    per_query: bool = option(False, "also print per-query values")
    output: str = option("", "write the markdown table here too")
    baseline: str = option("", "run the others are compared with by paired tests (default: the first)")
    significance: bool = option(True, "paired t-test, randomization test and bootstrap CI against baseline")
    n_resamples: int = option(10000, "randomization / bootstrap resamples")
    seed: int = option(0, "seed of the randomization / bootstrap resamples")

    def __post_init__(self) -> None:
        _check(self, "n_resamples")
        if not self.measures:
            raise ConfigError("measures= is empty: name at least one trec_eval measure")


def _run_files(o: EvaluateOptions) -> dict[str, str]:
    """{run name: path} of `runs=` (NAME=PATH or PATH, named by its file name), checked before any work."""
    if not o.runs:
        raise ConfigError("runs= is required (NAME=PATH,...)")
    files: dict[str, str] = {}
    for item in o.runs:
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else (Path(item).name, item)
        if name in files:
            raise ConfigError(f"runs: two runs are named {name!r}; name them NAME=PATH")
        files[name] = path
    if "significance" in files:
        raise ConfigError("a run may not be named 'significance' (the summary's key for the paired tests)")
    if o.baseline and o.baseline not in files:
        raise ConfigError(f"baseline={o.baseline!r} is not one of the runs: {', '.join(files)}")
    return files


def _evaluation_qrels(o: EvaluateOptions):
    """The judgements runs are scored against, restricted to the selected split's queries."""
    from rerankdistill.trec import read_qrels

    if not o.collection and not o.qrels:
        raise ConfigError(f"evaluate needs qrels= (a TREC qrels file) or collection= ({COLLECTION_HELP})")
    if o.collection == "bright":  # judgements only: no corpus needed to score runs
        qrels = _bright_task(o).qrels
    elif o.qrels and o.collection in ("", "trec"):
        qrels = read_qrels(o.qrels)
    else:
        qrels = load_collection(o)[2]
    _, selected = split_queries(o, "test", training=False)
    if selected is not None:
        qrels = {q: j for q, j in qrels.items() if q in selected}
    return qrels


def cmd_evaluate(o: EvaluateOptions) -> dict:
    from rerankdistill.datasets import drop_excluded
    from rerankdistill.metrics import comparison_table, evaluate
    from rerankdistill.trec import read_run

    files = _run_files(o)
    qrels = _evaluation_qrels(o)
    excluded = excluded_ids(o)
    runs = {name: drop_excluded(read_run(path), excluded) for name, path in files.items()}
    table = comparison_table(runs, qrels, tuple(o.measures))
    print(table, end="")
    if o.per_query:
        for name, run in runs.items():
            for m, score in evaluate(run, qrels, tuple(o.measures)).items():
                for qid, v in score.per_query.items():
                    print(f"{name}\t{m}\t{qid}\t{v:.4f}")
    summary: dict = {
        name: {m: float(v) for m, v in evaluate(r, qrels, tuple(o.measures)).items()}
        for name, r in runs.items()
    }
    if o.significance and len(runs) > 1:
        rows = significance_rows(runs, qrels, o)
        text = significance_table(rows, o.baseline or next(iter(runs)))
        print(text, end="")
        table += "\n" + text
        summary["significance"] = rows
    if o.output:
        write_text_atomic(o.output, table)
    return summary


def significance_rows(runs: dict, qrels, o: EvaluateOptions) -> list[dict]:
    """Each run against the baseline, per measure, paired over the judged queries that any run ranks (a
    query a run misses scores 0 there, as trec_eval -c scores it, so both sides hold the same queries)."""
    from rerankdistill.metrics import evaluate
    from shared_kernels.significance import compare_runs

    baseline = o.baseline or next(iter(runs))
    if baseline not in runs:
        raise ConfigError(f"baseline={baseline!r} is not one of the runs: {', '.join(runs)}")
    ranked = {q: j for q, j in qrels.items() if any(q in r for r in runs.values())}
    scores = {name: evaluate(r, ranked, tuple(o.measures), complete=True) for name, r in runs.items()}
    return [
        {
            "run": name,
            "baseline": baseline,
            "measure": m,
            **compare_runs(
                scores[name][m].per_query,
                scores[baseline][m].per_query,
                n_resamples=o.n_resamples,
                seed=o.seed,
            ),
        }
        for name in runs
        if name != baseline
        for m in o.measures
    ]


def significance_table(rows: list[dict], baseline: str) -> str:
    lines = [
        f"paired tests against {baseline} (judged queries ranked by any run; 95% bootstrap CI of the mean "
        "difference)",
        "| run | measure | queries | diff | 95% CI | t-test p | randomization p |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['run']} | {r['measure']} | {r['queries']} | {r['mean_diff']:+.4f} | "
        f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['p_t']:.4f} | {r['p_randomization']:.4f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


@dataclass
class SplitCommandOptions(CollectionOptions):
    out: str = option("splits.json", "split file written (JSON: train / validation / test qid lists)")
    validation: float = option(
        0.1, "share of the queries for validation (of the non-test ones with test_qids)"
    )
    test: float = option(0.2, "share of the queries for test (unused with test_qids)")
    seed: int = option(0, "seed of the shuffle")
    test_qids: str = option("", "a given test set: a file of qids, one per line")
    overwrite: bool = option(False, "replace an existing, different split file")


def cmd_split(o: SplitCommandOptions) -> dict:
    from rerankdistill.splits import make_splits

    queries, qrels = queries_and_qrels(o)
    judged = [q for q in queries if qrels.get(q)]  # a query without judgements cannot be evaluated
    given = None
    if o.test_qids:
        path = Path(o.test_qids)
        if not path.is_file():
            raise ConfigError(f"test_qids file {o.test_qids!r} does not exist")
        given = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    splits = make_splits(judged, o.validation, o.test, o.seed, given)
    text = (
        json.dumps(
            {
                **splits,
                "collection": o.collection,
                "seed": o.seed,
                "validation_share": o.validation,
                "test_share": None if given else o.test,
                "test_qids": o.test_qids or None,
            },
            indent=1,
        )
        + "\n"
    )
    out = Path(o.out)
    if out.exists() and out.read_text(encoding="utf-8") != text and not o.overwrite:
        raise ConfigError(
            f"out={o.out!r} exists with other splits: runs made with it would change meaning; "
            "choose another file or set overwrite=true"
        )
    write_text_atomic(out, text)
    return {name: len(qids) for name, qids in splits.items()} | {
        "unjudged_skipped": len(queries) - len(judged),
        "out": o.out,
    }


COMMANDS: dict[str, tuple[type, Callable[[Any], dict], str]] = {
    "split": (SplitCommandOptions, cmd_split, "seeded (or given) train / validation / test query lists"),
    "generate": (GenerateOptions, cmd_generate, "teacher explanations + labels for (query, document) pairs"),
    "sft": (TrainOptions, cmd_sft, "distil teacher outputs into a student"),
    "refine": (RefineOptions, cmd_refine, "reward-weighted fine-tuning or GRPO of the student"),
    "rerank": (RerankOptions, cmd_rerank, "rerank first-stage candidates pointwise; write a TREC run"),
    "evaluate": (EvaluateOptions, cmd_evaluate, "nDCG@10 / MAP / Recall of runs against qrels (trec_eval)"),
}


# Options a command writes and options it reads: no output may be (or, for a folder, hold) an input file.
OUTPUT_OPTIONS = ("pairs_out", "output", "first_stage_output", "judgements", "out", "output_dir")
INPUT_OPTIONS = ("path", "topics", "qrels", "corpus", "pairs", "teacher", "splits", "model", "first_stage")


def _check_outputs(options: object) -> None:
    fields = vars(options)
    inputs = {name: fields[name] for name in INPUT_OPTIONS if isinstance(fields.get(name), str)}
    for i, run in enumerate(fields.get("runs") or []):
        inputs[f"runs[{i}]"] = str(run).split("=", 1)[-1]
    refuse_overwriting_inputs(
        {name: fields[name] for name in OUTPUT_OPTIONS if isinstance(fields.get(name), str)}, inputs
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rerankdistill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=text,
            description=text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="options (YAML keys or key=value):\n" + options_help(cls),
        )
        p.add_argument("--config", type=Path, default=None, help="YAML file of options")
        p.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cls, fn, _ = COMMANDS[args.command]
    try:
        options: object = load_config(cls, args.config, args.overrides)
        _check_outputs(options)
        summary = fn(options)
    except (*USER_ERRORS, ValueError) as e:  # library input checks raise ValueError naming the argument
        print(f"rerankdistill {args.command}: error: {user_error_message(e)}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
