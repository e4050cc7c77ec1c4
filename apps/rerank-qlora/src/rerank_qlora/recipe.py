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
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rerank_qlora import artefacts, stages
from rerank_qlora.config import RerankQLoRAConfig
from shared_kernels.app import flat_config, log_to_file, make_accelerator, require_fsdp2, run_recipe
from shared_kernels.distributed import is_sharded
from shared_kernels.runconfig import config_to_dict, write_json_atomic, write_yaml_atomic

log = logging.getLogger("rerank_qlora")
N_STAGES = 9
PLAIN, CODE, STUDENT = "BM25 (plain)", "BM25 (identifier-aware)", "BM25 + rerank-qlora"
# each run's TREC file in the run directory and its tag; the fused run (when there is one) is FUSED_FILE
RUN_FILES = {
    PLAIN: ("bm25.run", "bm25"),
    CODE: ("bm25-code.run", "bm25-code"),
    STUDENT: ("reranked.run", "rerank-qlora"),
}
FUSED_FILE = ("fused.run", "rerank-qlora-fused")


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
        from rerankdistill.train.phases import answer_examples

        tc = self.cfg.train
        encoded, note = answer_examples(
            self.tokenizer,
            pairs,
            records,
            _prompt(),
            tc.completion_only,
            tc.max_length,
            tc.fit_documents,
            say=self._print,
        )
        self.notes["teacher"] = {"name": teacher_name, **note}
        return encoded

    def _train_label(self, pairs: list, records: list, teacher: Any) -> list[dict[str, Any]]:
        """The label token alone, read after the judge's own context (rerankdistill.train.phases)."""
        from rerankdistill.train.phases import train_labels

        cfg, tc = self.cfg, self.cfg.train
        result = train_labels(
            self.acc,
            self.model,
            self.tokenizer,
            _prompt(),
            pairs,
            records,
            lambda q, d: teacher.explanation(0, q, d),  # as the forced judge computes it
            tc.objective.removeprefix("label-"),
            tc.steps,
            tc.lr,
            tc.max_length,
            cfg.teacher.pairs_per_query,
            tc.listwise_temperature,
            self._loop(),
        )
        self.notes["teacher"] = {"name": teacher.name, **result.notes}
        return self._take(result)

    def _train_loop(self, encoded: list, steps: int, lr: float, phase: str) -> list[dict[str, Any]]:
        """Weighted NLL over `encoded` (rerankdistill.train.phases), checkpointed per phase, resumable."""
        from rerankdistill.train.phases import train_answers

        return self._take(
            train_answers(
                self.acc, self.model, self.tokenizer.pad_token_id, encoded, steps, lr, phase, self._loop()
            )
        )

    def _loop(self) -> Any:
        """What every training phase shares (rerankdistill.train.phases.PhaseLoop)."""
        from rerankdistill.train.phases import PhaseLoop

        tc = self.cfg.train
        return PhaseLoop(
            run_dir=self.run_dir,
            batch_size=tc.batch_size,
            micro_batch_size=tc.micro_batch_size,
            warmup_steps=tc.warmup_steps,
            log_every=tc.log_every,
            checkpoint_every=tc.checkpoint_every,
            max_grad_norm=tc.max_grad_norm,
            seed=tc.seed,
            distill_steps=tc.steps,
            resume=self.cfg.resume,
            progress=self.progress,
            logger=log,
            say=self._print,
            lr_schedule=tc.lr_schedule,
            weight_average=tc.weight_average,
        )

    def _take(self, result: Any) -> list[dict[str, Any]]:
        """Keep a phase's model; note (once) how it trains across processes; its history."""
        from rerankdistill.train.phases import distributed_layout

        self.model = result.model
        if "distributed" not in self.notes:
            self.notes["distributed"], line = distributed_layout(self.acc, self.model)
            self._print(line)
        return result.history

    def _refine(self, pairs: list, records: list) -> list[dict[str, Any]]:
        """Reward-weighted fine-tuning (InteRank's) or GRPO of the distilled student on teacher-labelled
        pairs (rerankdistill.train.phases), resumable."""
        from rerankdistill.train.phases import RefineSettings, refine_grpo, refine_reward_weighted

        tc, rc = self.cfg.train, self.cfg.refine
        settings = RefineSettings(
            pairs=rc.pairs,
            samples=rc.samples,
            steps=rc.steps,
            temperature=rc.temperature,
            threshold=rc.threshold,
            max_new_tokens=self.cfg.rerank.max_new_tokens,
            sample_batch_size=self.cfg.rerank.batch_size,
            kl_beta=rc.kl_beta,
        )
        common = (self.acc, self.model, self.tokenizer, _prompt(), pairs, records, settings, tc.lr)
        if rc.method == "grpo":
            result = refine_grpo(*common, tc.max_length, self._loop())
        else:
            result = refine_reward_weighted(*common, tc.completion_only, tc.max_length, self._loop())
        self.notes["refine"] = result.notes
        return self._take(result)

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
        from rerankdistill.rerank import prompt_lengths

        cfg, task = self.cfg, self.task
        lengths = prompt_lengths(self.tokenizer, bm25, task.queries, task.corpus, cfg.rerank.k, _prompt())
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
            bm25_val,
            val_qrels,
            reranked.run,
            reranked.scores,
            cfg.rerank.k,
            cfg.rerank.fusion_weight,
            smoothing=cfg.rerank.fusion_smoothing,
        )
        runs = {
            PLAIN: {
                q: self.first_stages["plain"][q] for q in task.eval_qids if q in self.first_stages["plain"]
            },
            CODE: {q: self.first_stages["code"][q] for q in task.eval_qids if q in self.first_stages["code"]},
            STUDENT: {q: reranked.run[q] for q in bm25},
        }
        files = dict(RUN_FILES)
        if fusion["weight"] is not None:
            runs[fusion["name"]] = fused_run(bm25, reranked.scores, fusion, cfg.rerank.k)
            files[fusion["name"]] = FUSED_FILE
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
        """The LoRA adapter in peft's format in run_dir/adapter (rerankdistill.train.common.save_model): every
        rank calls this (a sharded model's adapter is gathered first), the main process writes."""
        from rerankdistill.train.common import save_model

        return save_model(
            self.model,
            self.tokenizer,
            self.run_dir,
            name="adapter",
            base_model_name_or_path=self.cfg.model.name_or_path,
            is_main_process=self.acc.is_main_process,
        )

    def cleanup(self) -> None:
        self.acc.end_training()

    # ------------------------------------------------------------------------------------------ output
    def _plot(self) -> None:
        from rerankdistill.run_report import plot_training_curve

        ylabel = {
            "answer": "NLL (nats per answer token)",
            "label-pointwise": "label cross-entropy (nats per pair)",
            "label-listwise": "listwise cross-entropy (nats per query)",
            "label-pointwise+listwise": "label cross-entropy + listwise cross-entropy (nats)",
        }[self.cfg.train.objective]
        plot_training_curve(self.history, self.run_dir / "training_curve.png", ylabel=ylabel)

    def _report(self, results: dict[str, Any], table: str) -> None:
        from rerankdistill.run_report import artefacts_footer, context_lines, report_markdown
        from shared_kernels.runconfig import write_text_atomic

        cfg = self.cfg
        offline = cfg.teacher.offline_explanation if cfg.teacher.kind == "offline-qrels" else None
        context = context_lines(
            results,
            cfg.model.name_or_path,
            cfg.train.max_length,
            cfg.rerank.candidates,
            cfg.rerank.k,
            offline,
        )
        text = report_markdown(
            "rerank-qlora report",
            context,
            table,
            results["fusion"],
            cfg.rerank.k,
            figure="training_curve.png",
            footer=artefacts_footer(results),
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


def _prompt():
    from rerankdistill.labels import INTERANK_PROMPT

    return INTERANK_PROMPT


def run(cfg: RerankQLoRAConfig, progress: bool = True) -> dict[str, Any]:
    """setup -> train -> evaluate -> cleanup; returns the evaluation results (main process)."""
    return run_recipe(RerankQLoRARecipe(cfg, progress=progress))
