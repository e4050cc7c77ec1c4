"""GRPO refinement (Shao et al. 2024, DeepSeekMath): the student samples a group of k answers per prompt;
rewards for label agreement and output format give group-relative advantages A_i = (r_i - mean r) /
(std r + 1e-4) (TRL's default group scaling), and the loss is mean_i(A_i * NLL_i) with NLL_i the mean token
NLL of answer i: one policy-gradient step per sampling (so the PPO ratio is 1 and clipping never acts), no
KL term (beta = 0, TRL's default). The natural RL extension of InteRank's reward-weighted fine-tuning
(REFERENCE section 5). Each answer's NLL covers the text the student wrote plus the stop marker and the
end-of-turn token generation ends with (as the SFT targets do).

It runs on the workspace's one training loop (`shared_kernels.training`): DDP/FSDP2 under accelerate,
`CheckpointManager` checkpoints in `output_dir/checkpoints` and resume like SFT and rwft. Sampling is seeded
by (seed, step, prompt), so a resumed run draws the samples an uninterrupted run draws.

Rewards (TRL reward-function signature: completions plus dataset columns as keyword lists):
  * `label_reward`: 1 - |parsed - label| / 2, 0 when unparseable;
  * `format_reward`: 1 when the answer is a non-empty explanation followed by `Relevance Label: <0|1|2>`
    (optionally ` ##`) and nothing after it, else 0.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from rerankdistill.labels import INTERANK_PROMPT, RelevancePrompt, parse_relevance
from rerankdistill.train.common import (
    LoraSpec,
    apply_lora,
    collate,
    encode_example,
    save_model,
    weighted_loss,
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
    last_reward: dict[str, float],
    prompt: RelevancePrompt = INTERANK_PROMPT,
) -> Callable:
    """The loss of one GRPO micro-batch (one prompt's group), for `shared_kernels.training.run_loop`.

    Args:
        unwrap: prepared model -> the model to sample from (`accelerator.unwrap_model`).
        last_reward: receives {"reward": the group's mean reward} (for the logged rows).
    """

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
        rewards = [0.0] * len(texts)
        for fn, w in zip(reward_funcs, reward_weights, strict=True):
            rewards = [
                r + w * float(x)
                for r, x in zip(rewards, fn(texts, label=[pair.reference] * len(texts)), strict=True)
            ]
        last_reward["reward"] = sum(rewards) / len(rewards)
        examples = [
            encode_example(tokenizer, prompt.messages(pair.query, pair.document), t + prompt.stop, weight=a)
            for t, a in zip(texts, group_advantages(rewards), strict=True)
        ]
        batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return weighted_loss(out.logits, batch["labels"], batch["weights"])

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
        max_steps, learning_rate, temperature: GRPO settings; beta must be 0 (no reference-model KL).
        num_generations: group size per prompt; `batch_size` answers per optimizer step (default
            num_generations, i.e. one prompt per step) must be a multiple of it.
        reward_funcs, reward_weights: default [label_reward, format_reward] with weights [1.0, 0.5].
        lora: train LoRA adapters instead of all weights.
        save_every: optimizer steps between checkpoints (0: only the last step's); a run resumes from them.
    Returns:
        stats: steps, first/last loss and mean reward (of the logged steps; main process), the final weights.
    """
    import torch
    from accelerate import Accelerator

    from shared_kernels.checkpoint import CheckpointManager
    from shared_kernels.training import LoopSettings, run_loop

    if not pairs:
        raise ValueError("pairs is empty")
    if beta != 0:
        raise ValueError(f"beta must be 0 (no KL to a reference model is implemented), got {beta}")
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
    last_reward: dict[str, float] = {}
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
        last_reward,
        prompt,
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
        extra_metrics=lambda _: dict(last_reward),
    )
    acc.wait_for_everyone()
    rows = state.history
    stats = {
        "steps": float(state.step),
        "first_loss": rows[0]["grpo/loss"] if rows else float("nan"),
        "last_loss": rows[-1]["grpo/loss"] if rows else float("nan"),
        "first_reward": rows[0].get("reward", float("nan")) if rows else float("nan"),
        "last_reward": rows[-1].get("reward", float("nan")) if rows else float("nan"),
    }
    return TrainResult(model, save_model(model, tokenizer, output_dir), stats)
