"""The training phases of a distillation run, on the workspace's one loop (`shared_kernels.training`).

A run (e.g. the rerank-qlora app) distils the teacher into a LoRA student, then refines it:

  * `train_answers`: weighted NLL of the teacher's whole answers (`answer_examples` builds them);
  * `train_labels`: the label token alone after the judge's context, pointwise or listwise
    (`rerankdistill.train.forced_label`), one query per micro batch;
  * `refine_reward_weighted`: InteRank's reward-weighted fine-tuning (`rerankdistill.train.rwft`);
  * `refine_grpo`: GRPO (`rerankdistill.train.grpo`).

Each phase runs `run_phase`: AdamW over the trainable parameters with linear warmup, DDP or FSDP2 through
accelerate, checkpoints under `run_dir/checkpoints/<phase>` (resumable), rows in `run_dir/metrics.jsonl`
on one step axis (phases after the first log after its steps). The global batch of a step is a function of
(seed, step) alone, so a resumed run and a run on N processes see the batches a single uninterrupted one
sees. Every phase takes the model and returns the one to use next (the loop unwraps what it prepared) with
its history and what it reports.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rerankdistill.labels import RelevancePrompt
from rerankdistill.teacher import Pair, TeacherRecord
from shared_kernels.checkpoint import CheckpointManager
from shared_kernels.distributed import is_sharded
from shared_kernels.runconfig import write_json_atomic
from shared_kernels.training import LoopSettings, run_loop


def _silent(text: str) -> None:
    del text


@dataclass(frozen=True)
class PhaseLoop:
    """What every training phase of one run shares.

    Args:
        run_dir: checkpoints go under run_dir/checkpoints/<phase>, tracker rows to run_dir/metrics.jsonl.
        batch_size: examples per optimizer step (answer phases; GRPO: batch_size // micro_batch_size
            prompts per step).
        micro_batch_size: examples per forward; batch_size must be a multiple of it x processes.
        warmup_steps: linear LR warmup over this many optimizer steps.
        lr_schedule: after warmup, "constant", or a "linear" / "cosine" decay to 0 over each phase's steps.
        weight_average: end each phase with the uniform average of its trainable weights over this final
            fraction of its steps (stochastic weight averaging's tail; 0: the last step's weights).
        log_every, checkpoint_every, max_grad_norm: as in `shared_kernels.training.LoopSettings`.
        seed: the data order (and refinement sampling) seed.
        distill_steps: the distillation phase's steps: every other phase logs after them (one step axis).
        resume: continue each phase from its newest checkpoint (and reuse stored refinement samples).
        progress: tqdm bars on the main process.
        logger: gets the loop's lines.
        say: prints one line of the run's progress (main process; e.g. the app's printer).
    """

    run_dir: Path
    batch_size: int
    micro_batch_size: int
    warmup_steps: int
    log_every: int
    checkpoint_every: int
    max_grad_norm: float
    seed: int
    distill_steps: int
    resume: bool = True
    progress: bool = True
    logger: logging.Logger | None = None
    say: Callable[[str], None] = _silent
    lr_schedule: str = "constant"
    weight_average: float = 0.0

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.weight_average <= 1:
            raise ValueError(f"weight_average must be in [0, 1], got {self.weight_average!r}")

    def average_from(self, steps: int) -> int | None:
        """The first step of a `steps`-step phase whose weights are averaged (None: no averaging)."""
        if not self.weight_average or steps < 1:
            return None
        return steps - max(1, round(self.weight_average * steps))


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based) of `steps`: linear warmup over
    `warmup_steps`, then 1 ("constant"), or a decay from 1 towards 0 at the last step ("linear":
    1 - t, "cosine": (1 + cos(pi t)) / 2, t the fraction of the steps after warmup done)."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if schedule == "constant" or step < warmup_steps:
        return warm
    t = (step - warmup_steps) / max(1, steps - warmup_steps)
    decay = 1.0 - t if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return warm * max(0.0, decay)


@dataclass
class PhaseResult:
    """A phase's outcome: the model to use next, the loop's logged rows and what the phase reports."""

    model: Any
    history: list[dict[str, Any]]
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RefineSettings:
    """Refinement on teacher-labelled pairs.

    Args:
        pairs: how many pairs (drawn by the loop's seed among those whose document is < 2 x max_length
            characters).
        samples: answers sampled per pair (reward-weighted) or per prompt (GRPO's group).
        steps: optimizer steps.
        temperature: sampling temperature.
        threshold: reward-weighted only: keep candidates with normalised reward >= threshold.
        max_new_tokens: longest sampled answer.
        sample_batch_size: prompts per generate call (reward-weighted sampling).
        kl_beta: GRPO only: KL coefficient to the student as refinement starts (`rerankdistill.train.grpo`;
            0: no KL term).
    """

    pairs: int
    samples: int
    steps: int
    temperature: float
    threshold: float
    max_new_tokens: int
    sample_batch_size: int
    kl_beta: float = 0.0


# ------------------------------------------------------------------------------------------ the loop
def run_phase(
    acc: Any,
    model: Any,
    steps: int,
    lr: float,
    phase: str,
    window: Callable[[int], Sequence[Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    loop: PhaseLoop,
    extra_metrics: Callable[[Any], dict[str, float]] | None = None,
) -> PhaseResult:
    """One training phase on the shared loop: AdamW over the trainable parameters (no weight decay, linear
    warmup, then `loop.lr_schedule`; the tail weight average of `loop.weight_average`), DDP or FSDP2,
    checkpoints under checkpoints/<phase>, resumable.

    Args:
        acc: the run's `accelerate.Accelerator`.
        window, loss_fn: as in `shared_kernels.training.run_loop`.
    """
    if is_sharded(model):  # after refinement sampling, FSDP2 may still hold some parameters unsharded
        _reshard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, loop.warmup_steps, loop.lr_schedule)
    )
    ckpt = CheckpointManager(
        loop.run_dir / "checkpoints" / phase,
        keep=2,
        rank=acc.process_index,
        world_size=acc.num_processes,
        barrier=acc.wait_for_everyone,
    )
    settings = LoopSettings(
        steps=steps,
        phase=phase,
        log_every=loop.log_every,
        checkpoint_every=loop.checkpoint_every,
        max_grad_norm=loop.max_grad_norm,
        trainable_only=True,
        resume=loop.resume,
        progress=loop.progress,
        log_step_offset=0 if phase == "distill" else loop.distill_steps,
        average_from=loop.average_from(steps),
    )  # one step axis
    state = run_loop(
        acc,
        model,
        optimizer,
        scheduler,
        window,
        loss_fn,
        settings,
        ckpt,
        metrics_file=loop.run_dir / "metrics.jsonl",
        extra_metrics=extra_metrics,
        logger=loop.logger,
    )
    if state.resumed_from is not None:
        loop.say(f"resumed {phase} from {state.resumed_from} at step {state.start_step}")
    model = acc.unwrap_model(state.model)
    if is_sharded(model):
        _generate_on_every_rank(model)
    return PhaseResult(model, state.history)


def distributed_layout(acc: Any, model: Any) -> tuple[dict[str, Any], str]:
    """How the model trains across processes: the note for results.json and its printed line."""
    sharded = is_sharded(model)
    note = {"type": str(acc.distributed_type.value), "processes": acc.num_processes, "sharded": sharded}
    line = f"{acc.num_processes} process(es), {acc.distributed_type.value}" + (
        " (FSDP2: parameters sharded)" if sharded else ""
    )
    return note, line


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


# ------------------------------------------------------------------------------------ distillation
def answer_examples(
    tokenizer: Any,
    pairs: Sequence[Pair],
    records: Sequence[TeacherRecord],
    prompt: RelevancePrompt,
    completion_only: bool,
    max_length: int,
    fit_documents: bool,
    say: Callable[[str], None] = _silent,
) -> tuple[list[Any], dict[str, Any]]:
    """The teacher's whole answers (explanation + label) as completion-only NLL examples.

    Returns:
        (encoded examples, the note {"pairs", "used", "no_label", "no_pair", "too_long", "too_long_fate"})
    """
    from rerankdistill.train.sft import distill_examples, tokenize_examples

    by_key = {(p.qid, p.docid): p for p in pairs}
    examples, counts = distill_examples(records, by_key)
    encoded, too_long = tokenize_examples(
        tokenizer, examples, prompt, completion_only, max_length, fit_documents=fit_documents
    )
    fate = "documents cut to fit" if fit_documents else "dropped"
    note = {"pairs": len(pairs), **counts, "too_long": too_long, "too_long_fate": fate}
    say(f"{len(encoded)} distillation examples ({too_long} longer than {max_length} tokens: {fate})")
    return encoded, note


def train_answers(
    acc: Any,
    model: Any,
    pad_id: int,
    encoded: Sequence[Any],
    steps: int,
    lr: float,
    phase: str,
    loop: PhaseLoop,
) -> PhaseResult:
    """Weighted NLL (`rerankdistill.train.common.weighted_loss`) over `encoded` for `steps` optimizer steps
    of `loop.batch_size` examples in micro batches of `loop.micro_batch_size`, in seeded epoch order."""
    from rerankdistill.train.common import collate, weighted_loss

    if not encoded:
        raise ValueError(f"{phase}: no training examples (all longer than train.max_length?)")
    world = acc.num_processes
    if loop.batch_size % (loop.micro_batch_size * world):
        raise ValueError(
            f"train.batch_size ({loop.batch_size}) must be a multiple of train.micro_batch_size x "
            f"processes ({loop.micro_batch_size} x {world})"
        )
    order: list[int] = []
    epoch = 0
    while len(order) < steps * loop.batch_size:
        idx = list(range(len(encoded)))
        random.Random(loop.seed * 1000 + epoch).shuffle(idx)
        order += idx
        epoch += 1

    def window(step: int) -> list[list[int]]:  # the global batch of `step`, in micro batches
        ids = order[step * loop.batch_size : (step + 1) * loop.batch_size]
        return [ids[i : i + loop.micro_batch_size] for i in range(0, len(ids), loop.micro_batch_size)]

    def loss_fn(m: Any, micro: list[int]) -> torch.Tensor:
        batch = {k: v.to(acc.device) for k, v in collate([encoded[j] for j in micro], pad_id).items()}
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return weighted_loss(out.logits, batch["labels"], batch["weights"])

    return run_phase(acc, model, steps, lr, phase, window, loss_fn, loop)


def train_labels(
    acc: Any,
    model: Any,
    tokenizer: Any,
    prompt: RelevancePrompt,
    pairs: Sequence[Pair],
    records: Sequence[TeacherRecord],
    explain: Callable[[str, str], str],
    kind: str,
    steps: int,
    lr: float,
    max_length: int,
    pairs_per_query: int,
    listwise_temperature: float,
    loop: PhaseLoop,
) -> PhaseResult:
    """The label token alone, read after the judge's own context (`rerankdistill.train.forced_label`):
    pointwise cross-entropy or a listwise softmax over each query's candidates, one query per micro batch,
    loop.batch_size // pairs_per_query queries per step (phase "distill").

    Args:
        explain: (query, document) -> the label-free explanation, as the forced judge computes it.
        kind: "pointwise", "listwise" or "pointwise+listwise" (forced_label.LOSSES).
    Returns:
        The phase, with the note {"pairs", "used", "too_long", "too_long_fate"}.
    """
    from rerankdistill.train.forced_label import group_window, label_examples, label_loss_fn, label_token_ids

    labels = {(r.qid, r.docid): r.label for r in records if r.label is not None}
    examples, groups, dropped = label_examples(tokenizer, prompt, pairs, labels, explain, max_length)
    note = {
        "pairs": len(pairs),
        "used": len(examples),
        "too_long": dropped,
        "too_long_fate": "dropped (documents are cut to fit; these did not fit at all)",
    }
    per_step = max(1, loop.batch_size // pairs_per_query)
    if per_step % acc.num_processes:
        raise ValueError(
            f"train.batch_size // teacher.pairs_per_query ({per_step} queries per step) must be a "
            f"multiple of the number of processes ({acc.num_processes})"
        )
    loop.say(
        f"{len(examples)} label examples in {len(groups)} query groups ({dropped} did not fit), "
        f"{per_step} queries per step"
    )
    ids = label_token_ids(tokenizer)
    loss_fn = label_loss_fn(examples, kind, tokenizer.pad_token_id, ids, acc.device, listwise_temperature)
    window = group_window(groups, steps, per_step, loop.seed)
    result = run_phase(acc, model, steps, lr, "distill", window, loss_fn, loop)
    result.notes = note
    return result


# -------------------------------------------------------------------------------------- refinement
def _refine_pairs(
    pairs: Sequence[Pair], labelled: set[tuple[str, str]], n: int, max_length: int, seed: int
) -> list[Pair]:
    """`n` pairs drawn by `seed` among the labelled ones whose document is < 2 x max_length characters."""
    fits = [p for p in pairs if (p.qid, p.docid) in labelled and len(p.document) < 2 * max_length]
    return random.Random(seed).sample(fits, min(n, len(fits)))


def refine_reward_weighted(
    acc: Any,
    model: Any,
    tokenizer: Any,
    prompt: RelevancePrompt,
    pairs: Sequence[Pair],
    records: Sequence[TeacherRecord],
    settings: RefineSettings,
    lr: float,
    completion_only: bool,
    max_length: int,
    loop: PhaseLoop,
) -> PhaseResult:
    """InteRank's reward-weighted fine-tuning (`rerankdistill.train.rwft`): sample `settings.samples`
    explanations per pair from the distilled student, reward label agreement with the teacher, min-max
    normalise within the group, keep those >= threshold, train with r^3-weighted NLL (phase "refine").

    The samples are stored in run_dir/refine_samples.json (reused when `loop.resume`). A sharded model
    (FSDP2) needs every rank in each forward: all sample (the same seed), the main process writes.

    Returns:
        The phase, with the note {"pairs", "samples", "samples_agreeing_with_teacher", "kept"}.
    """
    from rerankdistill.train.rwft import RefinePair, group_weights, label_agreement_reward, sample_candidates
    from rerankdistill.train.sft import DistillExample, tokenize_examples

    labels = {(r.qid, r.docid): (r.label, r.text) for r in records if r.label is not None}
    chosen = _refine_pairs(pairs, set(labels), settings.pairs, max_length, loop.seed)
    refine_pairs = [
        RefinePair(p.query, p.document, labels[(p.qid, p.docid)][0], labels[(p.qid, p.docid)][1])
        for p in chosen
    ]
    samples_path = loop.run_dir / "refine_samples.json"
    sampling = acc.is_main_process or is_sharded(model)
    if sampling and not (loop.resume and samples_path.is_file()):
        loop.say(f"sampling {settings.samples} explanations for each of {len(refine_pairs)} pairs")
        groups = sample_candidates(
            model,
            tokenizer,
            refine_pairs,
            settings.samples,
            settings.temperature,
            settings.max_new_tokens,
            settings.sample_batch_size,
            seed=loop.seed,
        )
        if acc.is_main_process:
            write_json_atomic(samples_path, groups)
    acc.wait_for_everyone()
    groups = json.loads(samples_path.read_text())
    examples, weights = [], []
    for pair, group in zip(refine_pairs, groups, strict=True):
        texts = [*group, pair.teacher_text]
        rewards = [label_agreement_reward(t, pair.reference) for t in texts]
        for text, w in zip(texts, group_weights(rewards, settings.threshold), strict=True):
            if w > 0:
                examples.append(DistillExample(pair.query, pair.document, text))
                weights.append(w)
    encoded, _ = tokenize_examples(tokenizer, examples, prompt, completion_only, max_length, weights)
    agree = sum(
        label_agreement_reward(t, p.reference) == 1.0 for p, g in zip(refine_pairs, groups) for t in g
    )
    note = {
        "pairs": len(refine_pairs),
        "samples": sum(len(g) for g in groups),
        "samples_agreeing_with_teacher": agree,
        "kept": len(encoded),
    }
    loop.say(
        f"{agree} of {note['samples']} samples agree with the teacher's label; "
        f"{len(encoded)} weighted examples kept (threshold {settings.threshold})"
    )
    result = train_answers(acc, model, tokenizer.pad_token_id, encoded, settings.steps, lr, "refine", loop)
    result.notes = note
    return result


def refine_grpo(
    acc: Any,
    model: Any,
    tokenizer: Any,
    prompt: RelevancePrompt,
    pairs: Sequence[Pair],
    records: Sequence[TeacherRecord],
    settings: RefineSettings,
    lr: float,
    max_length: int,
    loop: PhaseLoop,
) -> PhaseResult:
    """GRPO (`rerankdistill.train.grpo`) on `settings.pairs` teacher-labelled pairs: `settings.samples`
    answers per prompt, label-agreement + format rewards, group-relative advantages, one prompt's group per
    micro batch (phase "refine"; sampling seeded by step and pair, so it resumes like distillation). With
    `settings.kl_beta` > 0, a KL term anchors it to `model` as handed in (the distilled student) and each
    row logs "refine/kl".

    Returns:
        The phase, with the note {"method", "pairs", "samples_per_prompt", "prompts_per_step"}.
    """
    from rerankdistill.train.grpo import ReferencePolicy, StepMeans, default_rewards, grpo_loss, grpo_window
    from rerankdistill.train.rwft import RefinePair

    if is_sharded(model):
        raise ValueError(
            "refine.method=grpo samples on each rank's own prompts: not supported with FSDP2 "
            "sharding (use DDP, or refine.method=reward-weighted)"
        )
    labels = {(r.qid, r.docid): r.label for r in records if r.label is not None}
    chosen = _refine_pairs(pairs, set(labels), settings.pairs, max_length, loop.seed)
    refine_pairs = [RefinePair(p.query, p.document, labels[(p.qid, p.docid)]) for p in chosen]
    if not refine_pairs:
        raise ValueError("refine: no teacher-labelled pair to refine on")
    prompts_per_step = loop.batch_size // loop.micro_batch_size  # one prompt's group per micro batch
    funcs, weights = default_rewards()
    stats = StepMeans()
    window = grpo_window(len(refine_pairs), settings.steps, prompts_per_step, loop.seed)
    loss_fn = grpo_loss(
        tokenizer,
        refine_pairs,
        settings.samples,
        settings.max_new_tokens,
        settings.temperature,
        funcs,
        weights,
        loop.seed,
        acc.unwrap_model,
        acc.device,
        stats,
        prompt,
        settings.kl_beta,
        ReferencePolicy(model) if settings.kl_beta else None,
    )
    note = {
        "method": "grpo",
        "pairs": len(refine_pairs),
        "samples_per_prompt": settings.samples,
        "prompts_per_step": prompts_per_step,
    }
    loop.say(
        f"GRPO on {len(refine_pairs)} pairs, {settings.samples} samples per prompt, {prompts_per_step} "
        "prompt(s) per step"
    )
    result = run_phase(
        acc,
        model,
        settings.steps,
        lr,
        "refine",
        window,
        loss_fn,
        loop,
        extra_metrics=lambda _: {f"refine/{k}": v for k, v in stats.means().items()},
    )
    result.notes = note
    return result
