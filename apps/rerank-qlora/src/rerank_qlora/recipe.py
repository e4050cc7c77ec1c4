"""The rerank-qlora recipe: setup() -> train() -> evaluate() -> cleanup().

Stages: task + BM25 first stage -> base model (built-in tiny one trained here, or a checkpoint) -> scale-
invariant p-RoPE attention (siattn) -> NF4 + double quantization with LoRA adapters (nf4lora) -> teacher
labels and explanations (rerankdistill; resumable store) -> LoRA distillation -> refinement -> pointwise
reranking of the BM25 candidates on held-out queries, at contexts longer than training -> nDCG@10 report
against BM25 -> adapter in peft format.

Distillation runs unchanged under `accelerate launch`: the global batch of step s is a function of (seed, s);
each process takes its contiguous share and accumulates over micro batches, DDP averages the gradients.
Adapter checkpoints (`shared_kernels.checkpoint`, trainable weights + optimizer + scheduler + RNG) are atomic.
Refinement sampling and evaluation run on the main process, except under accelerate's FSDP2
(`configs/accelerate/fsdp2-gpu.yaml`, quant.method=none): there the parameters are DTensor shards, so every
rank runs each forward and generate() in step, and the adapter and checkpoints are gathered into whole tensors
by every rank (`shared_kernels.distributed`) and written by the main process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rerank_qlora import artefacts, stages
from rerank_qlora.config import RerankQLoRAConfig
from shared_kernels.app import flat_config, log_to_file, make_accelerator, require_fsdp2, run_recipe
from shared_kernels.checkpoint import CheckpointManager
from shared_kernels.distributed import full_state_dict, is_sharded
from shared_kernels.finite import check_finite_tensors
from shared_kernels.runconfig import config_to_dict, write_json_atomic, write_yaml_atomic
from shared_kernels.training import LoopSettings, run_loop

log = logging.getLogger("rerank_qlora")
N_STAGES = 9
PLAIN, CODE, STUDENT = "BM25 (plain)", "BM25 (identifier-aware)", "BM25 + rerank-qlora"


class RerankQLoRARecipe:
    """One run of the pipeline, configured by a `RerankQLoRAConfig`."""

    def __init__(self, cfg: RerankQLoRAConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.run_dir = Path(cfg.run_dir)
        self.history: list[dict[str, Any]] = []
        self.notes: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()  # user + sys of this process, all threads

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.acc = make_accelerator(self.run_dir, cfg.trackers, "rerank-qlora")
        if require_fsdp2(self.acc, "configs/accelerate/fsdp2-gpu.yaml") and cfg.quant.method == "nf4":
            # The packed 4-bit codes are frozen parameters that fully_shard shards (nf4lora.weight); every
            # rank quantizes the same checkpoint to the same bytes, and accelerate's rank-0 broadcast loading
            # expects every state-dict entry to be a sharded parameter while the 4-bit constants are buffers.
            self.acc.state.fsdp_plugin.cpu_ram_efficient_loading = False
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_yaml_atomic(self.run_dir / "config.yaml", cfg)
            log_to_file(self.run_dir / "run.log", "rerank_qlora")
            for message in artefacts.reconcile(self.run_dir, cfg, resume=cfg.resume):
                self._print(message)
        self.acc.wait_for_everyone()

        self._stage(1, "retrieval task and BM25 first stage")
        self.task = stages.load_task(cfg.task)
        self.first_stages = stages.first_stages(self.task, cfg.rerank)
        self.first_stage = self.first_stages[cfg.rerank.first_stage]
        fs = self.first_stages
        self.notes["first_stage"] = {
            "reranked": cfg.rerank.first_stage,
            "k1": fs["k1"],
            "b": fs["b"],
            "chosen": fs["chosen"],
            "stopwords": cfg.rerank.bm25_stopwords,
            "stemmer": cfg.rerank.bm25_stemmer,
        }
        self.notes["task"] = {
            "name": self.task.name,
            "documents": len(self.task.corpus),
            "train_queries": len(self.task.train_qids),
            "eval_queries": len(self.task.eval_qids),
            "validation_queries": len(self.task.validation_qids),
            **self.task.info,
        }
        self._print(
            f"{self.task.name}: {len(self.task.corpus)} documents, {len(self.task.train_qids)} training, "
            f"{len(self.task.validation_qids)} validation and {len(self.task.eval_qids)} evaluation queries, "
            f"BM25 top-{cfg.rerank.candidates}"
        )
        self._print(
            f"first stage: {'identifier-aware' if cfg.rerank.first_stage == 'code' else 'plain'} BM25 "
            f"(identifier-aware k1={fs['k1']:g} b={fs['b']:g}, {fs['chosen']}; plain BM25 reported beside)"
        )

        self._stage(2, "base model")
        if cfg.model.name_or_path == "tiny":
            base_dir = self.run_dir / "base-model"
            if not (base_dir / "model.safetensors").is_file():
                if self.acc.is_main_process:
                    stages.build_tiny_base(
                        self.task, cfg, base_dir.with_name("base-model.tmp"), self.progress
                    )
                    shutil.rmtree(base_dir, ignore_errors=True)
                    os.replace(base_dir.with_name("base-model.tmp"), base_dir)
                self.acc.wait_for_everyone()
            model, self.tokenizer = stages.load_base(base_dir, cfg)
            self._print(f"built-in tiny Llama (trained here, saved to {base_dir})")
        else:
            model, self.tokenizer = stages.load_base(cfg.model.name_or_path, cfg)
            self._print(f"loaded {cfg.model.name_or_path}")

        self._stage(3, "attention")
        self.notes["attention"] = stages.apply_attention(model, cfg)
        self._print(self.notes["attention"])

        self._stage(4, "quantization and adapters")
        torch.manual_seed(cfg.train.seed)
        model, self.notes["adapters"] = stages.apply_qlora(model, cfg)
        self.notes["parameters"] = stages.trainable_summary(model)
        self._print(f"{self.notes['adapters']}; {self.notes['parameters']}")
        self.model = model.to(self.acc.device)
        self.acc.init_trackers("rerank-qlora", config=flat_config(config_to_dict(cfg)))

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> None:
        """Teacher labels -> LoRA distillation (-> refinement)."""
        cfg = self.cfg
        self._stage(5, "teacher labels")
        pairs, records, teacher = self._teacher_records()
        if cfg.train.objective == "answer":
            encoded = self._answer_examples(pairs, records, teacher.name)
            self._stage(6, "LoRA distillation")
            self.history += self._train_loop(encoded, cfg.train.steps, cfg.train.lr, "distill")
        else:
            self._stage(6, f"LoRA distillation of the label alone ({cfg.train.objective})")
            self.history += self._train_label(pairs, records, teacher)

        self._stage(7, "refinement")
        if cfg.refine.method == "none":
            self._print("skipped (refine.method=none)")
        elif cfg.refine.method == "grpo":
            self.history += self._grpo(pairs, records)
        else:
            self.history += self._refine(pairs, records)

    def _teacher_records(self) -> tuple[list, list, Any]:
        """The training pairs, the teacher's stored records of them (generated where missing), the teacher."""
        from rerankdistill.teacher import TeacherStore, generate_teacher_outputs

        cfg = self.cfg
        pairs = stages.training_pairs(
            self.task, self.first_stage, cfg.teacher.pairs_per_query, cfg.teacher.pairs_from
        )
        teacher = stages.make_teacher(cfg, self.task)
        if cfg.teacher.kind == "offline-qrels":
            what = {
                "evidence": "a label-free evidence note (query words found, names defined and called)",
                "none": "empty (the label directly)",
            }.get(cfg.teacher.offline_explanation, "a fixed sentence saying so")
            self._print(
                f"OFFLINE TEACHER: labels come from the gold judgements and every explanation is {what}; "
                "no model reasoning is distilled in this run"
            )
        store_path = self.run_dir / "teacher.jsonl"
        if self.acc.is_main_process:
            with TeacherStore(store_path) as store:
                stats = generate_teacher_outputs(
                    pairs, teacher, store, concurrency=cfg.teacher.concurrency, progress=self.progress
                )
            self._print(
                f"teacher {teacher.name}: {stats.done} new, {stats.skipped_existing} stored earlier, "
                f"{stats.unparseable} without a label"
            )
        # every process reads the finished store (no lock: it is not written now)
        self.acc.wait_for_everyone()
        records = [r for r in TeacherStore.read(store_path).values() if r.teacher == teacher.name]
        return pairs, records, teacher

    def _answer_examples(self, pairs: list, records: list, teacher_name: str) -> list:
        """The teacher's whole answers (explanation + label) as completion-only NLL examples."""
        from rerankdistill.train.sft import distill_examples, tokenize_examples

        cfg = self.cfg
        by_key = {(p.qid, p.docid): p for p in pairs}
        examples, counts = distill_examples(records, by_key)
        encoded, too_long = tokenize_examples(
            self.tokenizer,
            examples,
            _prompt(),
            cfg.train.completion_only,
            cfg.train.max_length,
            fit_documents=cfg.train.fit_documents,
        )
        fate = "documents cut to fit" if cfg.train.fit_documents else "dropped"
        self.notes["teacher"] = {
            "name": teacher_name,
            "pairs": len(pairs),
            **counts,
            "too_long": too_long,
            "too_long_fate": fate,
        }
        self._print(
            f"{len(encoded)} distillation examples ({too_long} longer than {cfg.train.max_length} tokens: "
            f"{fate})"
        )
        return encoded

    def _train_label(self, pairs: list, records: list, teacher: Any) -> list[dict[str, Any]]:
        """The label token alone, read after the judge's own context (rerankdistill.train.forced_label):
        pointwise cross-entropy or a listwise softmax over each query's candidates, one query per micro
        batch, on the shared loop (resumable like the answer objective)."""
        from rerankdistill.train.forced_label import (
            group_window,
            label_examples,
            label_loss_fn,
            label_token_ids,
        )

        cfg, tc = self.cfg, self.cfg.train
        labels = {(r.qid, r.docid): r.label for r in records if r.label is not None}
        examples, groups, dropped = label_examples(
            self.tokenizer,
            _prompt(),
            pairs,
            labels,
            lambda q, d: teacher.explanation(0, q, d),  # as the forced judge computes it
            tc.max_length,
        )
        self.notes["teacher"] = {
            "name": teacher.name,
            "pairs": len(pairs),
            "used": len(examples),
            "too_long": dropped,
            "too_long_fate": "dropped (documents are cut to fit; these did not fit at all)",
        }
        per_step = max(1, tc.batch_size // cfg.teacher.pairs_per_query)
        if per_step % self.acc.num_processes:
            raise ValueError(
                f"train.batch_size // teacher.pairs_per_query ({per_step} queries per step) must be a "
                f"multiple of the number of processes ({self.acc.num_processes})"
            )
        self._print(
            f"{len(examples)} label examples in {len(groups)} query groups ({dropped} did not fit), "
            f"{per_step} queries per step"
        )
        kind = tc.objective.removeprefix("label-")
        ids = label_token_ids(self.tokenizer)
        loss_fn = label_loss_fn(
            examples, kind, self.tokenizer.pad_token_id, ids, self.acc.device, tc.listwise_temperature
        )
        window = group_window(groups, tc.steps, per_step, tc.seed)
        return self._run_phase(tc.steps, tc.lr, "distill", window, loss_fn)

    def _train_loop(self, encoded: list, steps: int, lr: float, phase: str) -> list[dict[str, Any]]:
        """Weighted NLL (rerankdistill) over `encoded` with the shared loop (shared_kernels.training): DDP or
        FSDP2, accumulated over micro batches, checkpointed per phase, resumable."""
        from rerankdistill.train.common import collate, weighted_loss

        tc, acc = self.cfg.train, self.acc
        if not encoded:
            raise ValueError(f"{phase}: no training examples (all longer than train.max_length?)")
        world = acc.num_processes
        if tc.batch_size % (tc.micro_batch_size * world):
            raise ValueError(
                f"train.batch_size ({tc.batch_size}) must be a multiple of train.micro_batch_size x "
                f"processes ({tc.micro_batch_size} x {world})"
            )
        order: list[int] = []
        epoch = 0
        while len(order) < steps * tc.batch_size:
            idx = list(range(len(encoded)))
            random.Random(tc.seed * 1000 + epoch).shuffle(idx)
            order += idx
            epoch += 1
        pad = self.tokenizer.pad_token_id

        def window(step: int) -> list[list[int]]:  # the global batch of `step`, in micro batches
            ids = order[step * tc.batch_size : (step + 1) * tc.batch_size]
            return [ids[i : i + tc.micro_batch_size] for i in range(0, len(ids), tc.micro_batch_size)]

        def loss_fn(model: Any, micro: list[int]) -> torch.Tensor:
            batch = {k: v.to(acc.device) for k, v in collate([encoded[j] for j in micro], pad).items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return weighted_loss(out.logits, batch["labels"], batch["weights"])

        return self._run_phase(steps, lr, phase, window, loss_fn)

    def _run_phase(
        self, steps: int, lr: float, phase: str, window: Any, loss_fn: Any, extra_metrics: Any = None
    ) -> list[dict[str, Any]]:
        """One training phase on the shared loop (shared_kernels.training): AdamW over the adapters, DDP or
        FSDP2, checkpoints under checkpoints/<phase>, resumable."""
        tc, acc = self.cfg.train, self.acc
        world = acc.num_processes
        if is_sharded(
            self.model
        ):  # after refinement sampling, FSDP2 may still hold some parameters unsharded
            _reshard(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps))
        )
        ckpt = CheckpointManager(
            self.run_dir / "checkpoints" / phase,
            keep=2,
            rank=acc.process_index,
            world_size=world,
            barrier=acc.wait_for_everyone,
        )
        settings = LoopSettings(
            steps=steps,
            phase=phase,
            log_every=tc.log_every,
            checkpoint_every=tc.checkpoint_every,
            max_grad_norm=tc.max_grad_norm,
            trainable_only=True,
            resume=self.cfg.resume,
            progress=self.progress,
            log_step_offset=0 if phase == "distill" else tc.steps,
        )  # one step axis
        state = run_loop(
            acc,
            self.model,
            optimizer,
            scheduler,
            window,
            loss_fn,
            settings,
            ckpt,
            metrics_file=self.run_dir / "metrics.jsonl",
            extra_metrics=extra_metrics,
            logger=log,
        )
        if state.resumed_from is not None:
            self._print(f"resumed {phase} from {state.resumed_from} at step {state.start_step}")
        self.model = acc.unwrap_model(state.model)
        sharded = is_sharded(self.model)
        if sharded:
            _generate_on_every_rank(self.model)
        if "distributed" not in self.notes:
            self.notes["distributed"] = {
                "type": str(acc.distributed_type.value),
                "processes": world,
                "sharded": sharded,
            }
            self._print(
                f"{world} process(es), {acc.distributed_type.value}"
                + (" (FSDP2: parameters sharded)" if sharded else "")
            )
        return state.history

    def _refine(self, pairs: list, records: list) -> list[dict[str, Any]]:
        """InteRank's reward-weighted fine-tuning, composed from rerankdistill: sample `refine.samples`
        explanations per pair from the distilled student, reward label agreement with the teacher, min-max
        normalise within the group, keep those >= threshold, train with r^3-weighted NLL."""
        from rerankdistill.train.rwft import (
            RefinePair,
            group_weights,
            label_agreement_reward,
            sample_candidates,
        )
        from rerankdistill.train.sft import DistillExample, tokenize_examples

        cfg, rc = self.cfg, self.cfg.refine
        labels = {(r.qid, r.docid): (r.label, r.text) for r in records if r.label is not None}
        fits = [p for p in pairs if (p.qid, p.docid) in labels and len(p.document) < 2 * cfg.train.max_length]
        chosen = random.Random(cfg.train.seed).sample(fits, min(rc.pairs, len(fits)))
        refine_pairs = [
            RefinePair(p.query, p.document, labels[(p.qid, p.docid)][0], labels[(p.qid, p.docid)][1])
            for p in chosen
        ]
        samples_path = self.run_dir / "refine_samples.json"
        # a sharded model (FSDP2) needs every rank in each forward: all sample (the same seed), the main one
        # writes
        sampling = self.acc.is_main_process or is_sharded(self.model)
        if sampling and not (cfg.resume and samples_path.is_file()):
            self._print(f"sampling {rc.samples} explanations for each of {len(refine_pairs)} pairs")
            groups = sample_candidates(
                self.model,
                self.tokenizer,
                refine_pairs,
                rc.samples,
                rc.temperature,
                cfg.rerank.max_new_tokens,
                cfg.rerank.batch_size,
                seed=cfg.train.seed,
            )
            if self.acc.is_main_process:
                write_json_atomic(samples_path, groups)
        self.acc.wait_for_everyone()
        groups = json.loads(samples_path.read_text())
        examples, weights = [], []
        for pair, group in zip(refine_pairs, groups, strict=True):
            texts = [*group, pair.teacher_text]
            rewards = [label_agreement_reward(t, pair.reference) for t in texts]
            for text, w in zip(texts, group_weights(rewards, rc.threshold), strict=True):
                if w > 0:
                    examples.append(DistillExample(pair.query, pair.document, text))
                    weights.append(w)
        encoded, _ = tokenize_examples(
            self.tokenizer, examples, _prompt(), cfg.train.completion_only, cfg.train.max_length, weights
        )
        agree = sum(
            label_agreement_reward(t, p.reference) == 1.0 for p, g in zip(refine_pairs, groups) for t in g
        )
        self.notes["refine"] = {
            "pairs": len(refine_pairs),
            "samples": sum(len(g) for g in groups),
            "samples_agreeing_with_teacher": agree,
            "kept": len(encoded),
        }
        self._print(
            f"{agree} of {self.notes['refine']['samples']} samples agree with the teacher's label; "
            f"{len(encoded)} weighted examples kept (threshold {rc.threshold})"
        )
        return self._train_loop(encoded, rc.steps, cfg.train.lr, "refine")

    def _grpo(self, pairs: list, records: list) -> list[dict[str, Any]]:
        """GRPO (rerankdistill.train.grpo) on `refine.pairs` teacher-labelled pairs: `refine.samples` answers
        per prompt, label-agreement + format rewards, group-relative advantages; on the shared loop, so it
        checkpoints under checkpoints/refine and resumes like distillation (sampling seeded by step and
        pair)."""
        from rerankdistill.train.grpo import default_rewards, grpo_loss, grpo_window
        from rerankdistill.train.rwft import RefinePair

        cfg, rc = self.cfg, self.cfg.refine
        if is_sharded(self.model):
            raise ValueError(
                "refine.method=grpo samples on each rank's own prompts: not supported with FSDP2 "
                "sharding (use DDP, or refine.method=reward-weighted)"
            )
        labels = {(r.qid, r.docid): r.label for r in records if r.label is not None}
        fits = [p for p in pairs if (p.qid, p.docid) in labels and len(p.document) < 2 * cfg.train.max_length]
        chosen = random.Random(cfg.train.seed).sample(fits, min(rc.pairs, len(fits)))
        refine_pairs = [RefinePair(p.query, p.document, labels[(p.qid, p.docid)]) for p in chosen]
        if not refine_pairs:
            raise ValueError("refine: no teacher-labelled pair to refine on")
        prompts_per_step = (
            cfg.train.batch_size // cfg.train.micro_batch_size
        )  # one prompt's group per micro batch
        funcs, weights = default_rewards()
        last_reward: dict[str, float] = {}
        window = grpo_window(len(refine_pairs), rc.steps, prompts_per_step, cfg.train.seed)
        loss_fn = grpo_loss(
            self.tokenizer,
            refine_pairs,
            rc.samples,
            cfg.rerank.max_new_tokens,
            rc.temperature,
            funcs,
            weights,
            cfg.train.seed,
            self.acc.unwrap_model,
            self.acc.device,
            last_reward,
            _prompt(),
        )
        self.notes["refine"] = {
            "method": "grpo",
            "pairs": len(refine_pairs),
            "samples_per_prompt": rc.samples,
            "prompts_per_step": prompts_per_step,
        }
        self._print(
            f"GRPO on {len(refine_pairs)} pairs, {rc.samples} samples per prompt, {prompts_per_step} "
            "prompt(s) per step"
        )
        return self._run_phase(
            rc.steps,
            cfg.train.lr,
            "refine",
            window,
            loss_fn,
            extra_metrics=lambda _: {"refine/reward": last_reward.get("reward", float("nan"))},
        )

    # ---------------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Pointwise rerank of the held-out queries' BM25 top-k; nDCG@10 against BM25; report and adapter.

        Runs on the main process (the others wait), or on every rank when the model is sharded (FSDP2: each
        forward needs all ranks); the main process writes the runs, results.json, the report and the adapter.
        """
        results: dict[str, Any] = {}
        if self.acc.is_main_process or is_sharded(self.model):
            results = self._rerank_and_report()
        self.acc.wait_for_everyone()
        return results

    def _rerank_and_report(self) -> dict[str, Any]:
        task = self.task
        self._stage(8, "pointwise reranking of validation and held-out queries")
        bm25 = {q: self.first_stage[q] for q in task.eval_qids if q in self.first_stage}
        bm25_val = {q: self.first_stage[q] for q in task.validation_qids if q in self.first_stage}
        self._note_prompt_lengths(bm25, len(bm25_val))
        reranked = self._judge_candidates({**bm25_val, **bm25})
        if not self.acc.is_main_process:  # another rank of a sharded model: it took part in the forwards,
            self._save_adapter()  # and takes part in gathering the adapter, which the main process writes
            return {}
        results, table = self._score_runs(bm25, bm25_val, reranked)

        self._stage(9, "adapter and report")
        results["adapter_dir"] = str(self._save_adapter())
        write_json_atomic(self.run_dir / "results.json", results)
        self._plot()
        self._report(results, table)
        self._print_summary(results, len(bm25))
        return results

    def _note_prompt_lengths(self, bm25: dict, n_validation: int) -> None:
        """How many evaluation prompts are longer than the training context (the long-context claim)."""
        cfg, task, prompt = self.cfg, self.task, _prompt()
        lengths = []
        for qid, docs in bm25.items():
            for docid in sorted(docs, key=lambda d: -docs[d])[: cfg.rerank.k]:
                text = self.tokenizer.apply_chat_template(
                    prompt.messages(task.queries[qid], task.corpus[docid]),
                    add_generation_prompt=True,
                    tokenize=False,
                )
                lengths.append(len(self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        longer = sum(n > cfg.train.max_length for n in lengths)
        self.notes["eval_lengths"] = {
            "pairs": len(lengths),
            "longer_than_training_context": longer,
            "max_prompt_tokens": max(lengths, default=0),
            "training_context": cfg.train.max_length,
        }
        self._print(
            f"{len(lengths)} evaluation pairs; {longer} prompts longer than the training context of "
            f"{cfg.train.max_length} tokens (longest {max(lengths, default=0)}); "
            f"{n_validation * cfg.rerank.k} validation pairs"
        )

    def _judge_candidates(self, first_stage: dict) -> Any:
        """The student's judgements of each query's top-k, resumable through rerank.jsonl."""
        from rerankdistill.backends.hf import TransformersBackend
        from rerankdistill.length_sorted import LengthSortedJudge
        from rerankdistill.rerank import TeacherForcedJudge, TransformersJudge, rerank
        from rerankdistill.teacher import TeacherStore

        cfg = self.cfg
        self.model.eval()
        backend = TransformersBackend(
            self.model,
            self.tokenizer,
            name="student",
            batch_size=cfg.rerank.batch_size,
            max_new_tokens=cfg.rerank.max_new_tokens,
        )
        inner: Any
        if cfg.rerank.judge == "forced":
            teacher = stages.make_teacher(cfg, self.task)
            inner = TeacherForcedJudge(backend, lambda q, d: teacher.explanation(0, q, d))
        else:
            inner = TransformersJudge(backend, use_label_probabilities=cfg.rerank.use_label_probabilities)
        progress = self.progress and self.acc.is_main_process
        judge = LengthSortedJudge(inner, cfg.rerank.batch_size, progress=progress)
        # every pair in one judge call, so the judge can batch them by length (less padding)
        n_pairs = sum(min(cfg.rerank.k, len(d)) for d in first_stage.values())
        # judgements are appended to rerank.jsonl chunk by chunk: a killed run resumes where it stopped
        # (artefacts.py discards the store when the student or the judge's settings change)
        # (sharded, every rank runs the same forwards: no store, since only the main process could read it)
        keep = self.acc.is_main_process and not is_sharded(self.model)
        with TeacherStore(self.run_dir / "rerank.jsonl") if keep else contextlib.nullcontext() as store:
            return rerank(
                first_stage,
                self.task.queries,
                self.task.corpus,
                judge,
                k=cfg.rerank.k,
                store=store,
                batch_size=max(1, min(n_pairs, 64 * cfg.rerank.batch_size)),
                progress=False,
            )

    def _score_runs(self, bm25: dict, bm25_val: dict, reranked: Any) -> tuple[dict[str, Any], str]:
        """Both BM25 runs, the student's and the fused one on the evaluation queries: TREC files, scores,
        paired tests against both BM25s (rerankdistill.run_report); returns results.json's dict and the
        table."""
        from rerankdistill import comparison_table, evaluate, write_qrels, write_run
        from rerankdistill.run_report import choose_fusion, fused_run, significance_against

        cfg, task = self.cfg, self.task
        eval_qrels = {q: task.qrels[q] for q in task.eval_qids}
        val_qrels = {q: task.qrels[q] for q in task.validation_qids}
        fusion = choose_fusion(
            bm25_val, val_qrels, reranked.run, reranked.scores, cfg.rerank.k, cfg.rerank.fusion_weight
        )
        runs = {
            PLAIN: {
                q: self.first_stages["plain"][q] for q in task.eval_qids if q in self.first_stages["plain"]
            },
            CODE: {q: self.first_stages["code"][q] for q in task.eval_qids if q in self.first_stages["code"]},
            STUDENT: {q: reranked.run[q] for q in bm25},
        }
        files = {PLAIN: ("bm25.run", "bm25"), CODE: ("bm25-code.run", "bm25-code")}
        files[STUDENT] = ("reranked.run", "rerank-qlora")
        if fusion["weight"] is not None:
            runs[fusion["name"]] = fused_run(bm25, reranked.scores, fusion, cfg.rerank.k)
            files[fusion["name"]] = ("fused.run", "rerank-qlora-fused")
        write_qrels(eval_qrels, self.run_dir / "eval.qrels")
        for name, (filename, tag) in files.items():
            write_run(runs[name], self.run_dir / filename, tag=tag)
        measures = ("ndcg_cut_10", "recip_rank_10", "judged_10", "map", f"recall_{cfg.rerank.candidates}")
        scores = {
            name: {m: float(v) for m, v in evaluate(run, eval_qrels, measures).items()}
            for name, run in runs.items()
        }
        significance = significance_against(runs, eval_qrels, (CODE, PLAIN), seed=cfg.train.seed)
        self.notes["significance"] = significance["rows"]
        table = comparison_table(runs, eval_qrels, measures) + "\n\n" + significance["table"]
        unparseable = sum(reranked.labels[q][d] is None for q in bm25 for d in reranked.labels[q])
        keys = (("bm25", PLAIN), ("bm25-code", CODE), ("reranked", STUDENT), ("fused", fusion["name"]))
        self.acc.log(
            {f"eval/ndcg@10/{key}": scores[name]["ndcg_cut_10"] for key, name in keys if name in scores}
        )
        results = {
            "scores": scores,
            "fusion": fusion,
            "unparseable": unparseable,
            "judged": self.notes["eval_lengths"]["pairs"],
            "elapsed_s": time.perf_counter() - self.t0,
            **self.notes,
        }
        return results, table

    def _print_summary(self, results: dict[str, Any], n_eval: int) -> None:
        scores, fusion = results["scores"], results["fusion"]
        line = (
            f"nDCG@10 on {n_eval} held-out queries: BM25 {scores[PLAIN]['ndcg_cut_10']:.4f}, "
            f"identifier-aware BM25 {scores[CODE]['ndcg_cut_10']:.4f}, "
            f"reranked {scores[STUDENT]['ndcg_cut_10']:.4f}"
        )
        if fusion["name"] in scores:
            fused = scores[fusion["name"]]["ndcg_cut_10"]
            line += f", fused (w={fusion['weight']:g}, {fusion['chosen']}) {fused:.4f}"
        self._print(line)
        for r in results["significance"]:
            if r["baseline"] == CODE and r["measure"] == "ndcg_cut_10":
                self._print(
                    f"{r['run']} - identifier-aware BM25, nDCG@10: {r['mean_diff']:+.4f} (95% CI "
                    f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]), "
                    f"randomization p = {r['p_randomization']:.4f}"
                )

    def _save_adapter(self) -> Path:
        """The LoRA adapter in peft's format (adapter_config.json + adapter_model.safetensors), atomically.

        A sharded model's (FSDP2) adapter is gathered first: every rank calls this, the main process writes.
        """
        final = self.run_dir / "adapter"
        tmp = self.run_dir / "adapter.tmp"
        sharded = is_sharded(self.model)
        whole = (
            full_state_dict(self.model, trainable_only=True) if sharded else None
        )  # collective when sharded
        if not self.acc.is_main_process:
            return final
        check_finite_tensors(
            whole if sharded else {n: p for n, p in self.model.named_parameters() if p.requires_grad},
            str(final),
        )
        shutil.rmtree(tmp, ignore_errors=True)
        if self.cfg.quant.method == "nf4":
            from nf4lora.model import save_adapter

            save_adapter(
                self.model, tmp, base_model_name_or_path=self.cfg.model.name_or_path, state_dict=whole
            )
        elif sharded:
            self.model.save_pretrained(str(tmp), safe_serialization=True, state_dict=whole)
        else:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def cleanup(self) -> None:
        self.acc.end_training()

    # ------------------------------------------------------------------------------------------ output
    def _plot(self) -> None:
        from rerankdistill.run_report import plot_training_curve

        ylabel = {
            "answer": "NLL (nats per answer token)",
            "label-pointwise": "label cross-entropy (nats per pair)",
            "label-listwise": "listwise cross-entropy (nats per query)",
        }[self.cfg.train.objective]
        plot_training_curve(self.history, self.run_dir / "training_curve.png", ylabel=ylabel)

    def _report(self, results: dict[str, Any], table: str) -> None:
        from rerankdistill.run_report import report_markdown
        from shared_kernels.runconfig import write_text_atomic

        cfg, n = self.cfg, self.notes
        teacher, fs, lengths = n["teacher"], n["first_stage"], n["eval_lengths"]
        offline = ""
        if cfg.teacher.kind == "offline-qrels":
            offline = (
                f" (OFFLINE stand-in built from the gold judgements: {cfg.teacher.offline_explanation} "
                "explanations, no model reasoning)"
            )
        context = [
            f"Task: {n['task']['name']} ({n['task']['documents']} documents; {n['task']['train_queries']} "
            f"training queries, {n['task']['validation_queries']} validation queries, "
            f"{n['task']['eval_queries']} held-out evaluation queries).",
            f"Model: {cfg.model.name_or_path}; attention: {n['attention']}; {n['adapters']}; "
            f"{n['parameters']}.",
            f"Teacher: {teacher['name']}{offline}; {teacher['used']} distillation examples, "
            f"{teacher['too_long']} longer than the training context ({cfg.train.max_length} tokens): "
            f"{teacher['too_long_fate']}.",
            f"First stage: {fs['reranked']} BM25 (identifier-aware: k1 {fs['k1']:g}, b {fs['b']:g}, "
            f"{fs['chosen']}; stopwords {fs['stopwords']}, stemmer {fs['stemmer']}).",
            f"Evaluation: BM25 top-{cfg.rerank.candidates}, top-{cfg.rerank.k} reranked pointwise; "
            f"{lengths['longer_than_training_context']} of {lengths['pairs']} prompts are longer than the "
            f"training context (longest {lengths['max_prompt_tokens']} tokens). "
            f"Unparseable judgements: {results['unparseable']} of {results['judged']}.",
        ]
        fused = ", `fused.run`" if results["fusion"]["weight"] is not None else ""
        footer = [
            f"Adapter (peft format): `{results['adapter_dir']}`. Judgements `eval.qrels`; runs `bm25.run` "
            f"(plain), `bm25-code.run` (identifier-aware), `reranked.run`{fused} (TREC format: "
            "`trec_eval -m ndcg_cut.10 eval.qrels reranked.run` re-scores them). "
            f"Wall time {results['elapsed_s']:.0f} s.",
        ]
        text = report_markdown(
            "rerank-qlora report",
            context,
            table,
            results["fusion"],
            cfg.rerank.k,
            figure="training_curve.png",
            footer=footer,
        )
        write_text_atomic(self.run_dir / "report.md", text)

    def _stage(self, i: int, name: str) -> None:
        self._print(
            f"stage {i}/{N_STAGES}: {name}  [{time.perf_counter() - self.t0:.0f} s wall, "
            f"{time.process_time() - self.cpu0:.0f} s CPU]"
        )

    def _print(self, text: str) -> None:
        if self.acc.is_main_process:
            tqdm.write(f"[rerank-qlora] {text}")
            log.info(text)


def _generate_on_every_rank(model: Any) -> None:
    """Make `model.generate` usable on an FSDP2-sharded model, where every rank runs it in step.

    FSDP2 gathers parameters around `forward` only: generate() is registered as a forward method too, and
    called with synced_gpus=True so that transformers keeps every rank decoding (padding) until all are done;
    otherwise a rank that finished early would stop joining the all-gathers of the others. Idempotent.
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    if getattr(model, "_generate_on_every_rank", False):
        return
    model.generate = functools.partial(model.generate, synced_gpus=True)
    register_fsdp_forward_method(model, "generate")
    model._generate_on_every_rank = True


def _reshard(model: Any) -> None:
    """Register every FSDP2 module's sharded parameters again (forward-only passes can leave some
    unsharded)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _prompt():
    from rerankdistill.labels import INTERANK_PROMPT

    return INTERANK_PROMPT


def run(cfg: RerankQLoRAConfig, progress: bool = True) -> dict[str, Any]:
    """setup -> train -> evaluate -> cleanup; returns the evaluation results (main process)."""
    return run_recipe(RerankQLoRARecipe(cfg, progress=progress))
