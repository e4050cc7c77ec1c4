"""GRPO refinement (Shao et al. 2024, DeepSeekMath): the student samples a group of k answers per prompt;
rewards for label agreement and output format give group-relative advantages A_i = (r_i - mean r) /
(std r + 1e-4) (TRL's default group scaling), and the loss is mean_i(A_i * NLL_i + beta * KL_i) with NLL_i
the mean token NLL of answer i and KL_i the mean over its tokens of the k3 estimator
exp(ref - logp) - (ref - logp) - 1 (DeepSeekMath; TRL's `beta`, default 0.0 as TRL 1.16's GRPOConfig).
Each answer's NLL covers the text the student wrote plus the stop marker and the end-of-turn token
generation ends with (as the SFT targets do).

Old policy and reference policy are two different things here:
  * the old policy (the PPO ratio's denominator) is the policy that sampled the group. There is one
    optimizer step per sampling and the parameters do not change between sampling and the loss, so the
    ratio is 1 (its gradient is that of logp) and TRL's `epsilon` clipping never acts: no copy is kept;
  * the reference (the KL's anchor) is the policy at the START of refinement, i.e. the distilled student
    (for a LoRA student: its adapters as distillation left them, so disabling the adapters, as TRL does
    for PEFT models, would anchor to the base model instead and is not used). After the first step it
    differs from the policy, so the pre-update policy cannot serve (its k3 KL and that KL's gradient are
    identically 0). `ReferencePolicy` keeps a copy of the trainable parameters only (LoRA: the adapters;
    full fine-tuning: the weights, as TRL's reference model) and computes each group's reference log-probs
    once, without gradient, with those parameters swapped in (`torch.func.functional_call`). The copy is
    taken from the model handed in, before a checkpoint is loaded, so a resumed run keeps the same
    reference. With beta = 0 no copy is taken and no reference forward runs.

It runs on the workspace's one training loop (`shared_kernels.training`): DDP/FSDP2 under accelerate,
`CheckpointManager` checkpoints in `output_dir/checkpoints` and resume like SFT and rwft. Sampling is seeded
by (seed, step, prompt), so a resumed run draws the samples an uninterrupted run draws. The logged "reward"
and "kl" (token mean, beta > 0 only) of a step are the means over the step's groups on the main process.

Rewards (TRL reward-function signature: completions plus dataset columns as keyword lists):
  * `label_reward`: 1 - |parsed - label| / 2, 0 when unparseable;
  * `format_reward`: 1 when the answer is a non-empty explanation followed by `Relevance Label: <0|1|2>`
    (optionally ` ##`) and nothing after it, else 0.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rerankdistill.labels import INTERANK_PROMPT, RelevancePrompt, parse_relevance
from rerankdistill.train.common import (
    LoraSpec,
    apply_lora,
    collate,
    encode_example,
    save_model,
    token_nll,
)
from rerankdistill.train.rwft import RefinePair, sample_candidates
from rerankdistill.train.sft import TrainResult

_FORMAT = re.compile(r"^\s*\S.*?\S\s+Relevance Label:\s*[012]\s*(##)?\s*$", re.S)


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")  # conversational


def label_reward(completions: Sequence, label: Sequence[int], **_: object) -> list[float]:
    """Label agreement per completion: 1 - |parsed - label| / 2; 0 when no label can be parsed."""
    out = []
    for c, ref in zip(completions, label, strict=True):
        got = parse_relevance(_text(c))
        out.append(0.0 if got is None else 1.0 - abs(got - int(ref)) / 2.0)
    return out


def format_reward(completions: Sequence, **_: object) -> list[float]:
    """1.0 for `<explanation> Relevance Label: n [##]` and nothing else, 0.0 otherwise."""
    return [1.0 if _FORMAT.match(_text(c)) else 0.0 for c in completions]


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """(r - mean) / (std + 1e-4) within one prompt's group (population std, as TRL); all equal -> zeros."""
    mean = sum(rewards) / len(rewards)
    std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
    return [(r - mean) / (std + 1e-4) for r in rewards]


def grpo_window(
    n_pairs: int, steps: int, prompts_per_step: int, seed: int
) -> Callable[[int], list[tuple[int, int]]]:
    """step -> that step's micro-batches, one per prompt: (step, pair index), pairs in seeded epoch order."""
    order: list[int] = []
    while len(order) < steps * prompts_per_step:
        idx = list(range(n_pairs))
        random.Random(seed * 1000 + len(order) // n_pairs).shuffle(idx)
        order += idx
    return lambda step: [(step, i) for i in order[step * prompts_per_step : (step + 1) * prompts_per_step]]


def k3_kl(ref_logp, logp):
    """Per-token k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 (>= 0, 0 where
    equal; DeepSeekMath eq. 4, TRL's `per_token_kl`)."""
    import torch

    d = ref_logp - logp
    return torch.exp(d) - d - 1


class ReferencePolicy:
    """The policy at the start of refinement (see the module docstring): a copy of `model`'s trainable
    parameters, swapped in to compute reference log-probs without gradient."""

    def __init__(self, model) -> None:
        self.params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def token_logprobs(self, model, batch: dict) -> Any:
        """(B, T-1) log-probs of `batch["labels"]`' next tokens under the reference (`token_nll`'s layout),
        `model` in eval mode (no dropout) for that forward."""
        import torch

        current = dict(model.named_parameters())
        self.params = {n: t.to(current[n].device) for n, t in self.params.items()}  # no-op after the 1st
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = torch.func.functional_call(
                    model,
                    self.params,
                    (),
                    {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                    strict=False,
                )
        finally:
            model.train(was_training)
        return -token_nll(out.logits, batch["labels"])[0]


class StepMeans:
    """Means of per-group values over one step's groups (reset when the step changes), for the logged rows."""

    def __init__(self) -> None:
        self.step = -1
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, step: int, values: dict[str, float]) -> None:
        if step != self.step:
            self.step, self.sums, self.count = step, {}, 0
        self.count += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()}


def group_rewards(
    texts: Sequence[str], label: int, reward_funcs: Sequence[Callable], reward_weights: Sequence[float]
) -> list[float]:
    """sum_f w_f * f(texts, label=...) per text."""
    rewards = [0.0] * len(texts)
    for fn, w in zip(reward_funcs, reward_weights, strict=True):
        scores = fn(texts, label=[label] * len(texts))
        rewards = [r + w * float(x) for r, x in zip(rewards, scores, strict=True)]
    return rewards


def group_loss(logits, batch: dict, beta: float, ref_logp) -> tuple[Any, float]:
    """mean_i(A_i * NLL_i + beta * KL_i) of one group (advantages in batch["weights"]) and its token-mean
    KL (nan without a reference)."""
    nll, mask = token_nll(logits, batch["labels"])
    count = mask.sum(1).clamp(min=1)
    loss = (batch["weights"] * nll.sum(1) / count).mean()
    if ref_logp is None:
        return loss, math.nan
    kl = k3_kl(ref_logp, -nll) * mask
    return loss + beta * (kl.sum(1) / count).mean(), float(kl.detach().sum() / mask.sum().clamp(min=1))


def grpo_loss(
    tokenizer,
    pairs: Sequence[RefinePair],
    num_generations: int,
    max_completion_length: int,
    temperature: float,
    reward_funcs: Sequence[Callable],
    reward_weights: Sequence[float],
    seed: int,
    unwrap: Callable,
    device,
    stats: StepMeans,
    prompt: RelevancePrompt = INTERANK_PROMPT,
    beta: float = 0.0,
    reference: ReferencePolicy | None = None,
) -> Callable:
    """The loss of one GRPO micro-batch (one prompt's group), for `shared_kernels.training.run_loop`.

    Args:
        unwrap: prepared model -> the model to sample from (`accelerate.unwrap_model`).
        stats: receives {"reward": the group's mean reward[, "kl": its token-mean KL]} per group.
        beta, reference: the KL coefficient and the reference policy (needed when beta > 0).
    """
    if beta and reference is None:
        raise ValueError(f"beta={beta} needs a reference policy")

    def loss_fn(m, micro: tuple[int, int]):
        step, i = micro
        pair = pairs[i]
        texts = sample_candidates(
            unwrap(m),
            tokenizer,
            [pair],
            num_generations,
            temperature,
            max_completion_length,
            batch_size=1,
            prompt=prompt,
            seed=seed * 1_000_003 + step * 1009 + i,
        )[0]
        rewards = group_rewards(texts, pair.reference, reward_funcs, reward_weights)
        examples = [
            encode_example(tokenizer, prompt.messages(pair.query, pair.document), t + prompt.stop, weight=a)
            for t, a in zip(texts, group_advantages(rewards), strict=True)
        ]
        batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
        ref_logp = reference.token_logprobs(unwrap(m), batch) if beta and reference is not None else None
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss, kl = group_loss(out.logits, batch, beta, ref_logp)
        values = {"reward": sum(rewards) / len(rewards)}
        stats.add(step, values if ref_logp is None else {**values, "kl": kl})
        return loss

    return loss_fn


def default_rewards() -> tuple[list[Callable], list[float]]:
    """[label_reward, format_reward] with weights [1.0, 0.5]."""
    return [label_reward, format_reward], [1.0, 0.5]


def grpo(
    model,
    tokenizer,
    pairs: Sequence[RefinePair],
    output_dir: str | os.PathLike,
    max_steps: int = 100,
    num_generations: int = 8,
    max_completion_length: int = 256,
    learning_rate: float = 1e-6,
    beta: float = 0.0,
    temperature: float = 1.0,
    batch_size: int | None = None,
    reward_funcs: Sequence[Callable] | None = None,
    reward_weights: Sequence[float] | None = None,
    lora: LoraSpec | None = None,
    seed: int = 0,
    prompt: RelevancePrompt = INTERANK_PROMPT,
    progress: bool = True,
    save_every: int = 0,
    max_grad_norm: float = 1.0,
) -> TrainResult:
    """GRPO on (query, document, reference label) prompts (see the module docstring).

    Args:
        model, tokenizer: the student (causal LM + chat-template tokenizer).
        pairs: `RefinePair`s; `reference` is the label the reward compares with.
        max_steps, learning_rate, temperature: GRPO settings.
        beta: KL coefficient to the policy handed in (the reference, see the module docstring); 0 (TRL's
            default): no KL term, no reference copy.
        num_generations: group size per prompt; `batch_size` answers per optimizer step (default
            num_generations, i.e. one prompt per step) must be a multiple of it.
        reward_funcs, reward_weights: default [label_reward, format_reward] with weights [1.0, 0.5].
        lora: train LoRA adapters instead of all weights.
        save_every: optimizer steps between checkpoints (0: only the last step's); a run resumes from them.
    Returns:
        stats: steps, first/last loss, mean reward and (beta > 0) KL of the logged steps (main process);
            the final weights.
    """
    import torch
    from accelerate import Accelerator

    from shared_kernels.checkpoint import CheckpointManager
    from shared_kernels.training import LoopSettings, run_loop

    if not pairs:
        raise ValueError("pairs is empty")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    if num_generations < 2:
        raise ValueError(
            f"num_generations must be >= 2 (advantages are relative to the group), got {num_generations}"
        )
    batch_size = batch_size or num_generations
    if batch_size % num_generations:
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of num_generations ({num_generations})"
        )
    funcs, weights = default_rewards()
    if reward_funcs is not None:
        funcs, weights = list(reward_funcs), list(reward_weights or [1.0] * len(reward_funcs))
    if len(weights) != len(funcs):
        raise ValueError(f"{len(weights)} reward_weights for {len(funcs)} reward_funcs")
    if lora is not None:
        model = apply_lora(model, lora)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(seed)
    stats = StepMeans()
    window = grpo_window(len(pairs), max_steps, batch_size // num_generations, seed)
    loss_fn = grpo_loss(
        tokenizer,
        pairs,
        num_generations,
        max_completion_length,
        temperature,
        funcs,
        weights,
        seed,
        acc.unwrap_model,
        acc.device,
        stats,
        prompt,
        beta,
        ReferencePolicy(model) if beta else None,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    checkpoints = CheckpointManager(
        Path(output_dir) / "checkpoints",
        keep=2,
        rank=acc.process_index,
        world_size=acc.num_processes,
        barrier=acc.wait_for_everyone,
    )
    settings = LoopSettings(
        steps=max_steps,
        phase="grpo",
        checkpoint_every=save_every,
        max_grad_norm=max_grad_norm,
        trainable_only=True,
        progress=progress,
    )
    state = run_loop(
        acc,
        model,
        optimizer,
        scheduler,
        window,
        loss_fn,
        settings,
        checkpoints,
        extra_metrics=lambda _: stats.means(),
    )
    acc.wait_for_everyone()
    rows = state.history
    summary = {"steps": float(state.step)}
    for key, name in (("grpo/loss", "loss"), ("reward", "reward"), ("kl", "kl")):
        if name != "kl" or beta:
            summary[f"first_{name}"] = rows[0].get(key, math.nan) if rows else math.nan
            summary[f"last_{name}"] = rows[-1].get(key, math.nan) if rows else math.nan
    return TrainResult(model, save_model(model, tokenizer, output_dir), summary)
