"""The pipeline's building blocks, each a thin call into a package: task loading, the built-in tiny base
model, quantization (nf4lora), attention (siattn), MXFP8 LoRA GEMMs (mxfp8train), teacher labels and
distillation examples (rerankdistill)."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rerank_qlora.config import RerankConfig, RerankQLoRAConfig, TaskConfig
from rerank_qlora.stdlib_task import RetrievalTask, build_stdlib_task
from shared_kernels.errors import UserError
from shared_kernels.runconfig import ConfigError


class StageUnavailable(UserError, RuntimeError):
    """A stage needs a package API that this installation does not provide (the message says which)."""


# ------------------------------------------------------------------------------------------------- task
def load_task(cfg: TaskConfig) -> RetrievalTask:
    """The retrieval task: the built-in stdlib task, a BEIR / Cranfield collection split by query, or a BRIGHT
    domain evaluated zero-shot (`bright_zero_shot`)."""
    if cfg.name == "stdlib":
        return build_stdlib_task(
            max_train_queries=cfg.max_train_queries,
            max_eval_queries=cfg.max_eval_queries,
            max_validation_queries=cfg.max_validation_queries,
        )
    if cfg.name == "bright":
        return bright_zero_shot(cfg)
    import rerankdistill as rd

    corpus, queries, qrels = rd.load_beir(cfg.path) if cfg.name == "beir" else rd.load_cranfield(cfg.path)
    qids = sorted(q for q in queries if q in qrels)
    random.Random(cfg.seed).shuffle(qids)
    n_eval = max(1, int(len(qids) * cfg.eval_fraction))
    n_val = int(len(qids) * cfg.validation_fraction)
    eval_qids = qids[:n_eval][: cfg.max_eval_queries]
    validation_qids = qids[n_eval : n_eval + n_val][: cfg.max_validation_queries]
    train_qids = qids[n_eval + n_val :][: cfg.max_train_queries]
    return RetrievalTask(
        cfg.name,
        dict(corpus),
        dict(queries),
        {q: dict(qrels[q]) for q in qids},
        train_qids,
        eval_qids,
        info={"source": str(cfg.path)},
        validation_qids=validation_qids,
    )


def bright_zero_shot(cfg: TaskConfig) -> RetrievalTask:
    """BRIGHT as in the paper: every judged query of the domain is evaluated, zero-shot. Training and
    validation queries (the fusion weight and BM25 k1/b are chosen on the latter) come from
    `cfg.train_source`, whose own evaluation queries are dropped; the domain's documents (`cfg.corpus_path`)
    are kept apart, so a BRIGHT query's candidates are BRIGHT documents without its excluded ids, and no
    training query searches them.

    Raises:
        ConfigError: the training source shares query or document ids with the domain, or
            `cfg.max_eval_queries` would leave some of the domain's queries out.
    """
    import rerankdistill as rd

    domain = rd.load_bright(
        Path(cfg.path) / f"topics.bright-{cfg.domain}-original.jsonl.gz",
        Path(cfg.path) / f"qrels.bright-{cfg.domain}.txt",
        corpus=cfg.corpus_path,
    )
    corpus = domain.corpus or {}
    eval_qids = sorted(q for q in domain.queries if q in domain.qrels)
    if len(eval_qids) > cfg.max_eval_queries:
        raise ConfigError(
            f"task.max_eval_queries={cfg.max_eval_queries} would leave out some of BRIGHT "
            f"{cfg.domain}'s {len(eval_qids)} queries: BRIGHT is evaluated on every query"
        )
    if cfg.train_source == "stdlib":
        source = build_stdlib_task(
            max_train_queries=cfg.max_train_queries,
            max_eval_queries=1,
            max_validation_queries=cfg.max_validation_queries,
            splits=("train", "validation"),
        )
    else:
        source = load_task(
            replace(
                cfg,
                name=cfg.train_source,
                path=cfg.train_path,
                train_path=None,
                first_stage_queries="original",
            )
        )
    source_qids = set(source.queries)
    shared_queries = sorted(source_qids & set(domain.queries))
    if shared_queries:
        raise ConfigError(
            f"task.train_source={cfg.train_source!r} shares query ids with BRIGHT {cfg.domain} "
            f"(e.g. {shared_queries[:3]}): training or tuning on the evaluation domain's queries "
            "is not zero-shot"
        )
    shared_docs = sorted(set(source.corpus) & set(corpus))
    if shared_docs:
        raise ConfigError(
            f"task.train_source={cfg.train_source!r} and task.corpus_path {str(cfg.corpus_path)!r} "
            f"share document ids (e.g. {shared_docs[:3]})"
        )
    search = {}
    if cfg.first_stage_queries == "reasoning":
        missing = [q for q in eval_qids if not domain.reasoning.get(q)]
        if missing:
            raise ConfigError(
                f"task.first_stage_queries='reasoning': {len(missing)} BRIGHT {cfg.domain} queries "
                f"have no reasoning text, e.g. {missing[:3]}"
            )
        search = {q: domain.reasoning[q] for q in eval_qids}
    kept = source.train_qids + source.validation_qids
    return RetrievalTask(
        "bright",
        {**source.corpus, **corpus},
        {**{q: source.queries[q] for q in kept}, **domain.queries},
        {**{q: source.qrels[q] for q in kept}, **{q: dict(domain.qrels[q]) for q in eval_qids}},
        list(source.train_qids),
        eval_qids,
        validation_qids=list(source.validation_qids),
        train_docids=list(source.train_docids),
        eval_docids=sorted(corpus),
        excluded={q: set(domain.excluded.get(q, ())) for q in eval_qids},
        search_queries=search,
        info={
            "source": str(cfg.path),
            "domain": cfg.domain,
            "train_source": source.info.get("source", source.name),
            "first_stage_queries": cfg.first_stage_queries,
        },
    )


def _search_groups(task: RetrievalTask) -> list[tuple[dict[str, str], dict[str, str]]]:
    """(documents, query texts) each first stage searches: the whole corpus for every query, or, with
    `task.eval_docids`, the non-evaluation queries over the other documents (first: validation is chosen
    there) and the evaluation queries over those documents."""
    texts = {q: task.search_queries.get(q, t) for q, t in task.queries.items()}
    if not task.eval_docids:
        return [(task.corpus, texts)]
    held, evaluated = set(task.eval_docids), set(task.eval_qids)
    return [
        (
            {d: t for d, t in task.corpus.items() if d not in held},
            {q: t for q, t in texts.items() if q not in evaluated},
        ),
        ({d: task.corpus[d] for d in task.eval_docids}, {q: texts[q] for q in task.eval_qids}),
    ]


def first_stages(task: RetrievalTask, cfg: RerankConfig) -> dict[str, Any]:
    """Both first stages over every query of the task, `cfg.candidates` deep: plain BM25 (bm25s's tokenizer,
    Anserini's k1 0.9 / b 0.4) and identifier-aware BM25 (rerankdistill.code_tokens; k1/b given, or chosen on
    the validation queries' nDCG@10, else 0.9 / 0.4).

    Returns:
        {"plain": run, "code": run, "k1": k1, "b": b, "chosen": how k1/b were set}.
    """
    from rerankdistill import BM25Index, IdentifierTokenizer, bm25_search, select_bm25_params
    from rerankdistill.datasets import drop_excluded

    groups = _search_groups(task)
    plain = {q: r for docs, texts in groups for q, r in bm25_search(docs, texts, k=cfg.candidates).items()}
    tokenizer = IdentifierTokenizer(
        stopwords=None if cfg.bm25_stopwords == "none" else cfg.bm25_stopwords,
        stemmer=None if cfg.bm25_stemmer == "none" else cfg.bm25_stemmer,
    )
    tokens = {d: tokenizer(t) for d, t in task.corpus.items()}
    k1, b, chosen = cfg.bm25_k1, cfg.bm25_b, "given"
    if (k1 is None or b is None) and task.validation_qids:
        grid = {"k1s": (k1,) if k1 is not None else None, "bs": (b,) if b is not None else None}
        docs, texts = groups[0]
        k1, b, _ = select_bm25_params(
            docs,
            {q: texts[q] for q in task.validation_qids},
            task.qrels,
            tokenizer,
            **{key: v for key, v in grid.items() if v is not None},
        )
        chosen = f"chosen on {len(task.validation_qids)} validation queries"
    elif k1 is None or b is None:
        k1, b, chosen = (
            k1 if k1 is not None else 0.9,
            b if b is not None else 0.4,
            "defaults (no validation queries)",
        )
    code = {}
    for docs, texts in groups:
        index = BM25Index(
            docs, k1=k1, b=b, stopwords=None, tokenizer=tokenizer, tokens={d: tokens[d] for d in docs}
        )
        code.update(index.search(texts, k=cfg.candidates))
    return {
        "plain": drop_excluded(plain, task.excluded),
        "code": drop_excluded(code, task.excluded),
        "k1": k1,
        "b": b,
        "chosen": chosen,
    }


# ------------------------------------------------------------------------------------------ base model
def build_tiny_base(
    task: RetrievalTask, cfg: RerankQLoRAConfig, out_dir: Path, progress: bool
) -> tuple[Any, Any]:
    """Train a BPE tokenizer on the task's text and a small Llama on its documents (language modelling),
    save both to `out_dir` (safetensors) and return them. Deterministic for a given seed and task."""
    from rerankdistill.labels import INTERANK_PROMPT
    from rerankdistill.teacher import QrelsTeacher
    from shared_kernels.testing.tiny_lm import tiny_causal_lm, train_tokenizer

    m = cfg.model
    # Only training text: the training modules' documents (the judged documents of the training queries when
    # the task does not say which documents are training ones) and the training queries.
    train_docs = sorted(task.train_docids or {d for q in task.train_qids for d in task.qrels[q]})
    texts = [task.corpus[d] for d in train_docs] + [task.queries[q] for q in task.train_qids]
    # The prompt and the offline teacher's answers are in every training and evaluation sequence: weighted
    # like that, BPE merges them into few tokens (~250 tokens of template otherwise, at vocabulary 1,024).
    teacher = QrelsTeacher({}, explanation=cfg.teacher.offline_explanation)
    template = [
        INTERANK_PROMPT.system,
        INTERANK_PROMPT.user.format(query="", document=""),
        *(INTERANK_PROMPT.completion(teacher.explanation(label), label) for label in (0, 1, 2)),
    ]
    texts += template * 200
    tokenizer = train_tokenizer(texts, vocab_size=m.tiny_vocab_size)
    long_context = cfg.train.max_length * cfg.attention.context_factor * 2
    model = tiny_causal_lm(
        tokenizer=tokenizer,
        seed=cfg.train.seed,
        hidden_size=m.tiny_hidden_size,
        num_layers=m.tiny_layers,
        num_heads=m.tiny_heads,
        num_kv_heads=max(1, m.tiny_heads // 2),
        max_position_embeddings=long_context,
    )
    # Language-model the training documents (the held-out modules' documents are not seen here).
    # Each document is followed by one of the template texts (prompt or a teacher answer, no document-label
    # pairing): their merged tokens get trained embeddings, which the frozen embedding/LM head of a LoRA
    # student needs (without it distillation plateaued at ~2.7 nats/token).
    stream: list[int] = []
    for i, docid in enumerate(train_docs):
        stream += tokenizer(task.corpus[docid])["input_ids"] + [tokenizer.eos_token_id]
        stream += tokenizer(template[i % len(template)])["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor(stream)
    T = m.tiny_pretrain_seq_len
    if m.tiny_pretrain_steps and len(ids) > T + 1:
        gen = torch.Generator().manual_seed(cfg.train.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        model.train()
        bar = tqdm(range(m.tiny_pretrain_steps), desc="base LM pretraining", disable=not progress)
        for step in bar:
            starts = torch.randint(0, len(ids) - T - 1, (8,), generator=gen)
            batch = torch.stack([ids[s : s + T] for s in starts])
            for g in opt.param_groups:
                g["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return model, tokenizer


def load_base(path: str | Path, cfg: RerankQLoRAConfig) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a local directory or a Hugging Face id (no remote code by
    default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.model.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dtype = "auto" if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
    )
    return model, tok


# ----------------------------------------------------------------------------------- model transforms
def apply_attention(model: Any, cfg: RerankQLoRAConfig) -> str:
    """Switch the model to scale-invariant p-RoPE attention (siattn.hf.apply); returns a description."""
    a = cfg.attention
    if a.kind == "native":
        return "the model's own attention"
    from siattn import hf as siattn_hf

    siattn_hf.apply(model, tau=a.tau, rope="p-rope", fraction=a.p_rope_fraction, base=a.p_rope_base)
    return (
        f"scale-invariant p-RoPE (tau {a.tau}, p-RoPE fraction {a.p_rope_fraction}, base {a.p_rope_base:g})"
    )


def apply_qlora(model: Any, cfg: RerankQLoRAConfig) -> tuple[Any, str]:
    """NF4 (+ double quantization) base and LoRA adapters through nf4lora.prepare_model, or plain peft
    LoRA."""
    lo = cfg.lora
    if cfg.quant.method == "nf4":
        from nf4lora.model import prepare_model

        model = prepare_model(
            model,
            r=lo.r,
            alpha=lo.alpha,
            dropout=lo.dropout,
            target_modules=list(lo.target_modules),
            double_quant=cfg.quant.double_quant,
            gradient_checkpointing=cfg.quant.gradient_checkpointing,
            seed=cfg.train.seed,
        )
        double = " + double quantization" if cfg.quant.double_quant else ""
        what = f"NF4{double} base, LoRA r={lo.r} alpha={lo.alpha}"
    else:
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in lo.target_modules if t in present]
        if not targets:
            raise ValueError(f"lora.target_modules {lo.target_modules} match no module of the model")
        model = get_peft_model(
            model,
            LoraConfig(
                r=lo.r,
                lora_alpha=lo.alpha,
                lora_dropout=lo.dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
        what = f"unquantized base, LoRA r={lo.r} alpha={lo.alpha}"
    if lo.mxfp8:
        import mxfp8train

        recipe = mxfp8train.PAPER_RECIPE.replace(skip_modules=(), track_stats=True)
        mxfp8train.convert(model, recipe, filter_fn=lambda name, _: "lora_" in name)
        n = len(mxfp8train.mx_layers(model))
        if n == 0:
            raise StageUnavailable("lora.mxfp8=true found no LoRA nn.Linear to convert in this model")
        what += f", {n} LoRA GEMM layers in MXFP8 (RCEIL, E4M3)"
    return model, what


def trainable_summary(model: Any) -> str:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    return f"{n_train:,} trainable of {n_all:,} parameters"


# -------------------------------------------------------------------------------------- teacher + data
def training_pairs(
    task: RetrievalTask,
    first_stage: dict[str, dict[str, float]],
    per_query: int,
    strategy: str = "gold-first",
) -> list:
    """Training pairs of each training query (at most `per_query`, or `per_query` + 1, see below).

    Args:
        strategy: "gold-first": the judged documents (best first), then BM25's unjudged ones as hard
            negatives; "bm25": BM25's top `per_query` as ranked, whatever their judgements (the distribution
            the reranker sees at evaluation), plus the best judged document when BM25 missed it.
    """
    from rerankdistill.teacher import Pair
    from rerankdistill.trec import sorted_ranking

    if strategy not in ("gold-first", "bm25"):
        raise ValueError(f"strategy must be 'gold-first' or 'bm25', got {strategy!r}")
    pairs = []
    for qid in task.train_qids:
        gold = sorted(task.qrels[qid], key=lambda d: -task.qrels[qid][d])
        ranked = [d for d, _ in sorted_ranking(first_stage.get(qid, {}))]
        if strategy == "gold-first":
            chosen = (gold + [d for d in ranked if d not in task.qrels[qid]])[:per_query]
        else:
            chosen = ranked[:per_query]
            if gold and gold[0] not in chosen:
                chosen.append(gold[0])
        pairs += [Pair(qid, d, task.queries[qid], task.corpus[d]) for d in chosen]
    return pairs


def make_teacher(cfg: RerankQLoRAConfig, task: RetrievalTask):
    """The teacher backend: rerankdistill's OFFLINE qrels stand-in (labelled as such) or an HTTP server."""
    t = cfg.teacher
    if t.kind == "offline-qrels":
        from rerankdistill.teacher import QrelsTeacher

        return QrelsTeacher(task.qrels, explanation=t.offline_explanation)
    from rerankdistill.backends.openai_http import OpenAIChatBackend

    return OpenAIChatBackend(t.base_url, t.model, api_key_env=t.api_key_env)
