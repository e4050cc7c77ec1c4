"""The rerank-qlora run config. The defaults ARE the embedded offline demo (`uv run rerank-qlora`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared_kernels.runconfig import option


@dataclass
class ModelConfig:
    name_or_path: str = option(
        "tiny", "'tiny' (built in: tokenizer + small Llama trained here), a local path or HF id"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "float32", "compute dtype of a loaded model"
    )
    trust_remote_code: bool = option(False, "allow model code from the model's repository")
    tiny_vocab_size: int = option(1024, "tiny: BPE vocabulary trained on the task's text")
    tiny_hidden_size: int = option(128, "tiny: width")
    tiny_layers: int = option(2, "tiny: decoder layers")
    tiny_heads: int = option(4, "tiny: attention heads (2 KV heads)")
    tiny_pretrain_steps: int = option(
        60, "tiny: language-model steps on the task's documents before quantization"
    )
    tiny_pretrain_seq_len: int = option(128, "tiny: context of those steps (tokens)")

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("model.name_or_path must not be empty")
        if self.tiny_pretrain_steps < 0:
            raise ValueError(f"model.tiny_pretrain_steps must be >= 0, got {self.tiny_pretrain_steps}")
        for name in (
            "tiny_vocab_size",
            "tiny_hidden_size",
            "tiny_layers",
            "tiny_heads",
            "tiny_pretrain_seq_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        heads, kv_heads = self.tiny_heads, max(1, self.tiny_heads // 2)
        if self.tiny_hidden_size % heads or (self.tiny_hidden_size // heads) % 2 or heads % kv_heads:
            raise ValueError(
                f"model.tiny_heads ({heads}) must divide model.tiny_hidden_size "
                f"({self.tiny_hidden_size}) into an even head dim (RoPE pairs), and be 1 or even "
                f"(its {kv_heads} KV heads must divide it)"
            )


@dataclass
class TaskConfig:
    name: Literal["stdlib", "beir", "bright", "cranfield"] = option(
        "stdlib",
        "stdlib (built from the Python standard library), beir (folder), bright (topics + corpus), cranfield",
    )
    path: Path | None = option(
        None, "data folder (beir: corpus.jsonl/queries.jsonl/qrels; cranfield: SMART files)"
    )
    corpus_path: Path | None = option(
        None, "bright: the corpus JSONL (BRIGHT's corpus is not in its topics file)"
    )
    domain: str = option("biology", "bright: the domain")
    train_source: str = option(
        "stdlib",
        "bright: where training and validation queries come from (stdlib, beir or cranfield; BRIGHT "
        "is evaluated zero-shot on every query of the domain, as in the paper)",
    )
    train_path: Path | None = option(None, "bright: the training source's data folder (beir, cranfield)")
    first_stage_queries: Literal["original", "reasoning"] = option(
        "original",
        "bright: BM25 searches with the original queries or BRIGHT's GPT-4 reasoning texts (the "
        "reranker still sees the original query)",
    )
    eval_fraction: float = option(
        0.25, "beir/cranfield (and bright's training source): share of queries held out for evaluation"
    )
    validation_fraction: float = option(
        0.1,
        "beir/cranfield (and bright's training source): share of queries held out for validation (the fusion "
        "weight is chosen there)",
    )
    max_train_queries: int = option(5000, "cap on training queries (the stdlib task mines 2,180)")
    max_eval_queries: int = option(500, "cap on evaluation queries")
    max_validation_queries: int = option(
        200, "cap on validation queries (0: none: no fusion weight search, BM25 k1/b at their defaults)"
    )
    seed: int = option(0, "seed of the query split")

    def __post_init__(self) -> None:
        if self.name in ("beir", "cranfield", "bright") and self.path is None:
            raise ValueError(f"task.path is required for task.name={self.name!r}")
        if self.name == "bright" and self.corpus_path is None:
            raise ValueError(
                "task.corpus_path is required for task.name='bright' (its topics hold no documents)"
            )
        if self.name == "bright" and self.train_source == "bright":
            raise ValueError(
                "task.train_source='bright' would train and tune on BRIGHT queries: BRIGHT is evaluated "
                "zero-shot on every query of the domain; train on stdlib, beir or cranfield"
            )
        if self.name == "bright" and self.train_source not in ("stdlib", "beir", "cranfield"):
            raise ValueError(
                f"task.train_source must be stdlib, beir or cranfield, got {self.train_source!r}"
            )
        if self.name == "bright" and self.train_source != "stdlib" and self.train_path is None:
            raise ValueError(f"task.train_path is required for task.train_source={self.train_source!r}")
        if (
            self.name == "bright"
            and self.train_path is not None
            and self.path is not None
            and Path(self.train_path).resolve() == Path(self.path).resolve()
        ):
            raise ValueError(
                f"task.train_path {str(self.train_path)!r} is the BRIGHT folder: training on the "
                "evaluation domain's queries is not zero-shot"
            )
        if self.name != "bright" and self.first_stage_queries == "reasoning":
            raise ValueError(
                "task.first_stage_queries='reasoning' needs task.name='bright' (its topics hold the "
                "reasoning texts)"
            )
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"task.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not 0 <= self.validation_fraction < 1 - self.eval_fraction:
            raise ValueError(
                f"task.validation_fraction must be in [0, 1 - task.eval_fraction), got "
                f"{self.validation_fraction}"
            )
        if self.max_train_queries < 1 or self.max_eval_queries < 1:
            raise ValueError(
                f"task.max_train_queries and task.max_eval_queries must be >= 1, got "
                f"{self.max_train_queries}, {self.max_eval_queries}"
            )
        if self.max_validation_queries < 0:
            raise ValueError(f"task.max_validation_queries must be >= 0, got {self.max_validation_queries}")


@dataclass
class TeacherConfig:
    kind: Literal["offline-qrels", "openai"] = option(
        "offline-qrels",
        "offline-qrels: a labelled stand-in built from the judgements (no reasoning); "
        "openai: any OpenAI-compatible server",
    )
    base_url: str = option("http://localhost:8000/v1", "openai: server URL")
    model: str = option("meta-llama/Llama-3.3-70B-Instruct", "openai: model name")
    api_key_env: str = option("OPENAI_API_KEY", "openai: environment variable holding the key")
    concurrency: int = option(8, "openai: requests in flight")
    pairs_per_query: int = option(4, "training pairs per query (see teacher.pairs_from)")
    pairs_from: Literal["gold-first", "bm25"] = option(
        "gold-first",
        "gold-first: the judged documents, then BM25 hard negatives; bm25: BM25's top pairs_per_query "
        "as ranked (the evaluation's distribution) plus the best judged document when BM25 missed it",
    )
    offline_explanation: Literal["fixed", "per-label", "evidence", "none"] = option(
        "evidence",
        "offline-qrels: 'fixed' (one sentence for every label: the student decides at the label token, "
        "where E[label] is read), 'per-label' (the sentence names the label), 'evidence' (which query words "
        "the document contains, what it defines and calls: rerankdistill.evidence, computed from the pair) "
        "or 'none' (the label directly, no explanation)",
    )

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.pairs_per_query < 1:
            raise ValueError(
                f"teacher.concurrency and teacher.pairs_per_query must be >= 1, got "
                f"{self.concurrency}, {self.pairs_per_query}"
            )


@dataclass
class QuantConfig:
    method: Literal["nf4", "none"] = option(
        "nf4", "nf4: NF4 base weights through nf4lora (QLoRA); none: bf16/fp32 LoRA"
    )
    double_quant: bool = option(True, "double-quantize the NF4 block constants")
    gradient_checkpointing: bool = option(
        False, "activation checkpointing (QLoRA turns it on for large models)"
    )


@dataclass
class AttentionConfig:
    kind: Literal["si-p-rope", "native"] = option(
        "si-p-rope", "scale-invariant p-RoPE (siattn) or the model's own"
    )
    tau: float = option(10.0, "siattn tau")
    p_rope_fraction: float = option(0.5, "share of rotary pairs kept rotating")
    p_rope_base: float = option(
        32.0, "p-RoPE base; keep 2*pi*base below the training context (REFERENCE s.6)"
    )
    context_factor: int = option(4, "evaluation context = training context x this (the long-context claim)")

    def __post_init__(self) -> None:
        for name in ("tau", "p_rope_base"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"attention.{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 <= self.p_rope_fraction <= 1:
            raise ValueError(f"attention.p_rope_fraction must be in [0, 1], got {self.p_rope_fraction}")
        if self.context_factor < 1:
            raise ValueError(f"attention.context_factor must be >= 1, got {self.context_factor}")


@dataclass
class LoraConfig:
    r: int = option(16, "LoRA rank (InteRank/QLoRA: 64)")
    alpha: int = option(16, "LoRA alpha (scaling alpha / r)")
    dropout: float = option(0.0, "LoRA dropout")
    target_modules: list[str] = option(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="linear layers that get adapters",
    )
    mxfp8: bool = option(False, "run the LoRA GEMMs through MXFP8 (mxfp8train, RCEIL, all three GEMMs)")

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ValueError(f"lora.r and lora.alpha must be >= 1, got {self.r}, {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    steps: int = option(3000, "optimizer steps of distillation")
    batch_size: int = option(8, "global batch (examples per step, all processes)")
    micro_batch_size: int = option(4, "examples per forward pass on one process")
    lr: float = option(
        1e-3, "peak learning rate (InteRank 3B: 2e-4; the tiny student: 1e-3, 3e-3 and 5e-4 were worse)"
    )
    warmup_steps: int = option(5, "linear warmup, then lr_schedule")
    lr_schedule: Literal["constant", "linear", "cosine"] = option(
        "constant", "after warmup: constant, or a linear / cosine decay to 0 over each phase's steps"
    )
    weight_average: float = option(
        0.5,
        "end each phase with the uniform average of the adapter weights over this final fraction of its "
        "steps (stochastic weight averaging's tail; 0: the last step's weights; 0.5 steadied the student "
        "across seeds, README)",
    )
    max_grad_norm: float = option(1.0, "gradient clipping (QLoRA: 0.3)")
    max_length: int = option(384, "training context in tokens (evaluation prompts may be longer)")
    fit_documents: bool = option(
        True, "cut the document of an example longer than max_length to fit (false: drop it)"
    )
    completion_only: bool = option(True, "learn only the answer tokens")
    objective: Literal["answer", "label-pointwise", "label-listwise", "label-pointwise+listwise"] = option(
        "label-pointwise",
        "answer: NLL of the teacher's whole answer (explanation + label, InteRank); label-pointwise / "
        "label-listwise: the loss on the label token alone, read after the given explanation exactly as "
        "rerank.judge=forced reads it (cross-entropy of the label, or a softmax over each query's candidates "
        "of the log-odds of E[label]/2; label-pointwise+listwise: their sum; "
        "rerankdistill.train.forced_label)",
    )
    listwise_temperature: float = option(
        1.0, "label-listwise: scores are the log-odds of E[label]/2 over this"
    )
    seed: int = option(0, "seed of adapter init and example order")
    log_every: int = option(5, "steps between metric logs")
    checkpoint_every: int = option(20, "steps between atomic adapter checkpoints")

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "micro_batch_size",
            "max_length",
            "log_every",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if not (math.isfinite(self.listwise_temperature) and self.listwise_temperature > 0):
            raise ValueError(f"train.listwise_temperature must be > 0, got {self.listwise_temperature}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.weight_average <= 1:
            raise ValueError(f"train.weight_average must be in [0, 1], got {self.weight_average}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(
                f"train.max_grad_norm must be a finite number >= 0 (0: off), got {self.max_grad_norm}"
            )


@dataclass
class RefineConfig:
    method: Literal["reward-weighted", "grpo", "none"] = option(
        "none",
        "InteRank's reward-weighted fine-tuning, GRPO (both rerankdistill, resumable; both sample whole "
        "answers, so they need train.objective=answer) or none",
    )
    samples: int = option(4, "explanations sampled per pair (InteRank: 8); grpo: the group size")
    pairs: int = option(8, "training pairs refined")
    threshold: float = option(0.85, "keep samples whose min-max normalised reward is at least this")
    steps: int = option(5, "optimizer steps of refinement")
    temperature: float = option(1.0, "sampling temperature")
    kl_beta: float = option(
        0.0, "grpo: KL coefficient to the distilled student (TRL's beta; 0, TRL's default: no KL term)"
    )

    def __post_init__(self) -> None:
        if not (math.isfinite(self.kl_beta) and self.kl_beta >= 0):
            raise ValueError(f"refine.kl_beta must be a finite number >= 0, got {self.kl_beta}")
        if self.kl_beta and self.method != "grpo":
            raise ValueError(f"refine.kl_beta applies to refine.method=grpo only, got method={self.method}")
        for name in ("samples", "pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"refine.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"refine.steps must be >= 0, got {self.steps}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"refine.threshold must be in [0, 1], got {self.threshold}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"refine.temperature must be a finite number > 0, got {self.temperature}")


@dataclass
class RerankConfig:
    candidates: int = option(20, "BM25 depth per query (the first stage)")
    k: int = option(20, "top-k of the first stage reranked pointwise")
    first_stage: Literal["code", "plain"] = option(
        "code",
        "the BM25 whose candidates are reranked: code (identifier-aware: snake_case, CamelCase and dotted "
        "names split, whole token kept) or plain (bm25s's tokenizer); both are reported",
    )
    bm25_k1: float | None = option(
        None, "identifier-aware BM25's k1; unset: chosen on the validation queries"
    )
    bm25_b: float | None = option(None, "identifier-aware BM25's b; unset: chosen on the validation queries")
    bm25_stopwords: Literal["en", "none"] = option("en", "identifier-aware BM25: drop English stopwords")
    bm25_stemmer: Literal["s", "none"] = option(
        "s", "identifier-aware BM25: Harman's S stemmer (plurals) or none"
    )
    batch_size: int = option(8, "pairs per generate call")
    max_new_tokens: int = option(
        32,
        "explanation budget per pair; it must reach the label line (the offline teacher's answer is 23 "
        "tokens of the tiny tokenizer), else E[label] is read after a cut-off explanation",
    )
    use_label_probabilities: bool = option(True, "score by E[label] under the label-token probabilities")
    judge: Literal["generate", "forced"] = option(
        "forced",
        "generate: the student writes its explanation, E[label] is read after it (InteRank); forced: "
        "the offline teacher's label-free explanation is given and E[label] read in one forward pass per "
        "pair",
    )
    fusion_weight: float | None = option(
        None,
        "weight w of the reranker in w * E[label]/2 + (1 - w) * min-max BM25 (rerankdistill.fusion); "
        "unset: chosen on the validation queries from 0, 0.05, ..., 1",
    )
    fusion_smoothing: float = option(
        0.1,
        "when the weight is chosen: each weight's validation nDCG@10 is averaged over the weights within "
        "+- this much (rerankdistill.fusion.smoothed_scores); 0 takes the raw maximum",
    )

    def __post_init__(self) -> None:
        for name in ("candidates", "k", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"rerank.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("bm25_k1", "bm25_b"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"rerank.{name} must be >= 0 or unset, got {value}")
        if self.fusion_weight is not None and not 0 <= self.fusion_weight <= 1:
            raise ValueError(f"rerank.fusion_weight must be in [0, 1] or unset, got {self.fusion_weight}")
        if not 0 <= self.fusion_smoothing <= 1:
            raise ValueError(f"rerank.fusion_smoothing must be in [0, 1], got {self.fusion_smoothing}")


@dataclass
class RerankQLoRAConfig:
    run_dir: Path = option(Path("runs/rerank-qlora"), "run directory: config, logs, metrics, report, adapter")
    resume: bool = option(True, "resume from the run directory's checkpoints and teacher store")
    trackers: list[str] = option(
        default_factory=lambda: ["auto"],
        help="accelerate trackers: auto (TensorBoard if installed), tensorboard, wandb, none",
    )
    model: ModelConfig = option(default_factory=ModelConfig, help="")
    task: TaskConfig = option(default_factory=TaskConfig, help="")
    teacher: TeacherConfig = option(default_factory=TeacherConfig, help="")
    quant: QuantConfig = option(default_factory=QuantConfig, help="")
    attention: AttentionConfig = option(default_factory=AttentionConfig, help="")
    lora: LoraConfig = option(default_factory=LoraConfig, help="")
    train: TrainConfig = option(default_factory=TrainConfig, help="")
    refine: RefineConfig = option(default_factory=RefineConfig, help="")
    rerank: RerankConfig = option(default_factory=RerankConfig, help="")

    def __post_init__(self) -> None:
        if self.rerank.judge == "forced" and self.teacher.kind != "offline-qrels":
            raise ValueError(
                "rerank.judge=forced gives the student the offline teacher's explanation: it needs "
                "teacher.kind=offline-qrels"
            )
        if self.rerank.judge == "forced" and self.teacher.offline_explanation == "per-label":
            raise ValueError(
                "rerank.judge=forced needs a label-free explanation: teacher.offline_explanation=fixed, "
                "evidence or none (per-label names the label)"
            )
        if self.train.objective != "answer" and (
            self.rerank.judge != "forced" or self.refine.method != "none"
        ):
            raise ValueError(
                f"train.objective={self.train.objective} trains the label read in one pass after the given "
                "explanation: it needs rerank.judge=forced and refine.method=none (refinement samples "
                "whole answers)"
            )
        if self.rerank.k > self.rerank.candidates:
            raise ValueError(
                f"rerank.k ({self.rerank.k}) must be <= rerank.candidates ({self.rerank.candidates})"
            )
